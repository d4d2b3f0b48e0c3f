"""Which MoE families of the installed transformers remoe-engine runs exactly: `remoe families`.

Every model type whose experts go through transformers' ExpertsInterface is tried, not sampled:
a tiny random model is built from its config (`tiny_models.build_tiny`), then

- `patch()` at a full cache and at `slots_per_layer = top_k` must give the same fp32 logits
  (<= 1e-5) and the same greedy tokens as the unpatched model, with the experts kernel `patch`
  chooses (the fused op wherever it reproduces the family's gate) and with the per-expert loop;
- `load()` of the saved checkpoint at `slots_per_layer = top_k` must give them too.

Outcomes: "exact" (route_topk reproduces the router: the reuse bias is available), "exact, no
bias" (the router runs as it is; route_topk cannot express it, the reason is kept), "refused"
(patch or load says what is unsupported), "WRONG" (different outputs: a bug, never a state to
ship), "not built" (no tiny model of that type can run on this machine: the reason).
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import asdict, dataclass

ATOL = 1e-5
OUTCOMES = ("exact", "exact, no bias", "refused", "WRONG", "not built")


@dataclass
class Coverage:
    """One model type's outcome (see the module docstring)."""

    model_type: str
    outcome: str
    reason: str = ""
    routing: str = ""  # "table" or "learned" (route_topk), "own router" (no bias)
    max_abs_diff: float | None = None  # largest logit difference over every check
    experts: str = ""  # the experts kernel patch() chose: "fused" or "per-expert (why)"

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_type(model_type: str) -> Coverage:
    """Build a tiny `model_type` model and check patch and load against it."""
    from remoe_engine.tiny_models import Unbuildable, build_tiny

    try:
        model = build_tiny(model_type)
    except Unbuildable as error:
        return Coverage(model_type, "not built", str(error))
    try:
        return _check(model_type, model)
    except NotImplementedError as error:
        return Coverage(model_type, "refused", str(error).splitlines()[0])
    except Exception as error:  # a failure is a finding: report it, keep checking the others
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return Coverage(model_type, "WRONG", f"{type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''} "
                        f"({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})")


def _check(model_type: str, model) -> Coverage:
    import torch

    import remoe_engine
    from remoe_engine.families import learn_routing

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    want_logits, want_tokens = _logits(model, ids), _greedy(model, ids)
    learned = learn_routing(model)
    top_k = learned.top_k
    worst = 0.0
    for slots, kernel in ((None, "auto"), (top_k, "auto"), (top_k, "loop")):
        handle = remoe_engine.patch(model, slots_per_layer=slots, experts_kernel=kernel)
        try:
            diff = _compare(model, ids, want_logits, want_tokens,
                            f"patch(slots={slots}, {handle.experts_kernel})")
        finally:
            handle.unpatch()
        worst = max(worst, diff)
        if kernel == "auto":
            experts = handle.experts_kernel
    with tempfile.TemporaryDirectory(prefix="remoe-families-") as tmp:
        model.save_pretrained(tmp)
        loaded = remoe_engine.load(tmp, slots_per_layer=top_k, dtype=torch.float32,
                                   device="cpu")
        worst = max(worst, _compare(loaded, ids, want_logits, want_tokens, "load"))
    if learned.spec is None:
        return Coverage(model_type, "exact, no bias", learned.unsupported or "",
                        routing="own router", max_abs_diff=worst, experts=experts)
    return Coverage(model_type, "exact", routing=learned.source, max_abs_diff=worst,
                    experts=experts)


class _Mismatch(AssertionError):
    pass


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _greedy(model, ids):
    import torch

    with torch.no_grad():
        return model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=0)


def _compare(model, ids, want_logits, want_tokens, what: str) -> float:
    import torch

    got = _logits(model, ids)
    diff = float((got - want_logits).abs().max())
    if not diff <= ATOL:
        raise _Mismatch(f"{what}: logits differ by {diff:.3g} (> {ATOL})")
    tokens = _greedy(model, ids)
    if not torch.equal(tokens, want_tokens):
        raise _Mismatch(f"{what}: greedy tokens differ")
    return diff


def check_all(model_types: list[str] | None = None, progress: bool = True) -> list[Coverage]:
    """`check_model_type` for every ExpertsInterface model type (or the given ones)."""
    from tqdm.auto import tqdm

    from remoe_engine.families import experts_interface_model_types

    types = model_types or experts_interface_model_types()
    results = []
    bar = tqdm(types, desc="families", disable=not progress, leave=False)
    for model_type in bar:
        bar.set_postfix_str(model_type)
        results.append(check_model_type(model_type))
    return results


def format_table(results: list[Coverage]) -> str:
    """A plain-text table: one line per model type, then the count of each outcome."""
    lines = [f"{'model type':<26}{'outcome':<16}{'routing':<12}{'experts':<12}reason",
             "-" * 100]
    for r in results:
        # The per-expert loop's reason can be long: the table says "loop", the JSON says why.
        experts = "fused" if r.experts == "fused" else ("loop" if r.experts else "")
        lines.append(f"{r.model_type:<26}{r.outcome:<16}{r.routing:<12}{experts:<12}{r.reason}")
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    lines += ["", ", ".join(f"{n} {o}" for o, n in counts.items() if n)]
    return "\n".join(lines)
