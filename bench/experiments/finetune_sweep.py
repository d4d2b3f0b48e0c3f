"""The evidence runs on the built-in model: a lambda sweep with controls, and the decode comparison.

    python bench/experiments/finetune_sweep.py sweep --out bench/results/finetune-sweep.json
    python bench/experiments/finetune_sweep.py compare --delta DIR \
        --out bench/results/finetune-compare.json

`sweep` fine-tunes the routers of the built-in tiny model once per recipe (controls included:
cross-entropy only, and the recipe without trust-KL), evaluates each on the same held-out windows
(teacher-forced; the zoo's held-out split, so perplexities are the card's definition) and writes
one JSON row per run as it goes, then the Pareto plot (EOR gain against perplexity change).
`compare` is the honest comparison with the inference-time reuse bias: every variant decoded token
by token with the KV cache on the same held-out windows (`remoe_engine.evaluation.decode_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import torch

from remoe_engine import evaluation as ev
from remoe_engine.finetune import data as fdata
from remoe_engine.finetune.config import ReMoEConfig
from remoe_engine.finetune.delta import apply_router_delta

# name -> (kind, overrides of the common settings). "control" rows are drawn differently.
# Every setting explicit (not the ReMoEConfig defaults, which this sweep chose), so a recipe's
# name keeps meaning what it says when the defaults change. The lambdas are the orientation
# recipe of docs/design.md section 7.
COMMON = dict(steps=150, batch=8, seq_len=128, lr=1e-3, lr_warmup=0.1, locality_warmup=0.2,
              save_every=0, lambda_kl=1.0, lambda_reuse=1.0, lambda_smooth=0.1, lambda_lag=0.05,
              lambda_ws=0.05, lags=(1, 2, 4, 8, 16), window=16, weight_decay=0.0,
              grad_clip=1.0, seed=0)
RECIPES: dict[str, tuple[str, dict]] = {
    "orientation (kl1 r1 s.1 l.05 w.05)": ("recipe", {}),
    "CE-only control": ("control", dict(lambda_kl=0.0, lambda_reuse=0.0, lambda_smooth=0.0,
                                        lambda_lag=0.0, lambda_ws=0.0)),
    "no trust-KL (kl0)": ("control", dict(lambda_kl=0.0)),
    "no trust-KL (kl0 r2.5)": ("control", dict(lambda_kl=0.0, lambda_reuse=2.5)),
    "no trust-KL of the default (kl0 r1.5)": ("control", dict(lambda_kl=0.0, lambda_reuse=1.5)),
    "reuse x2 (r2)": ("recipe", dict(lambda_reuse=2.0)),
    "reuse x2, trust x3 (kl3 r2)": ("recipe", dict(lambda_kl=3.0, lambda_reuse=2.0)),
    "reuse only (r1, s=l=w=0)": ("recipe", dict(lambda_smooth=0.0, lambda_lag=0.0,
                                                lambda_ws=0.0)),
    "smooth x5 (s.5 l.25)": ("recipe", dict(lambda_smooth=0.5, lambda_lag=0.25)),
    "lr 3e-4 (kl1 r2)": ("recipe", dict(lambda_reuse=2.0, lr=3e-4)),
    "kl5 r2": ("recipe", dict(lambda_kl=5.0, lambda_reuse=2.0)),
    "kl10 r3": ("recipe", dict(lambda_kl=10.0, lambda_reuse=3.0)),
    "kl3 r2, 450 steps at lr 3e-4": ("recipe", dict(lambda_kl=3.0, lambda_reuse=2.0, lr=3e-4,
                                                     steps=450)),
    "kl3 r1 at lr 3e-4": ("recipe", dict(lambda_kl=3.0, lr=3e-4)),
    "kl5 r2 at lr 5e-4": ("recipe", dict(lambda_kl=5.0, lambda_reuse=2.0, lr=5e-4)),
    # Seed repeats of the two candidates for the default: how noisy is one run?
    "kl10 r3, seed 1": ("recipe", dict(lambda_kl=10.0, lambda_reuse=3.0, seed=1)),
    "kl10 r3, seed 2": ("recipe", dict(lambda_kl=10.0, lambda_reuse=3.0, seed=2)),
    "kl3 r1 at lr 3e-4, seed 1": ("recipe", dict(lambda_kl=3.0, lr=3e-4, seed=1)),
    "kl10 r2.5": ("recipe", dict(lambda_kl=10.0, lambda_reuse=2.5)),
    "kl10 r2": ("recipe", dict(lambda_kl=10.0, lambda_reuse=2.0)),
    "kl10 r1.5": ("recipe", dict(lambda_kl=10.0, lambda_reuse=1.5)),
    "kl10 r1.5, seed 1": ("recipe", dict(lambda_kl=10.0, lambda_reuse=1.5, seed=1)),
    "kl20 r3": ("recipe", dict(lambda_kl=20.0, lambda_reuse=3.0)),
}


def _atomic_json(doc: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _machine() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _data(model: pathlib.Path | None, eval_tokens: int, seq_len: int = 256):
    from transformers import AutoTokenizer

    import remoe_engine.zoo as zoo
    from remoe_engine.evaluation import windows

    path = model if model is not None else zoo.path("tiny")
    tok = AutoTokenizer.from_pretrained(path)
    train, held = fdata.zoo_split_texts(fdata.load_card(path))
    return path, fdata.encode(tok, train), windows(fdata.encode(tok, held), seq_len, eval_tokens)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _slim(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("eor_per_layer",)} | {
        "eor_per_layer": report["eor_per_layer"]}


def sweep(model: pathlib.Path | None, out: pathlib.Path, work: pathlib.Path, eval_tokens: int,
          names: list[str] | None, plot: pathlib.Path | None, chosen: str | None = None) -> None:
    from remoe_engine.finetune.train import finetune

    path, stream, wins = _data(model, eval_tokens)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    base_model = _model(path)
    top_k = int(base_model.config.num_experts_per_tok)
    base, base_trace = ev.teacher_forced(base_model, wins)
    if "original" not in doc:
        doc = {"what": "ReMoE lambda sweep on the built-in tiny model (teacher-forced held-out)",
               "model": os.fspath(path), "held_out_tokens": int(wins.numel()),
               "machine": _machine(), "top_k": top_k,
               "original": _slim(base), "runs": {}}
        _atomic_json(doc, out)
    for name, (kind, overrides) in RECIPES.items():
        if names and name not in names:
            continue
        if name in doc["runs"]:
            continue
        cfg = ReMoEConfig(**{**COMMON, **overrides})
        run_dir = work / "".join(c if c.isalnum() else "_" for c in name)
        print(f"== {name}: {cfg.to_dict()}", flush=True)
        t0 = time.perf_counter()
        summary = finetune(path, run_dir, stream, cfg, resume=True, progress=True,
                           log=lambda s: print(s, flush=True))
        train_s = time.perf_counter() - t0
        model = apply_router_delta(_model(path), run_dir / "router-delta.safetensors")
        report, _ = ev.teacher_forced(model, wins, reference=base_trace)
        doc["runs"][name] = {"kind": kind, "config": cfg.to_dict(), "train_s": round(train_s, 1),
                             "final_train": summary["history"][-1], "report": _slim(report),
                             "dir": os.fspath(run_dir)}
        _atomic_json(doc, out)
        b = doc["original"]
        dppl = 100 * (report["perplexity"] / b["perplexity"] - 1)
        print(f"   ppl {report['perplexity']:.3f} ({dppl:+.2f}%) EOR {report['eor']:.3f} "
              f"({100 * (report['eor'] / b['eor'] - 1):+.1f}%) "
              f"LRU@2K {report['hit_rates']['lru'][str(2 * top_k)]:.3f}", flush=True)
    if chosen is not None:
        doc["chosen"] = chosen
        _atomic_json(doc, out)
    if plot is not None:
        plot_pareto(doc, plot)


def plot_pareto(doc: dict, path: pathlib.Path) -> None:
    """EOR gain (%) against perplexity change (%) per run; controls and the chosen default marked.

    Args:
        doc: the sweep JSON.
        path: image file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = doc["original"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    ax.scatter([0], [0], marker="*", s=160, color="black", label="original router", zorder=3)
    chosen = doc.get("chosen")
    # Points sit close together: number them on the plot, name them in the legend.
    for i, (name, run) in enumerate(doc["runs"].items(), 1):
        r = run["report"]
        x = 100 * (r["perplexity"] / base["perplexity"] - 1)
        y = 100 * (r["eor"] / base["eor"] - 1)
        control = run["kind"] == "control"
        label = f"{i}: {name}" + (" (control)" if control and "control" not in name else "") + (
            " [default]" if name == chosen else "")
        ax.scatter([x], [y], marker="x" if control else ("D" if name == chosen else "o"),
                   s=80 if name == chosen else 40, color="tab:red" if control else
                   ("tab:green" if name == chosen else "tab:blue"), zorder=3, label=label)
        ax.annotate(str(i), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.axvline(1.0, color="gray", ls="--", lw=0.8)
    ax.axhline(40.0, color="gray", ls=":", lw=0.8)
    ax.text(1.02, ax.get_ylim()[0], " ppl +1%", fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("held-out perplexity change vs original (%)")
    ax.set_ylabel("EOR gain vs original (%)")
    ax.set_title(f"ReMoE router fine-tuning on the built-in tiny model "
                 f"({doc['held_out_tokens']} held-out tokens)\nblue: recipes, red x: controls, "
                 "dotted: +40% EOR target", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(path))
    plt.close(fig)


def compare(model: pathlib.Path | None, delta: pathlib.Path, out: pathlib.Path, tokens: int,
            biases: list[float], sources: list[str], plot: pathlib.Path | None) -> None:
    """Decode-loop comparison: original +- bias, ReMoE router +- bias (see the module docstring)."""
    path, _, wins = _data(model, tokens)
    base_model = _model(path)
    top_k = int(base_model.config.num_experts_per_tok)
    original = ev.frozen_routers(base_model)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "what": "token-by-token decode loop (KV cache, teacher-forced) on held-out windows; "
                "agreement/KL vs the original router on the same hidden states; pool of 2K slots "
                "per layer (what 'resident' prefers)", "tokens": int(wins.numel()),
        "windows": int(wins.shape[0]), "machine": _machine(), "rows": {}}
    variants = [("original", None, 0.0, "previous"), ("ReMoE", delta, 0.0, "previous")]
    for src in sources:
        for b in biases:
            variants.append((f"original + bias {b:g} {src}", None, b, src))
    for src in sources:
        for b in biases:
            variants.append((f"ReMoE + bias {b:g} {src}", delta, b, src))
    for label, d, b, src in variants:
        if label in doc["rows"]:
            continue
        model = _model(path)
        if d is not None:
            apply_router_delta(model, d)
        t0 = time.perf_counter()
        report = ev.decode_report(model, wins, original, reuse_bias=b, bias_source=src,
                                label=label)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        doc["rows"][label] = report
        _atomic_json(doc, out)
        print(f"{label:<36} ppl {report['perplexity']:.3f} EOR {report['eor']:.3f} "
              f"LRU@2K {report['hit_rates']['lru'][str(2 * top_k)]:.3f} "
              f"agree {report['topk_agreement']:.3f}", flush=True)
    if plot is not None:
        rows = list(doc["rows"].items())
        ev.plot_report(rows, doc["rows"]["original"], top_k, plot,
                       title=f"built-in tiny model, decode loop ({doc['tokens']} held-out tokens, "
                       "KV cache, bias fed back): reuse bias vs ReMoE router vs both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--out", type=pathlib.Path, required=True)
    s.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/remoe-sweep"))
    s.add_argument("--eval-tokens", type=int, default=32768)
    s.add_argument("--only", action="append", default=None)
    s.add_argument("--plot", type=pathlib.Path, default=None)
    s.add_argument("--chosen", default=None, help="the recipe shipped as the default")
    c = sub.add_parser("compare")
    c.add_argument("--delta", type=pathlib.Path, required=True)
    c.add_argument("--out", type=pathlib.Path, required=True)
    c.add_argument("--tokens", type=int, default=4096)
    c.add_argument("--bias", default="0.01,0.02,0.05,0.1")
    c.add_argument("--source", default="previous,resident")
    c.add_argument("--plot", type=pathlib.Path, default=None)
    c.add_argument("--threads", type=int, default=1)
    s.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("card")
    k.add_argument("--final", type=pathlib.Path, required=True)
    k.add_argument("--chosen", required=True)
    k.add_argument("--sweep", type=pathlib.Path, default=None)
    k.add_argument("--compare", type=pathlib.Path, default=None)
    k.add_argument("--verdict", type=pathlib.Path, required=True)
    k.add_argument("--full", type=pathlib.Path, default=None,
                   help="remoe eval report.json of the shipped delta on the whole held-out split")
    k.add_argument("--frontier", type=pathlib.Path, default=None,
                   help="bench/experiments/remoe_frontier.py results (loss variants)")
    k.add_argument("--card", type=pathlib.Path, required=True)
    k.add_argument("--ship", type=pathlib.Path, default=None,
                   help="copy the chosen run's router delta here")
    k.add_argument("--threads", type=int, default=1)
    for p in (s, c):
        p.add_argument("--model", type=pathlib.Path, default=None,
                       help="checkpoint folder (default: the built-in tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cmd == "card":
        final = json.loads(args.final.read_text())
        load = lambda f: None if f is None else json.loads(f.read_text())  # noqa: E731
        write_card(args.card, card_section(final, args.chosen, load(args.sweep),
                                           load(args.compare), args.verdict.read_text(),
                                           load(args.full), load(args.frontier)))
        if args.ship is not None:
            import shutil

            src = pathlib.Path(final["runs"][args.chosen]["dir"]) / "router-delta.safetensors"
            tmp = args.ship.with_name(args.ship.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, args.ship)
    elif args.cmd == "sweep":
        sweep(args.model, args.out, args.work, args.eval_tokens, args.only, args.plot,
              args.chosen)
    else:
        biases = [float(x) for x in args.bias.split(",")]
        compare(args.model, args.delta, args.out, args.tokens, biases, args.source.split(","),
                args.plot)



# ---- the model card section (generated from the result files, never typed) --------------------

CARD_BEGIN = ("<!-- remoe-finetune:begin (generated by python bench/experiments/finetune_sweep.py "
              "card) -->")
CARD_END = "<!-- remoe-finetune:end -->"


def _row(label: str, r: dict, base: dict, k2: str) -> str:
    agree = "-" if r.get("topk_agreement") is None else f"{r['topk_agreement']:.3f}"
    kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
    lru, b_lru = r["hit_rates"]["lru"][k2], base["hit_rates"]["lru"][k2]
    dppl = 100 * (r["perplexity"] / base["perplexity"] - 1)
    deor = 100 * (r["eor"] / base["eor"] - 1)
    return (f"| {label} | {r['perplexity']:.3f} | {dppl:+.2f}% | {r['eor']:.3f} | {deor:+.1f}% "
            f"| {lru:.3f} "
            f"| {100 * (lru / b_lru - 1):+.1f}% | {r['hit_rates']['lfu'][k2]:.3f} "
            f"| {r['hit_rates']['opt'][k2]:.3f} | {agree} | {kl} |")


def card_section(final: dict, chosen: str, sweep_doc: dict | None, compare_doc: dict | None,
                 verdict: str, full_doc: dict | None = None,
                 frontier_doc: dict | None = None) -> str:
    """The model card's ReMoE section, in markdown, from the result files.

    Args:
        final: the sweep-format JSON of the final runs on this model (the shipped recipe and the
            controls), evaluated on the larger held-out set.
        chosen: the run name of the shipped recipe in `final`.
        sweep_doc: the sweep JSON (all sweep points), or None.
        compare_doc: the decode comparison JSON, or None.
        verdict: prose written after reading the numbers (where each lever wins, defaults).
        full_doc: `remoe eval --finetuned <shipped delta> --out DIR` report.json on the whole
            held-out split, or None.
        frontier_doc: `bench/experiments/remoe_frontier.py` results (loss variants), or None.

    Returns:
        Markdown between CARD_BEGIN and CARD_END.
    """
    top_k = final["top_k"]
    shipped = final["runs"][chosen]
    final = {"top_k": top_k, "original": final["original"], "config": shipped["config"],
             "train_s": shipped["train_s"], "machine": final["machine"],
             "held_out_tokens": final["held_out_tokens"], "seq_len": final["original"]["seq_len"],
             "rows": {"original": final["original"],
                      f"ReMoE, shipped ({chosen})": shipped["report"],
                      # Seed repeats of the shipped recipe, then the controls.
                      **{name: run["report"] for name, run in final["runs"].items()
                         if name.startswith(chosen + ", seed")},
                      **{name + ("" if "control" in name else " (control)"): run["report"]
                         for name, run in
                         final["runs"].items() if run["kind"] == "control"}}}
    k2 = str(2 * final["top_k"])
    head = ("| router | ppl | d ppl | EOR | d EOR | LRU@2K | d LRU | LFU@2K | OPT@2K | top-k agree "
            "| KL to original |\n|---|---|---|---|---|---|---|---|---|---|---|")
    base = final["original"]
    lines = [CARD_BEGIN, "", "## ReMoE router fine-tuning (router-delta.safetensors)", "",
             "This section was added by the ReMoE fine-tuning work (issue 7); everything above it "
             "describes the pretrained model itself.", "",
             "`router-delta.safetensors` holds only the 4 router weights [32, 128] of this model, "
             "fine-tuned with the ReMoE loss (docs/design.md section 7) so that consecutive tokens "
             "reuse experts. Load it with:", "", "```python",
             "import remoe_engine.zoo",
             "from remoe_engine.finetune import apply_router_delta",
             "delta = remoe_engine.zoo.path('tiny') / 'router-delta.safetensors'",
             "apply_router_delta(model, delta)",
             "```", "",
             f"Recipe (the `ReMoEConfig` defaults): `{json.dumps(final['config'])}`, trained on "
             f"this model's own training split; {final['train_s']:.0f} s on "
             f"{final['machine']['threads']} CPU thread(s).", "",
             f"### Teacher-forced held-out evaluation (the first {final['held_out_tokens']:,} "
             f"tokens of the held-out stream, windows of {final['seq_len']}; the card's "
             "perplexity definition on that prefix)", "",
             f"LRU/LFU/OPT at {k2} slots per layer (2 x top-k) from the cache simulator on "
             "held-out traces; top-k agreement and KL against the original router's trace of the "
             "same tokens.", "", head]
    for label, r in final["rows"].items():
        lines.append(_row(label, r, base, k2))
    if full_doc is not None:
        tf = full_doc["teacher_forced"]
        fb = tf["original"]
        lines += ["", f"The shipped delta on the whole held-out split ({fb['tokens']:,} tokens, "
                  "exactly the card's perplexity and EOR definitions; `remoe eval`, data: "
                  "`bench/results/finetune-eval-full-heldout.json`):", "", head]
        for label, r in tf.items():
            lines.append(_row(label, r, fb, k2))
    if sweep_doc is not None:
        lines += ["", f"### Lambda sweep ({sweep_doc['held_out_tokens']:,} held-out tokens)", "",
                  "![ReMoE sweep: EOR gain vs perplexity change]"
                  "(../../../docs/img/remoe_pareto.png)",
                  "", "Data: `bench/results/finetune-sweep.json`.", "", head]
        sb = sweep_doc["original"]
        lines.append(_row("original", sb, sb, k2))
        for name, run in sweep_doc["runs"].items():
            control = run["kind"] == "control" and "control" not in name
            lines.append(_row(name + (" (control)" if control else ""),
                              run["report"], sb, k2))
    if frontier_doc is not None:
        fb = frontier_doc["original"]
        lines += ["", "### Can another loss do better? A frontier study "
                  f"({frontier_doc['held_out_tokens']:,} held-out tokens)", "",
                  "Every sweep point above lies near one curve. To tell whether that curve belongs "
                  "to the loss or to router-only fine-tuning on this model, each variant below "
                  "changes one thing: the reuse mass counted only on previous-token experts not "
                  "already chosen (`new-only`), no locality term on layer 0 (`no layer 0`), a push "
                  "only near the top-k boundary, the forward KL as trust, an extra trust on the "
                  "top-k weights, 256-token windows, 4x the steps, and a straight-through "
                  "soft top-k that lets the cross-entropy see which flips hurt. The `layer k only` "
                  "rows put the whole locality term on one layer. Script, definitions and "
                  "command: `bench/experiments/remoe_frontier.py`; data: "
                  "`bench/results/finetune-frontier.json`.", "",
                  "![loss variants vs the lambda sweep](../../../docs/img/remoe_frontier.png)", "",
                  head]
        lines.append(_row("original", fb, fb, k2))
        for name, run in frontier_doc["runs"].items():
            lines.append(_row(name, run["report"], fb, k2))
    if compare_doc is not None:
        rows = compare_doc["rows"]
        lines += ["", "### The honest comparison: inference-time reuse bias vs ReMoE router", "",
                  f"Token by token with the KV cache (the bias feeds back through the layers), "
                  f"teacher-forced on {compare_doc['tokens']:,} held-out tokens "
                  f"({compare_doc['windows']} windows); the slot pool holds {k2} experts per layer "
                  "(what `resident` prefers). Agreement and KL are against the original router "
                  "on the same hidden states. The bias adds to the softmax probability of the "
                  "preferred experts for selection only. Data: "
                  "`bench/results/finetune-compare.json`; plot: "
                  "`docs/img/remoe_compare.png`.", "",
                  "![decode comparison](../../../docs/img/remoe_compare.png)", "", head]
        for label, r in rows.items():
            lines.append(_row(label, r, rows["original"], k2))
    lines += ["", "### Verdict", "", verdict.strip(), "", CARD_END, ""]
    return "\n".join(lines)


def write_card(card: pathlib.Path, section: str) -> None:
    """Append the section to the card, or replace the previously generated one (atomically)."""
    text = card.read_text()
    if CARD_BEGIN in text:
        text = text[: text.index(CARD_BEGIN)].rstrip() + "\n"
    text = text.rstrip() + "\n\n" + section
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, card)


if __name__ == "__main__":
    main()
