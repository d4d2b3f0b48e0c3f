"""The one evaluation harness (remoe_engine.evaluation) and the one router tap behind it."""

from __future__ import annotations

import re

import pytest
import torch
from hf_tiny import ALL_VARIANTS, VARIANTS, build, variant_id

import remoe_engine
from remoe_engine import evaluation, metrics, trace
from remoe_engine.families import expert_key_patterns, family_of
from remoe_engine.ops import topk_overlap
from remoe_engine.zoo.evaluate import evaluate as card_evaluate


def _windows(count: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def test_topk_overlap_counts_shared_ids_per_row():
    a = torch.tensor([[0, 1, 2], [3, 4, 5]])
    b = torch.tensor([[2, 0, 7], [6, 7, 8]])
    assert topk_overlap(a, b).tolist() == [2, 0]
    assert topk_overlap(a, a).tolist() == [3, 3]


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_card_routing_statistics_use_the_family_routing(variant):
    # The card's EOR once took softmax(logits).topk whatever the family: wrong for sigmoid and
    # group-limited routers (DeepSeek-V2/V3). It must be the EOR of what the routers chose.
    model_type, extra = variant
    model = build(model_type, **extra)
    wins = _windows()
    _, stats = card_evaluate(model, wins, block=4)
    recorded = trace.record(model, wins)
    assert stats.eor == pytest.approx(metrics.expert_reuse(recorded).eor, abs=1e-12)
    assert stats.distinct_mean == pytest.approx(metrics.distinct_experts(recorded, 4).mean)


def test_teacher_forced_trace_is_the_recorded_routing_and_the_perplexity():
    model = build("deepseek_v3")
    wins = _windows()
    ppl, routing = evaluation.teacher_forced_trace(model, wins, batch_size=2)
    recorded = trace.record(model, wins)
    assert torch.equal(routing.ids, recorded.ids)
    assert torch.equal(routing.offsets, recorded.offsets)
    assert ppl["perplexity"] == pytest.approx(evaluation.perplexity(model, wins)["perplexity"])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v2"])
def test_decode_predicts_what_the_teacher_forced_pass_predicts(model_type):
    model = build(model_type)
    wins = _windows(2, 12)
    result = evaluation.decode(model, wins, reference=evaluation.frozen_routers(model))
    # The same predictions, one token at a time with the KV cache.
    assert result.perplexity == pytest.approx(
        evaluation.perplexity(model, wins)["perplexity"], rel=1e-4)
    assert result.predicted == len(result.steps) == 2 * 11
    # The routing of every fed token (the last token of a window is only predicted).
    teacher = trace.record(model, wins[:, :-1])
    assert torch.equal(result.routing.ids, teacher.ids)
    # Against its own routers on the same hidden states: full agreement, no divergence.
    assert result.agreement.topk_agreement == 1.0
    assert result.agreement.kl == pytest.approx(0.0, abs=1e-9)


def test_decode_side_by_side_equals_one_model_at_a_time():
    models = [build("qwen3_moe", seed=0), build("qwen3_moe", seed=1)]
    wins = _windows(2, 10)
    together = evaluation.decode_side_by_side(models, wins)
    for model, result in zip(models, together, strict=True):
        alone = evaluation.decode(model, wins)
        assert result.perplexity == pytest.approx(alone.perplexity, rel=1e-6)
        assert torch.equal(result.routing.ids, alone.routing.ids)
    assert not torch.equal(together[0].routing.ids, together[1].routing.ids)


def test_decode_agreement_is_against_the_original_router_on_the_same_hidden_states():
    model = build("qwen3_moe")
    original = evaluation.frozen_routers(model)
    with torch.no_grad():
        for block in trace.find_moe_blocks(model):
            block.router.weight.add_(torch.randn_like(block.router.weight))
    result = evaluation.decode(model, _windows(2, 12), reference=original)
    assert 0.0 < result.agreement.topk_agreement < 1.0 and result.agreement.kl > 0.0


def test_decode_counts_the_pool_of_a_patched_model():
    model = build("olmoe")
    handle = remoe_engine.patch(model, slots_per_layer=3)
    try:
        result = evaluation.decode(model, _windows(1, 9), handle=handle)
    finally:
        handle.unpatch()
    lookups = result.counts["hits"] + result.counts["misses"]
    # Every fed token looks up K experts in every MoE layer.
    assert lookups == 8 * result.routing.num_layers * result.routing.top_k


def test_decode_refuses_windows_too_short_to_predict():
    with pytest.raises(ValueError, match="S >= 2"):
        evaluation.decode(build("olmoe"), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_expert_key_patterns_match_exactly_the_routed_expert_keys(variant, tmp_path):
    # load() tells transformers which keys it leaves unread; the family table says which.
    model_type, extra = variant
    model = build(model_type, **extra)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    from remoe_engine.store import ExpertStore

    store = ExpertStore.from_checkpoint(tmp_path)
    expert_keys = {seg.what for layer in store.layers for e in range(store.num_experts)
                   for seg in store.segments(layer, e)}
    patterns = expert_key_patterns(family_of(model.config).model_type)
    matched = {k for k in keys if any(re.search(p, k) for p in patterns)}
    assert matched == expert_keys
