"""Issue 16's evidence: the learned reuse bias against the original router, the ReMoE router
delta, the fixed reuse bias (a sweep, both sources) and ReMoE + the fixed bias, token by token
with the KV cache on two texts, through `remoe run`'s own comparison (`compare.run`).

    # 1. train the learned biases: remoe finetune --learn-bias ... --out DIR (the options of each
    #    run are recorded in the results' "learned_configs"; the shipped one is
    #    remoe_engine/zoo/tiny/reuse-bias-delta.safetensors)
    # 2. decode every configuration on both texts (one interleaved run per text):
    python bench/experiments/learned_bias.py eval --learned-previous P/router-delta.safetensors \\
        --learned-resident R/router-delta.safetensors --tokens 1024 \\
        --out bench/results/learned-bias-cpu-2026-11-30.json
    # 3. the plot, the model card's section (the README table: python bench/readme_table.py)
    python bench/experiments/learned_bias.py report bench/results/learned-bias-cpu-2026-11-30.json

Texts: the built-in model's held-out slice (never trained on), and the installed transformers
package's Python sources (`transformers_text`: every 8th modeling file, its code from the first
import on, so not the license header every file repeats), which the model never saw.

Every configuration is loaded as `remoe run` loads it (experts read from one packed file under
the run's default budget, a quarter of the experts, one global LRU pool); "KB read / token" is
what its pool read. LRU at K and 2K are the decoded routing replayed through the simulator with
per-layer caches; "budget" the same routing through one global cache of the budget's slots.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARD = os.path.join(ROOT, "remoe_engine", "zoo", "tiny", "MODEL_CARD.md")
PLOT = os.path.join(ROOT, "docs", "img", "learned_bias_pareto.png")
CARD_BEGIN = "<!-- learned-bias:begin -->"
CARD_END = "<!-- learned-bias:end -->"
FIXED_BIASES = (0.01, 0.02, 0.03, 0.05)
TARGET_PPL = 0.5  # percent, on both texts
TARGET_KB = -35.0  # percent KB read per token at the budget, against the original router
# The row whose delta ships as remoe_engine/zoo/tiny/reuse-bias-delta.safetensors.
SHIPPED = "learned resident@8 (SPSA, r0.5)"


def transformers_text(max_chars: int = 400_000) -> tuple[str, list[str]]:
    """(text, files): every 8th `models/*/modeling_*.py` of the installed transformers, from
    each file's first import line on."""
    import transformers

    base = os.path.dirname(transformers.__file__)
    files = sorted(glob.glob(os.path.join(base, "models", "*", "modeling_*.py")))[::8]
    parts, used = [], []
    for path in files:
        with open(path, encoding="utf-8") as f:
            code = f.read()
        start = code.find("\nimport ")
        start = code.find("\nfrom ") if start < 0 else start
        parts.append(code[max(0, start) :])
        used.append(os.path.relpath(path, os.path.dirname(base)))
        if sum(map(len, parts)) > max_chars:
            break
    return "\n".join(parts), used


def rows_for(delta: str, learned: dict[str, str]) -> list[tuple]:
    rows = [("original", None, 0.0, "resident"), ("remoe", delta, 0.0, "resident")]
    for source in ("previous", "resident"):
        rows += [(f"original+bias {b} {source}", None, b, source) for b in FIXED_BIASES]
    for source in ("previous", "resident"):
        rows += [(f"remoe+bias {b} {source}", delta, b, source) for b in (0.01, 0.02)]
    rows += [(name, path, 0.0, "resident") for name, path in learned.items()]
    return rows


def forward_rows(model_dir: str, rows: list[tuple], wins, top_k: int, budget_slots: int,
                 slot_bytes: int, slots_per_layer: int, cache: dict | None = None) -> list[dict]:
    """Pass B: each configuration over many held-out windows in batched teacher-forced
    forwards that select experts exactly as decode does (`finetune.bias.BiasedRouting`, whose
    choices tests/test_learned_bias.py checks against token-by-token decode). "resident"
    prefers a per-layer LRU pool of `slots_per_layer` slots from an empty pool per window (the
    budget's share per layer). Hit rates: the routing replayed through the simulator's LRU, each
    window from an empty cache."""
    import math

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from remoe_engine import sim
    from remoe_engine.finetune.bias import BiasedRouting, LearnedBias
    from remoe_engine.finetune.delta import apply_router_delta, read_learned_bias
    from remoe_engine.ops import topk_overlap

    out = []
    cache = {} if cache is None else cache
    for name, delta, bias, source in rows:
        if name in cache:  # the same configuration measured by an earlier run on these windows
            out.append(cache[name])
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        learned = None
        if delta is not None:
            apply_router_delta(model, delta, weights_only=True)
            learned = read_learned_bias(delta)
        L = model.config.num_hidden_layers
        if learned is None and isinstance(bias, (list, tuple)):  # a per-layer probe
            learned = LearnedBias(source, torch.tensor(bias, dtype=torch.float32).view(L, 1))
        elif learned is None:
            learned = LearnedBias(source, torch.full((L, 1), float(bias)))
        nll, ids = 0.0, []
        with torch.no_grad(), BiasedRouting(model, learned.strengths, learned.source,
                                            slots_per_layer) as routing:
            for batch in wins.split(16):
                routing.shape, routing.layers = tuple(batch.shape), []
                logits = model(input_ids=batch, use_cache=False).logits
                nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1), reduction="sum"))
                ids.append(torch.stack([i for _, _, i in routing.layers]))  # [L, B, S, K]
        ids = torch.cat(ids, dim=1).to(torch.int32)  # [L, W, S, K]
        L, W, S, K = ids.shape
        E = model.config.num_experts
        eor = float(topk_overlap(ids[:, :, 1:].reshape(-1, K), ids[:, :, :-1].reshape(-1, K))
                    .float().mean()) / K
        per_layer = sim.lru_sweep(ids.reshape(L * W, S, K), [top_k, 2 * top_k])
        keys = (ids + (torch.arange(L, dtype=torch.int32) * E).view(L, 1, 1, 1))
        keys = keys.permute(1, 2, 0, 3).reshape(W, S * L, K).contiguous()
        hits_budget = int(sim.lru_sweep(keys, [budget_slots]).sum())
        accesses = L * W * S * K
        out.append({
            "name": name, "perplexity": math.exp(nll / (W * (S - 1))), "eor": eor,
            "lru_hit_rates": {"K": int(per_layer[0].sum()) / accesses,
                              "2K": int(per_layer[1].sum()) / accesses,
                              "budget": hits_budget / accesses},
            "bytes_read_per_token": (accesses - hits_budget) * slot_bytes / (W * S),
            "strengths": learned.strengths.mean(1).tolist(), "source": learned.source})
        cache[name] = out[-1]
        print(f"  {name}: ppl {out[-1]['perplexity']:.3f} EOR {eor:.3f} "
              f"KB/token {out[-1]['bytes_read_per_token'] / 1024:.0f}", file=sys.stderr)
    return out


HAND_ALLOCATIONS = ([0.0, 0.04, 0.04, 0.04], [0.0, 0.05, 0.05, 0.05], [0.01, 0.05, 0.05, 0.05])


# Pass A (decoded through remoe run's comparison, one interleaved run per text) takes the
# configurations the verdict is about, not the whole sweep: the decode is the slow part.
PASS_A = ("original", "remoe", "original+bias 0.02 previous", "original+bias 0.01 resident",
          "original+bias 0.02 resident", "original+bias 0.03 resident",
          "remoe+bias 0.01 resident")


def layer_probes(layers: int = 4, bias: float = 0.03, source: str = "resident") -> list[tuple]:
    """Pass B only: the fixed bias on one layer at a time (what each layer's reuse costs), and
    per-layer strengths set by hand from those probes (not learned: what a per-layer allocation
    can reach, for comparison with what training found)."""
    probes = [(f"layer {i} only {bias} {source}", None,
               [bias if j == i else 0.0 for j in range(layers)], source) for i in range(layers)]
    if layers == len(HAND_ALLOCATIONS[0]):
        probes += [("by hand " + "/".join(f"{v:g}" for v in a) + f" {source}", None, list(a),
                    source) for a in HAND_ALLOCATIONS]
    return probes


def evaluate(args) -> None:
    import torch

    from remoe_engine.compare import RunSettings, run
    from remoe_engine.zoo import path as zoo_path

    torch.manual_seed(0)
    model = os.fspath(zoo_path("tiny"))
    delta = os.path.join(model, "router-delta.safetensors")
    learned = dict(item.split("=", 1) for item in args.learned)
    rows = rows_for(delta, learned)
    # How each learned delta was trained (its remoe finetune summary beside it, when present).
    learned_configs = {}
    for name, path in learned.items():
        summary = os.path.join(os.path.dirname(path), "remoe-finetune.json")
        if os.path.exists(summary):
            with open(summary) as f:
                s = json.load(f)
            learned_configs[name] = {"config": s["config"], "strengths": s["strengths"],
                                     "train_wall_s": s["train_wall_s"]}
    text, files = transformers_text()
    doc = {"what": __doc__.split("\n\n")[0], "model": "built-in tiny (remoe_engine/zoo/tiny)",
           "tokens": args.tokens, "learned": learned, "command": " ".join(sys.argv),
           "date": datetime.date.today().isoformat(),
           "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "python": platform.python_version()},
           "versions": {"torch": torch.__version__,
                        "transformers": __import__("transformers").__version__},
           "second_text_files": files, "texts": {}, "learned_configs": learned_configs}
    from transformers import AutoTokenizer

    cache = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as f:
            cache = json.load(f)
    from remoe_engine.compare import pool_budget, pool_slot_bytes
    from remoe_engine.evaluation import heldout_ids, windows
    from remoe_engine.store import ExpertStore

    store = ExpertStore.from_checkpoint(model)
    top_k = 4
    slot_bytes = pool_slot_bytes(store)
    budget_slots = pool_budget(store, RunSettings(model=model), top_k) // slot_bytes
    tokenizer = AutoTokenizer.from_pretrained(model)
    doc.update(forward_tokens=args.forward_tokens, budget_slots=budget_slots,
               slots_per_layer=budget_slots // len(store.layers), forward={})
    with tempfile.TemporaryDirectory() as tmp:
        text_file = os.path.join(tmp, "transformers-sources.py.txt")
        with open(text_file, "w") as f:
            f.write(text)
        for name, eval_text in (("held-out", None), ("transformers", text_file)):
            stream = heldout_ids(model, tokenizer, text_file=eval_text,
                                 max_tokens=args.forward_tokens)[0]
            print(f"{name}: pass B, {stream.numel()} tokens", file=sys.stderr)
            key = f"{name} {args.forward_tokens}"
            doc["forward"][name] = forward_rows(model, rows + layer_probes(len(store.layers)),
                                                windows(stream, 256), top_k,
                                                budget_slots, slot_bytes,
                                                budget_slots // len(store.layers),
                                                cache.setdefault(key, {}))
            if args.cache:
                with open(args.cache, "w") as f:
                    json.dump(cache, f)
        if args.forward_only:
            # Keep the decoded runs of an earlier full run of this output (pass A is the slow
            # part; a configuration added later then shows "-" in its decode columns).
            doc["texts"] = {}
            if os.path.exists(args.out):
                with open(args.out) as f:
                    earlier = json.load(f)
                doc["texts"], doc["tokens"] = earlier.get("texts", {}), earlier.get("tokens")
                doc["decode_command"] = earlier.get("decode_command", earlier.get("command"))
        for name, eval_text in (() if args.forward_only else
                                (("held-out", None), ("transformers", text_file))):
            decoded = [r for r in rows if r[0] in PASS_A or r[0].startswith("learned")]
            settings = RunSettings(model=model, rows=decoded, eval_tokens=args.tokens,
                                   eval_text=eval_text, max_new_tokens=4,
                                   progress=not args.no_progress)
            report = run(settings, log=lambda s: print(s, file=sys.stderr))
            for r in report["rows"]:
                r.pop("text", None)
            doc["texts"][name] = report
            print(f"{name}: done", file=sys.stderr)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp_out, args.out)


# ---- report -----------------------------------------------------------------------------------


def _changes(doc: dict, text: str) -> list[dict]:
    """Per configuration on one text: pass B's perplexity, EOR, LRU rates and KB/token (and
    their changes against the original router), pass A's pool reads, hit rate and TPOT."""
    fwd = doc["forward"][text]
    run_rows = {r["name"]: r for r in doc["texts"].get(text, {}).get("rows", [])}
    base, base_a = fwd[0], run_rows.get(fwd[0]["name"])
    out = []
    for r in fwd:
        a = run_rows.get(r["name"])
        out.append({
            "name": r["name"], "ppl": r["perplexity"],
            "dppl": 100 * (r["perplexity"] / base["perplexity"] - 1),
            "kb": r["bytes_read_per_token"] / 1024,
            "dkb": 100 * (r["bytes_read_per_token"] / base["bytes_read_per_token"] - 1),
            "eor": r["eor"], "lru": r["lru_hit_rates"], "strengths": r["strengths"],
            "source": r["source"],
            "run_kb": None if a is None else a["bytes_read_per_token"] / 1024,
            "run_dkb": None if a is None or base_a is None else
            100 * (a["bytes_read_per_token"] / base_a["bytes_read_per_token"] - 1),
            "run_dppl": None if a is None or base_a is None else
            100 * (a["perplexity"] / base_a["perplexity"] - 1),
            "tpot": None if a is None else a["tpot_ms"],
            "hit": None if a is None else a["hit_rate"]})
    return out


def verdict(doc: dict) -> list[str]:
    """One line per learned row and for the best fixed configuration: does it meet the target
    on both texts (perplexity change <= +0.5%, KB/token at the budget <= -35%)?"""
    texts = {t: {c["name"]: c for c in _changes(doc, t)} for t in doc["forward"]}
    names = list(next(iter(texts.values())))

    def ok(name):
        return all(t[name]["dppl"] <= TARGET_PPL for t in texts.values())

    fixed = [n for n in names if "+bias" in n]
    best = min((n for n in fixed if ok(n)), key=lambda n: max(t[n]["dkb"] for t in
                                                              texts.values()), default=None)
    lines = []
    for name in [n for n in names if n.startswith("learned")] + ([best] if best else []):
        parts = [f"{t}: perplexity {texts[t][name]['dppl']:+.2f}%, KB/token "
                 f"{texts[t][name]['dkb']:+.1f}%" for t in texts]
        met = ok(name) and all(t[name]["dkb"] <= TARGET_KB for t in texts.values())
        tag = ("the fixed configuration with the fewest KB/token within +0.5% perplexity on "
               "both texts" if name == best else "learned")
        lines.append(f"- `{name}` ({tag}): " + "; ".join(parts)
                     + (": meets the target." if met else ": misses the target."))
    return lines


def table(doc: dict, path: str) -> list[str]:
    """The markdown tables, one per text (README and model card)."""
    lines = [f"**Learned reuse bias, CPU** ([`{path}`]({path}), {doc['date']}): the built-in "
             f"model at the `remoe run` budget ({doc['budget_slots']} slots in one LRU pool, "
             f"a quarter of the experts). ppl, EOR, LRU and KB/token: {doc['forward_tokens']} "
             "tokens per text in 256-token windows, experts selected exactly as decode selects "
             "them (batched teacher-forced forwards through the selection that "
             "tests/test_learned_bias.py checks against token-by-token decode; 'resident' "
             f"prefers a {doc['slots_per_layer']}-slot LRU pool per layer, the budget's share), "
             "the routing replayed through the simulator's LRU (K, 2K: per layer; budget: one "
             "global pool; KB/token: its misses). Pool KB/token and TPOT (the main configurations "
             f"and the learned ones): {doc['tokens']} tokens decoded one at a time with the KV "
             "cache through `remoe run`'s comparison, in one interleaved run per text (experts "
             "read from disk by the real pool under the budget). Changes are against the "
             "original router on the same text. 'layer i only' and 'by hand' rows are not "
             "learned: the fixed bias on one layer, and per-layer strengths set from those "
             "probes.", ""]
    for text in doc["forward"]:
        lines += [f"*{text}*", "",
                  "| configuration | strength(s) | ppl (change) | EOR | LRU K / 2K / budget | "
                  "KB/token (change) | pool KB/token (change), decode | TPOT ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in _changes(doc, text):
            s = c["strengths"]
            strength = ("-" if not any(s) else f"{s[0]:g} {c['source']}" if len(set(s)) == 1
                        else "/".join(f"{v:.3f}" for v in s) + f" {c['source']}")
            lru = c["lru"]
            run = ("-" if c["run_kb"] is None else f"{c['run_kb']:.0f} ({c['run_dkb']:+.1f}%)")
            tpot = "-" if c["tpot"] is None else f"{c['tpot']:.2f}"
            lines.append(f"| {c['name']} | {strength} | {c['ppl']:.3f} ({c['dppl']:+.2f}%) | "
                         f"{c['eor']:.3f} | {lru['K']:.3f} / {lru['2K']:.3f} / "
                         f"{lru['budget']:.3f} | {c['kb']:.0f} ({c['dkb']:+.1f}%) | {run} | "
                         f"{tpot} |")
        lines.append("")
    return lines[:-1]


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["forward"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names) + 3, 4.6), dpi=110)
    for ax, t in zip(axes, names, strict=True):
        changes = _changes(doc, t)
        groups: dict[str, list] = {}
        for c in changes:
            if c["name"].startswith("layer "):
                continue  # the per-layer probes are in the table, not on the front
            parts = c["name"].split()
            key = (f"{parts[0]} ({parts[2]})" if len(parts) == 3 and "+bias" in parts[0]
                   else c["name"])
            groups.setdefault(key, []).append(c)
        markers = iter("osD^v<>P*Xh")
        for key, pts in groups.items():
            if len(pts) > 1:
                base = next(c for c in changes if c["name"] == key.split("+")[0])
                pts = [base] + sorted(pts, key=lambda c: c["strengths"][0])
                ax.plot([c["kb"] for c in pts], [c["dppl"] for c in pts], marker="o", ms=4,
                        ls="-" if "previous" in key else "--", label=key)
            else:
                star = key.startswith("learned")
                ax.scatter([pts[0]["kb"]], [pts[0]["dppl"]], s=140 if star else 60,
                           marker="*" if star else next(markers), zorder=5, label=key,
                           color="black" if key == "original" else None)
        base_kb = changes[0]["kb"]
        ax.axhline(TARGET_PPL, color="grey", lw=0.8, ls=":")
        ax.axvline(base_kb * (1 + TARGET_KB / 100), color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KB read per token at the remoe run budget (LRU replay)")
        ax.set_ylabel("perplexity change vs original (%)")
        ax.set_title(f"{t} ({doc['forward_tokens']} tokens)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Bytes per token vs perplexity (dotted: the issue's target, lower-left wins)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def card_section(doc: dict, path: str) -> str:
    lines = [CARD_BEGIN, "", "## Learned reuse bias (reuse-bias-delta.safetensors)", "",
             "Generated by `bench/experiments/learned_bias.py report` from "
             f"`{path}`; do not edit by hand. The shipped `reuse-bias-delta.safetensors` is the "
             f"row `{SHIPPED}` (`remoe run` shows it as \"learned\"). Load it with "
             "`remoe_engine.apply_router_delta(remoe_engine.load(path, memory_budget=...), "
             "path / 'reuse-bias-delta.safetensors')`: it holds this model's router weights "
             "unchanged and one reuse-bias strength per MoE layer, for the resident experts.",
             ""]
    lines += table(doc, path)
    lines += ["", "Verdict against the target (perplexity within +0.5% on both texts and KB "
              "read per token at the budget at least 35% below the original router):", ""]
    lines += verdict(doc)
    lines += ["", "![KB per token vs perplexity](../../../docs/img/learned_bias_pareto.png)", "",
              CARD_END]
    return "\n".join(lines)


def write_card(section: str, card: str = CARD) -> None:
    """Put the section into the card, before the ReMoE section (which
    bench/experiments/finetune_sweep.py keeps at the end of the card), replacing an earlier one."""
    with open(card) as f:
        text = f.read()
    if CARD_BEGIN in text:
        head, rest = text.split(CARD_BEGIN, 1)
        _, tail = rest.split(CARD_END, 1)
        text = head.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    remoe = "<!-- remoe-finetune:begin"
    if remoe in text:
        head, tail = text.split(remoe, 1)
        text = head.rstrip("\n") + "\n\n" + section + "\n\n" + remoe + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(card, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def report(args) -> None:
    with open(args.results) as f:
        doc = json.load(f)
    rel = os.path.relpath(os.path.abspath(args.results), ROOT)
    plot(doc, PLOT)
    write_card(card_section(doc, rel))
    print("\n".join(table(doc, rel) + [""] + verdict(doc)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    e = sub.add_parser("eval")
    e.add_argument("--learned", action="append", default=[],
                   help="NAME=router-delta.safetensors with a learned bias (repeatable)")
    e.add_argument("--tokens", type=int, default=512,
                   help="tokens per text decoded one at a time (pass A, remoe run)")
    e.add_argument("--forward-tokens", type=int, default=16384,
                   help="tokens per text of pass B (batched, selection as at decode)")
    e.add_argument("--forward-only", action="store_true")
    e.add_argument("--cache", default=None,
                   help="JSON file of pass B rows already measured (read, then updated): a "
                   "configuration is measured once however many runs ask for it")
    e.add_argument("--out", required=True)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=evaluate)
    r = sub.add_parser("report")
    r.add_argument("results")
    r.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
