"""Every MoE family of the installed transformers, enumerated: routing and expert layouts learned
from the model and from transformers, proven at patch time (remoe_engine.families, .coverage)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import build

import remoe_engine
from remoe_engine import cli, coverage, families
from remoe_engine.tiny_models import build_tiny, moe_model_types

TYPES = moe_model_types()
_RESULTS: dict[str, coverage.Coverage] = {}  # each family is checked once per session


def _check(model_type: str) -> coverage.Coverage:
    if model_type not in _RESULTS:
        _RESULTS[model_type] = coverage.check_model_type(model_type)
    return _RESULTS[model_type]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_is_exact_or_says_why(model_type):
    result = _check(model_type)
    assert result.outcome != "WRONG", result.reason
    if result.outcome in ("refused", "not built", "exact, no bias"):
        assert result.reason, result
    else:
        assert result.max_abs_diff is not None and result.max_abs_diff <= coverage.ATOL


@pytest.mark.slow
def test_nine_in_ten_families_that_build_run_exactly():
    results = [_check(t) for t in TYPES]
    built = [r for r in results if r.outcome != "not built"]
    exact = [r for r in built if r.outcome in ("exact", "exact, no bias")]
    assert len(exact) >= 0.9 * len(built), coverage.format_table(results)


def test_the_table_is_a_cache_the_model_verifies(monkeypatch):
    model = build("qwen3_moe")
    assert families.learn_routing(model).source == "table"
    # A wrong table entry (sigmoid scores for a softmax router) is caught, and searched past.
    wrong = families.FAMILIES["qwen3_moe"]
    monkeypatch.setitem(families.FAMILIES, "qwen3_moe", dataclasses.replace(
        wrong, routing=lambda config: families.RoutingSpec(top_k=2, scoring="sigmoid")))
    fresh = build("qwen3_moe")
    learned = families.learn_routing(fresh)
    assert learned.source == "learned" and learned.spec.scoring == "softmax"
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fresh(ids).logits
    handle = remoe_engine.patch(fresh, slots_per_layer=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want, atol=coverage.ATOL, rtol=0)
    handle.unpatch()


def test_a_family_outside_the_table_is_learned_and_exact():
    # Hunyuan: its router is a module holding a Linear ("wg"), outside the table.
    model = build_tiny("hunyuan_v1_moe")
    assert "hunyuan_v1_moe" not in families.FAMILIES
    learned = families.learn_routing(model)
    assert learned.spec is not None and learned.source == "learned"
    assert learned.spec.weight_attr == "wg.weight"
    assert coverage.check_model_type("hunyuan_v1_moe").outcome == "exact"


def test_a_router_route_topk_cannot_express_runs_as_it_is_without_the_bias():
    # PhiMoE's sparsemixer: deterministic at inference, but not a top-k of one score.
    model = build_tiny("phimoe")
    learned = families.learn_routing(model)
    assert learned.spec is None
    assert "route_topk cannot reproduce" in learned.unsupported
    with pytest.raises(NotImplementedError, match="reuse_bias=0.05: PhimoeTopKRouter"):
        remoe_engine.patch(model, slots_per_layer=2, reuse_bias=0.05)
    assert coverage.check_model_type("phimoe").outcome == "exact, no bias"


def test_router_arguments_from_the_block_are_found():
    # MiniMax-M2 passes its block's e_score_correction_bias to the router as an argument.
    model = build_tiny("minimax_m2")
    block = families.find_moe_blocks(model)[0]
    assert block.router_args == ("e_score_correction_bias",)
    assert families.learn_routing(model).spec.correction_bias_attr == "args.0"


def test_learned_layouts_read_what_transformers_writes(tmp_path):
    # Mixtral's per-expert w1/w3/w2 and Granite-MoE's fused input/output linears, from
    # transformers' own conversion rules.
    for model_type in ("mixtral", "granitemoe"):
        layout = families.disk_layout_of(model_type)
        assert layout.params[:2] == ("gate_up_proj", "down_proj")
    assert not families.disk_layout_of("mixtral").pieces[0].fused
    assert families.disk_layout_of("granitemoe").pieces[0].fused


def test_families_command_prints_the_outcomes(capsys):
    assert cli.main(["families", "--no-progress", "qwen3_moe", "phimoe"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_moe" in out and "exact" in out and "exact, no bias" in out
    assert cli.main(["families", "llama"]) == 2
