"""remoe::moe_experts, the fused experts op: against the pure-PyTorch reference, its errors, the
gate it learns from a family's module, and the patched model against the per-expert path."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import remoe_engine
from remoe_engine import ops, reference
from remoe_engine.experts import choose_kernel, learn_gate
from remoe_engine.tiny_models import build_tiny

S, H, I, K = 9, 48, 40, 3
GATES = {
    "silu chunk": ops.ExpertsGate("chunk", "silu"),
    "gelu_tanh chunk": ops.ExpertsGate("chunk", "gelu_tanh"),
    "gpt-oss": ops.ExpertsGate("interleave", "swish_alpha", "input", 7.0, 1.702, 1.0),
    "clamped after": ops.ExpertsGate("chunk", "silu", "output", 0.5),
    "no gate relu2": ops.ExpertsGate("none", "relu2"),
    "no gate gelu": ops.ExpertsGate("none", "gelu"),
}


def _pool_views(gate: ops.ExpertsGate, dtype: torch.dtype, transposed: bool, device="cpu",
                seed: int = 0):
    """up, down, up_bias, down_bias as strided views of one [S, slot] buffer, like the pool's."""
    g = torch.Generator().manual_seed(seed)
    N = I if gate.layout == "none" else 2 * I
    sizes = [N * H, H * I, N, H]
    buf = (torch.randn(S, sum(sizes) + 64, generator=g) * 0.3).to(dtype).to(device)
    parts = list(torch.split(buf[:, : sum(sizes)], sizes, dim=1))
    up = parts[0].view(S, *((H, N) if transposed else (N, H)))
    down = parts[1].view(S, *((I, H) if transposed else (H, I)))
    return up, down, parts[2], parts[3]


def _routing(T: int, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    slots[0, -1] = -1  # a pair computed elsewhere (another wave)
    return slots.to(device), torch.rand(T, K, generator=g).to(device)


@pytest.mark.parametrize("gate_name", GATES)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 40])  # <= 8: the fused GEMV kernel; else grouped
def test_fp32_matches_the_reference(gate_name, transposed, tokens):
    gate = GATES[gate_name]
    up, down, up_bias, down_bias = _pool_views(gate, torch.float32, transposed)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))
    slots, weights = _routing(tokens)
    for biases in ((None, None), (up_bias, down_bias)):
        got = ops.moe_experts(x, slots, weights, up, down, gate=gate, up_bias=biases[0],
                              down_bias=biases[1], transposed=transposed)
        want = reference.moe_experts(x, slots, weights, up, down, gate=gate, up_bias=biases[0],
                                     down_bias=biases[1], transposed=transposed)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 40])
def test_half_precision_weights_accumulate_in_fp32(dtype, tokens):
    gate = GATES["gpt-oss"]
    up, down, up_bias, down_bias = _pool_views(gate, dtype, transposed=True)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    slots, weights = _routing(tokens)
    got = ops.moe_experts(x, slots, weights, up, down, gate=gate, up_bias=up_bias,
                          down_bias=down_bias, transposed=True)
    want = reference.moe_experts(x, slots, weights, up, down, gate=gate, up_bias=up_bias,
                                 down_bias=down_bias, transposed=True)
    scale = float(want.abs().max())
    # Few tokens: exact fp32 arithmetic on the dtype's values. Many: the grouped path rounds the
    # up projection's output to the dtype before the gate, as the per-expert path does.
    tolerance = 1e-5 if tokens <= 8 else (8e-3 if dtype == torch.bfloat16 else 1e-3)
    assert float((got - want).abs().max()) <= tolerance * scale


def test_pairs_sharing_a_slot_and_empty_rows():
    gate = GATES["silu chunk"]
    up, down, _, _ = _pool_views(gate, torch.float32, False)
    x = torch.randn(4, H)
    slots = torch.tensor([[2, 5, 7], [2, 5, 7], [-1, -1, -1], [7, 2, -1]])
    weights = torch.rand(4, K)
    got = ops.moe_experts(x, slots, weights, up, down, gate=gate)
    torch.testing.assert_close(got, reference.moe_experts(x, slots, weights, up, down, gate=gate),
                               atol=2e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros(H))
    empty = ops.moe_experts(x[:0], slots[:0], weights[:0], up, down, gate=gate)
    assert empty.shape == (0, H)


def test_deterministic_across_thread_counts():
    gate = GATES["silu chunk"]
    up, down, _, _ = _pool_views(gate, torch.float32, False)
    x = torch.randn(4, H)
    slots, weights = _routing(4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_experts(x, slots, weights, up, down, gate=gate)
        torch.set_num_threads(2)
        two = ops.moe_experts(x, slots, weights, up, down, gate=gate)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("case, match", [
    ("slot out of range", r"slots\[1, 0\] = 9 is not a slot of a 9-slot pool"),
    ("slot below -1", r"slots\[0, 2\] = -2 is not a slot"),
    ("dtype mismatch", "the slots hold the compute dtype"),
    ("bad gate", 'gate must be "none", "chunk" or "interleave"'),
    ("bad activation", "activation must be one of"),
    ("clamp without limit", "a clamped gate needs a finite limit > 0"),
    ("odd gated rows", "a gated up projection has 2 \\* I rows"),
    ("non-dense slot", "must be a dense matrix"),
    ("bias shape", "up_bias must be"),
])
def test_bad_inputs_are_clear_errors(case, match):
    gate = GATES["silu chunk"]
    up, down, up_bias, _ = _pool_views(gate, torch.float32, False)
    x = torch.randn(2, H)
    slots, weights = _routing(2)
    kwargs = {"gate": gate}
    if case == "slot out of range":
        slots[1, 0] = S
    elif case == "slot below -1":
        slots[0, 2] = -2
    elif case == "dtype mismatch":
        x = x.to(torch.bfloat16)
    elif case == "bad gate":
        kwargs["gate"] = ops.ExpertsGate("halves")
    elif case == "bad activation":
        kwargs["gate"] = ops.ExpertsGate("chunk", "tanh")
    elif case == "clamp without limit":
        kwargs["gate"] = ops.ExpertsGate("chunk", "silu", "input", 0.0)
    elif case == "odd gated rows":
        up = up[:, :-1]
    elif case == "non-dense slot":
        up = torch.randn(S, 2 * I, 2 * H)[:, :, ::2]
    elif case == "bias shape":
        kwargs["up_bias"] = up_bias[:, :-1]
    with pytest.raises(RuntimeError, match=match):
        ops.moe_experts(x, slots, weights, up, down, **kwargs)


def test_opcheck_schema_and_fake_kernel():
    gate = GATES["gpt-oss"]
    up, down, up_bias, down_bias = _pool_views(gate, torch.float32, True)
    x = torch.randn(3, H)
    slots, weights = _routing(3)
    torch.library.opcheck(torch.ops.remoe.moe_experts.default,
                          (x, slots, weights, up, up_bias, down, down_bias, gate.layout,
                           gate.activation, gate.clamp, gate.limit, gate.alpha, gate.up_offset,
                           True),
                          test_utils=("test_schema", "test_faketensor"))


# --- the gate a family's module computes ----------------------------------------------------


class _Experts(nn.Module):
    """The attributes transformers' experts modules carry, with a gate given as a function."""

    def __init__(self, apply_gate=None, act_fn=None, **numbers):
        super().__init__()
        self.has_gate = apply_gate is not None
        self._gate = apply_gate
        self.act_fn = act_fn
        for name, value in numbers.items():
            setattr(self, name, value)

    def _apply_gate(self, gate_up):
        return self._gate(self, gate_up)


def _gpt_oss_gate(self, gate_up):
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=self.limit)
    up = up.clamp(min=-self.limit, max=self.limit)
    return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


def _step_gate(self, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate).clamp(max=self.limit) * up.clamp(-self.limit, self.limit)


def _unknown_gate(self, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.tanh(gate) * up


@pytest.mark.parametrize("module, want", [
    (_Experts(_gpt_oss_gate, limit=7.0, alpha=1.702),
     ops.ExpertsGate("interleave", "swish_alpha", "input", 7.0, 1.702, 1.0)),
    (_Experts(_step_gate, limit=3.0), ops.ExpertsGate("chunk", "silu", "output", 3.0)),
    (_Experts(lambda self, h: nn.functional.gelu(h.chunk(2, -1)[0], approximate="tanh")
              * h.chunk(2, -1)[1]), ops.ExpertsGate("chunk", "gelu_tanh")),
    (_Experts(act_fn=lambda h: torch.relu(h) ** 2), ops.ExpertsGate("none", "relu2")),
])
def test_learn_gate_finds_the_form(module, want):
    assert learn_gate(module) == (want, "")


def test_learn_gate_refuses_what_it_cannot_express():
    gate, why = learn_gate(_Experts(_unknown_gate))
    assert gate is None and "none of the fused op's forms" in why
    normed = _Experts(_step_gate, limit=3.0)
    normed.has_post_expert_norm = True
    assert learn_gate(normed) == (None, "a norm after each expert")
    gate, why = learn_gate(_Experts(act_fn=lambda gate, up: gate * up))  # no gate, 2 arguments
    assert gate is None and "cannot be probed (TypeError" in why
    # What the gate function is called does not matter, only what it computes (Inkling-2 style:
    # an activation module taking gate and up).
    two_arguments = _Experts(lambda self, h: self.act_fn(*h.chunk(2, -1)),
                             act_fn=lambda g, u: nn.functional.silu(g) * u)
    assert learn_gate(two_arguments) == (ops.ExpertsGate("chunk", "silu"), "")
    with pytest.raises(NotImplementedError, match="experts_kernel='fused'"):
        choose_kernel(_Experts(_unknown_gate), torch.device("cpu"), "fused")
    assert choose_kernel(_Experts(_unknown_gate), torch.device("cpu"), "auto")[0] is None


# --- the patched model: fused against the per-expert path -----------------------------------


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_patched_fused_matches_the_per_expert_path_and_transformers(model_type):
    model = build_tiny(model_type)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    top_k = model.config.num_experts_per_tok
    for slots, kernel in itertools.product((None, top_k), ("fused", "loop")):
        handle = remoe_engine.patch(model, slots_per_layer=slots, experts_kernel=kernel)
        try:
            assert handle.experts_kernel == ("fused" if kernel == "fused"
                                             else "per-expert (asked for)")
            with torch.no_grad():
                got = model(input_ids=ids, use_cache=False).logits
                tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                        pad_token_id=0)
        finally:
            handle.unpatch()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        with torch.no_grad():
            want_tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                         pad_token_id=0)
        assert torch.equal(tokens, want_tokens)


def test_patched_bf16_fused_is_as_close_to_fp32_as_the_per_expert_path():
    model = build_tiny("qwen3_moe")
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    model.to(torch.bfloat16)
    errors = {}
    for kernel in ("fused", "loop"):
        handle = remoe_engine.patch(model, experts_kernel=kernel)
        with torch.no_grad():
            errors[kernel] = float((model(input_ids=ids, use_cache=False).logits.float()
                                    - want).abs().max())
        handle.unpatch()
    # The fused op keeps the gate in fp32; it may not be worse than bf16 rounding between steps.
    assert errors["fused"] <= 1.5 * errors["loop"] + 1e-3, errors


def test_experts_kernel_is_checked_before_the_model_is_touched():
    model = build_tiny("qwen3_moe")
    with pytest.raises(ValueError, match="experts_kernel must be one of"):
        remoe_engine.patch(model, experts_kernel="fast")
    assert not getattr(model, "_remoe_patched", False)


@pytest.mark.cuda
@pytest.mark.parametrize("gate_name", GATES)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("tokens", [1, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_the_reference(gate_name, transposed, tokens, dtype):
    gate = GATES[gate_name]
    up, down, up_bias, down_bias = _pool_views(gate, dtype, transposed, device="cuda")
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    slots, weights = _routing(tokens, device="cuda")
    got = ops.moe_experts(x, slots, weights, up, down, gate=gate, up_bias=up_bias,
                          down_bias=down_bias, transposed=transposed)
    want = reference.moe_experts(x.cpu(), slots.cpu(), weights.cpu(), up.cpu(), down.cpu(),
                                 gate=gate, up_bias=up_bias.cpu(), down_bias=down_bias.cpu(),
                                 transposed=transposed)
    scale = float(want.abs().max())
    tolerance = 2e-5 if (dtype == torch.float32 or tokens <= 8) else 8e-3
    assert float((got.cpu() - want).abs().max()) <= tolerance * scale


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_cuda_patched_fused_decode_matches_the_per_expert_path(model_type):
    model = build_tiny(model_type).cuda()
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0)).cuda()
    outputs = {}
    for kernel in ("fused", "loop"):
        handle = remoe_engine.patch(model, slots_per_layer=model.config.num_experts_per_tok,
                                    experts_kernel=kernel)
        with torch.no_grad():
            outputs[kernel] = (model(input_ids=ids, use_cache=False).logits,
                               model.generate(ids, max_new_tokens=6, do_sample=False,
                                              pad_token_id=0))
        handle.unpatch()
    torch.testing.assert_close(outputs["fused"][0], outputs["loop"][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(outputs["fused"][1], outputs["loop"][1])


def test_set_experts_kernel_switches_a_patched_model():
    model = build_tiny("qwen3_moe")
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    handle = remoe_engine.patch(model, experts_kernel="loop")
    with torch.no_grad():
        loop = model(input_ids=ids).logits
        handle.set_experts_kernel("fused")
        assert handle.experts_kernel == "fused" and handle.stats()["experts_kernel"] == "fused"
        fused = model(input_ids=ids).logits
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="experts_kernel must be one of"):
        handle.set_experts_kernel("gpu")
    handle.unpatch()
