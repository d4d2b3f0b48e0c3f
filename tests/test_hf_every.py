"""Every MoE family in the installed transformers builds tiny, or says precisely why it cannot.

Slow: each family imports its modeling module and runs a forward and a short `generate`.
"""

from __future__ import annotations

import pytest
import torch

from remoe_engine.tiny_models import Unbuildable, build_tiny, moe_model_types

MIN_BUILDABLE = 0.8  # share of families that must build; the rest carry a reason

_outcomes: dict[str, str | None] = {}  # family -> None (built) or the Unbuildable reason


def _outcome(model_type: str) -> str | None:
    if model_type not in _outcomes:
        try:
            model = build_tiny(model_type)
        except Unbuildable as exc:
            _outcomes[model_type] = exc.reason
        else:
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            assert logits.shape == (2, 9, vocab), model_type
            assert torch.isfinite(logits).all(), model_type
            # The point of a tiny MoE model: routing across more than one MoE layer.
            experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
            assert len(experts) >= 2, model_type
            _outcomes[model_type] = None
    return _outcomes[model_type]


def test_enumeration_finds_the_known_families():
    types = moe_model_types()
    assert types == sorted(types)
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(types)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", moe_model_types())
def test_every_moe_type_builds_tiny_or_says_why(model_type):
    reason = _outcome(model_type)
    if reason is not None:
        assert reason.strip() and "\n" not in reason, (model_type, reason)


@pytest.mark.slow
def test_most_moe_types_build():
    types = moe_model_types()
    failed = {t: r for t in types if (r := _outcome(t)) is not None}
    table = "\n".join(f"  {t:24s} {r}" for t, r in sorted(failed.items()))
    built = len(types) - len(failed)
    assert built >= MIN_BUILDABLE * len(types), (
        f"{built}/{len(types)} families build; unbuildable:\n{table}")


@pytest.mark.slow
def test_a_built_model_is_tiny_and_deterministic():
    a, b = build_tiny("qwen3_moe", seed=3), build_tiny("qwen3_moe", seed=3)
    config = a.config
    assert config.hidden_size <= 64 and config.num_hidden_layers <= 4
    assert 4 <= config.num_experts <= 16 and 2 <= config.num_experts_per_tok <= 4
    assert config.vocab_size <= 512
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_family_without_a_causal_lm_says_so():
    if "openai_privacy_filter" not in moe_model_types():
        pytest.skip("this transformers has no openai_privacy_filter (token classification only)")
    with pytest.raises(Unbuildable, match="no causal-LM class"):
        build_tiny("openai_privacy_filter")
