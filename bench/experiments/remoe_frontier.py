"""Can a different ReMoE loss buy more expert reuse per unit of perplexity? A frontier study.

The lambda sweep (`python bench/experiments/finetune_sweep.py sweep`) moves along one curve: on the
built-in tiny model every recipe of the method's loss gives roughly +20-25% EOR per 1% held-out
perplexity, short of the issue's target (+40% within 1%). This study asks whether the curve is a
property of the loss or of router-only fine-tuning on this model. Each variant changes one thing;
all are trained on the model's training split and scored on the same 65,536 held-out tokens as the
sweep (teacher-forced, the model card's definitions):

- `new-only`: the reuse mass counts only previous-token experts the token has not already chosen
  (the gradient no longer sharpens the weights among experts that are already shared: in the
  shipped delta about half the perplexity cost came from changed weights, not changed selection);
- `no layer 0`: per-layer locality weights, layer 0 excluded (alone, it costs ~5x more
  perplexity per EOR point than layer 1: see the `layer k only` rows);
- `boundary`: push only previous experts whose probability is within delta of the k-th chosen one
  (what the inference-time bias flips);
- `forward KL`: trust as KL(P_ref || P) instead of KL(P || P_ref);
- `weight trust`: an extra KL between the renormalised top-k weights of the two routers;
- `seq 256`, `600 steps`: more context per window, 4x the steps at half the learning rate;
- `straight-through`: the cross-entropy reaches the selection: the forward is the model's, the
  backward goes through a soft top-k over all experts' outputs (dense, so only for this tiny
  Qwen3-MoE), so the loss sees which flips hurt.

Run (about 15 minutes on 2 CPU cores with two shards in parallel):

    python bench/experiments/remoe_frontier.py run --out bench/results/finetune-frontier.json \
        --shard 0/2 & python bench/experiments/remoe_frontier.py run \
        --out bench/results/finetune-frontier.json --shard 1/2; wait
    python bench/experiments/remoe_frontier.py decompose \
        --out bench/results/finetune-frontier.json \
        --delta remoe_engine/zoo/tiny/router-delta.safetensors
    python bench/experiments/remoe_frontier.py probe --out bench/results/finetune-frontier.json
    python bench/experiments/remoe_frontier.py plot --out bench/results/finetune-frontier.json \
        --sweep bench/results/finetune-sweep.json --plot docs/img/remoe_frontier.png

Rows are appended under a file lock as runs finish; a rerun skips rows already present.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import tempfile
import time

import finetune_sweep as sw  # bench/experiments/finetune_sweep.py, next to this file
import torch

from remoe_engine import evaluation as ev
from remoe_engine.finetune.config import ReMoEConfig
from remoe_engine.finetune.loss import EPS, layer_terms
from remoe_engine.finetune.train import finetune, load_checkpoint

EVAL_TOKENS = 65536  # the sweep's held-out prefix
NO_LAYER0 = [0.0, 4 / 3, 4 / 3, 4 / 3]  # same total locality weight as uniform over 4 layers

# name -> (ReMoEConfig overrides on top of sw.COMMON, loss-variant options)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "method kl10 r1.5 (shipped recipe)": (dict(lambda_kl=10.0, lambda_reuse=1.5), {}),
    "method kl10 r3": (dict(lambda_kl=10.0, lambda_reuse=3.0), {}),
    "new-only r1.5": (dict(lambda_kl=10.0, lambda_reuse=1.5), dict(new_only=True)),
    "new-only r3": (dict(lambda_kl=10.0, lambda_reuse=3.0), dict(new_only=True)),
    "new-only r6": (dict(lambda_kl=10.0, lambda_reuse=6.0), dict(new_only=True)),
    "new-only r3, no layer 0": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                                dict(new_only=True, layer_weights=NO_LAYER0)),
    "new-only r6, no layer 0": (dict(lambda_kl=10.0, lambda_reuse=6.0),
                                dict(new_only=True, layer_weights=NO_LAYER0)),
    "new-only r3, no layer 0, boundary 0.02": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                                              dict(new_only=True, layer_weights=NO_LAYER0,
                                                   boundary=0.02)),
    **{f"new-only r{r:g}, no layer 0, boundary {d:g}": (
        dict(lambda_kl=10.0, lambda_reuse=float(r)),
        dict(new_only=True, layer_weights=NO_LAYER0, boundary=d))
       for r, d in ((5, 0.02), (8, 0.02), (10, 0.02), (30, 0.02), (10, 0.04))},
    "new-only r3, no layer 0, forward KL": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                                            dict(new_only=True, layer_weights=NO_LAYER0,
                                                 forward_kl=True)),
    "new-only r3, weight trust": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                                  dict(new_only=True, weight_trust=1.0)),
    "new-only r3, no layer 0, seq 256": (dict(lambda_kl=10.0, lambda_reuse=3.0, seq_len=256),
                                         dict(new_only=True, layer_weights=NO_LAYER0)),
    "new-only r3, 600 steps at lr 5e-4": (dict(lambda_kl=10.0, lambda_reuse=3.0, steps=600,
                                               lr=5e-4), dict(new_only=True)),
    "straight-through kl10 r3, no layer 0": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                                             dict(new_only=True, layer_weights=NO_LAYER0,
                                                  straight_through=0.5)),
    "straight-through kl3 r3, no layer 0": (dict(lambda_kl=3.0, lambda_reuse=3.0),
                                            dict(new_only=True, layer_weights=NO_LAYER0,
                                                 straight_through=0.5)),
    **{f"layer {k} only": (dict(lambda_kl=10.0, lambda_reuse=3.0),
                           dict(new_only=True, layer_weights=[4.0 if i == k else 0.0
                                                              for i in range(4)]))
       for k in range(4)},
}


def make_terms_fn(opts: dict):
    """A `finetune(terms_fn=...)` implementing the variant options on top of the method's terms."""

    def terms_fn(logits, ids, ref_logits, cfg, layer):
        terms = layer_terms(logits, ids, ref_logits, cfg)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, S, E]
        top_k = ids.shape[-1]
        if opts.get("new_only"):
            prev, cur = ids[:, :-1], ids[:, 1:]  # [B, S-1, K]
            shared = (prev.unsqueeze(-1) == cur.unsqueeze(-2)).any(-1)  # prev id already chosen
            p = logp[:, 1:].exp().gather(-1, prev)  # [B, S-1, K]
            pushed = ~shared
            if opts.get("boundary"):
                kth = logp[:, 1:].exp().gather(-1, cur).min(-1, keepdim=True).values
                pushed = pushed & ((kth - p).detach() < opts["boundary"])
            mass = torch.where(pushed, p, p.detach()).sum(-1) / top_k
            terms["reuse"] = -torch.log(mass.mean() + EPS)
        if ref_logits is not None and opts.get("forward_kl"):
            logr = torch.log_softmax(ref_logits.float(), dim=-1)
            terms["trust"] = (logr.exp() * (logr - logp)).sum(-1).mean()
        if ref_logits is not None and opts.get("weight_trust"):
            lq = torch.log_softmax(logits.float().gather(-1, ids), dim=-1)
            lr = torch.log_softmax(ref_logits.float().gather(-1, ids), dim=-1)
            terms["trust"] = terms["trust"] + opts["weight_trust"] * (
                lq.exp() * (lq - lr)).sum(-1).mean()
        weights = opts.get("layer_weights")
        if weights:
            for name in ("reuse", "smooth", "lag", "ws"):
                terms[name] = terms[name] * weights[layer]
        return terms

    return terms_fn


@contextlib.contextmanager
def straight_through_selection(temperature: float):
    """Qwen3-MoE blocks whose backward sees a soft top-k over every expert's output.

    Forward values are unchanged (the hard top-k mixture); under autograd the block adds
    `y_soft - y_soft.detach()`, `y_soft = sum_e s_e y_e`, `s_e = P_e / sum(top-k P) *
    sigmoid((z_e - tau) / temperature)`, tau halfway between the k-th and (k+1)-th logit.
    """
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    original = qwen3.Qwen3MoeSparseMoeBlock.forward

    def forward(self, hidden_states):
        B, S, H = hidden_states.shape
        h = hidden_states.view(-1, H)
        logits, weights, ids = self.gate(h)
        y = self.experts(h, ids, weights)
        if torch.is_grad_enabled():
            ex = self.experts
            g, u = torch.einsum("th,eih->tei", h, ex.gate_up_proj).chunk(2, dim=-1)
            every = torch.einsum("tei,ehi->teh", ex.act_fn(g) * u, ex.down_proj)  # [T, E, H]
            z = logits.float()
            p = torch.softmax(z, dim=-1)
            top = z.detach().topk(ids.shape[-1] + 1, dim=-1).values
            tau = 0.5 * (top[:, -2] + top[:, -1])
            soft = p / p.gather(-1, ids).sum(-1, keepdim=True) * torch.sigmoid(
                (z - tau[:, None]) / temperature)
            y_soft = torch.einsum("te,teh->th", soft.to(every.dtype), every)
            y = y + y_soft - y_soft.detach()
        return y.reshape(B, S, H)

    qwen3.Qwen3MoeSparseMoeBlock.forward = forward
    try:
        yield
    finally:
        qwen3.Qwen3MoeSparseMoeBlock.forward = original


@contextlib.contextmanager
def locked_json(path: pathlib.Path):
    """Read-modify-write a JSON file under an exclusive lock (shards run in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(tempfile.gettempdir()) / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.is_file() else {}
        yield doc
        sw._atomic_json(doc, path)


def run(out: pathlib.Path, work: pathlib.Path, shard: tuple[int, int], only: list[str] | None):
    path, stream, wins = sw._data(None, EVAL_TOKENS)
    base, base_trace = ev.teacher_forced(sw._model(path), wins)
    with locked_json(out) as doc:
        if "original" not in doc:
            doc.update({"what": __doc__.splitlines()[0], "model": os.fspath(path),
                        "held_out_tokens": int(wins.numel()), "machine": sw._machine(),
                        "top_k": 4, "original": sw._slim(base), "runs": {}})
        done = set(doc["runs"])
    names = [n for i, n in enumerate(VARIANTS) if i % shard[1] == shard[0]]
    for name in names:
        if name in done or (only and name not in only):
            continue
        overrides, opts = VARIANTS[name]
        cfg = ReMoEConfig(**{**sw.COMMON, **overrides})
        run_dir = work / "".join(c if c.isalnum() else "_" for c in name)
        t0 = time.perf_counter()
        st = straight_through_selection(opts["straight_through"]) if opts.get(
            "straight_through") else contextlib.nullcontext()
        with st:
            finetune(path, run_dir, stream, cfg, resume=False, progress=False,
                     write_output=False, log=lambda s: None, terms_fn=make_terms_fn(opts))
        train_s = time.perf_counter() - t0
        model = sw._model(path)
        from remoe_engine.finetune.delta import router_parameters

        routers = load_checkpoint(run_dir)["routers"]
        with torch.no_grad():
            for n, p in router_parameters(model).items():
                p.copy_(routers[n])
        report, _ = ev.teacher_forced(model, wins, reference=base_trace)
        with locked_json(out) as doc:
            doc["runs"][name] = {"config": cfg.to_dict(), "variant": opts,
                                 "train_s": round(train_s, 1), "report": sw._slim(report)}
            # Keep VARIANTS' order (shards finish in any order); unknown names go last.
            doc["runs"] = dict(sorted(doc["runs"].items(), key=lambda kv: list(VARIANTS).index(
                kv[0]) if kv[0] in VARIANTS else len(VARIANTS)))
        gain = {k: 100 * (report[k] / base[k] - 1) for k in ("perplexity", "eor")}
        lru = 100 * (report["hit_rates"]["lru"]["8"] / base["hit_rates"]["lru"]["8"] - 1)
        print(f"{name:<44} ppl {gain['perplexity']:+.2f}%  EOR {gain['eor']:+.1f}%  "
              f"LRU@8 {lru:+.1f}%", flush=True)


def decompose(out: pathlib.Path, delta: pathlib.Path) -> None:
    """Split a delta's perplexity cost into changed selection and changed top-k weights.

    Four routers on the same held-out tokens: each takes its top-k ids from one of (original,
    fine-tuned) and its renormalised top-k weights from the softmax of one of the two, so
    "selection" keeps the original weights on the fine-tuned choice and "weights" the reverse.
    """
    import types

    import torch.nn.functional as F

    from remoe_engine.evaluation import perplexity
    from remoe_engine.families import find_moe_blocks
    from remoe_engine.finetune.delta import apply_router_delta

    path, _, wins = sw._data(None, EVAL_TOKENS)
    original = [b.router.weight.detach().clone() for b in find_moe_blocks(sw._model(path))]

    def mixed(select_from: str, weigh_from: str) -> float:
        model = apply_router_delta(sw._model(path), delta)
        for block, w_orig in zip(find_moe_blocks(model), original, strict=True):
            def forward(self, h, w_orig=w_orig):
                h = h.reshape(-1, self.hidden_dim)
                z = {"fine-tuned": F.linear(h, self.weight), "original": F.linear(h, w_orig)}
                ids = z[select_from].topk(self.top_k, dim=-1).indices
                w = torch.softmax(z[weigh_from].float(), dim=-1).gather(-1, ids)
                return z["fine-tuned"], (w / w.sum(-1, keepdim=True)).to(h.dtype), ids
            block.router.forward = types.MethodType(forward, block.router)
        return perplexity(model, wins)["perplexity"]

    ppl = {f"select {s}, weigh {w}": mixed(s, w) for s in ("original", "fine-tuned")
           for w in ("original", "fine-tuned")}
    base = ppl["select original, weigh original"]
    split = {"delta": os.fspath(delta), "perplexity": ppl,
             "change_pct": {k: 100 * (v / base - 1) for k, v in ppl.items()}}
    with locked_json(out) as doc:
        doc["cost_split"] = split
    for k, v in split["change_pct"].items():
        print(f"{k:<40} ppl {ppl[k]:.4f} ({v:+.2f}%)")


def probe(out: pathlib.Path, train_tokens: int = 131072, steps: int = 400) -> None:
    """How much of the previous token's routing can a linear router read from its own input?

    For each MoE layer, a linear probe (the router's shape plus a bias) is fit on training-split
    tokens to predict the previous token's top-k set from the current token's router input
    (multi-label BCE, full-batch AdamW), then scored on the held-out tokens by how many of the
    previous token's experts its own top-k contains (recall@k, where chance is k/E and the
    original router's score is its EOR). A router-only fine-tune can at best steer towards what
    such a probe can see.
    """
    from remoe_engine.families import find_moe_blocks

    path, stream, wins = sw._data(None, EVAL_TOKENS)
    model = sw._model(path)
    blocks = find_moe_blocks(model)
    top_k, n_exp = int(model.config.num_experts_per_tok), int(model.config.num_experts)

    def capture(w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seen: list[list] = [[] for _ in blocks]
        hooks = [b.router.register_forward_hook(
            lambda mod, args, o, i=i: seen[i].append((args[0].reshape(-1, args[0].shape[-1])
                                                      .detach(), o[2].detach())))
            for i, b in enumerate(blocks)]
        with torch.no_grad():
            for j in range(0, w.shape[0], 16):
                model(input_ids=w[j:j + 16], use_cache=False)
        for h in hooks:
            h.remove()
        S = w.shape[1]
        out = []
        for rows in seen:
            hid = torch.cat([h for h, _ in rows]).view(-1, S, rows[0][0].shape[-1])
            ids = torch.cat([i for _, i in rows]).view(-1, S, top_k).long()
            # pair token t's input with token t-1's experts, inside each window
            target = torch.zeros(ids.shape[0], S - 1, n_exp).scatter_(-1, ids[:, :-1], 1.0)
            out.append((hid[:, 1:].reshape(-1, hid.shape[-1]).float(),
                        target.reshape(-1, n_exp), ids[:, 1:].reshape(-1, top_k)))
        return out

    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, stream.numel() - 256, (train_tokens // 256,), generator=g)
    train = capture(torch.stack([stream[s:s + 256] for s in starts.tolist()]))
    held = capture(wins)
    layers = []
    for layer, ((x, y, _), (xh, yh, own)) in enumerate(zip(train, held, strict=True)):
        torch.manual_seed(layer)
        lin = torch.nn.Linear(x.shape[-1], n_exp)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(lin(x), y).backward()
            opt.step()
        with torch.no_grad():
            guess = lin(xh).topk(top_k, dim=-1).indices
        recall = float(yh.gather(-1, guess).sum(-1).mean()) / top_k
        router_eor = float(yh.gather(-1, own).sum(-1).mean()) / top_k
        layers.append({"layer": layer, "probe_recall_at_k": recall, "router_eor": router_eor})
        print(f"layer {layer}: probe recall@{top_k} of the previous token's experts {recall:.3f}"
              f" (the router's own EOR {router_eor:.3f}, chance {top_k / n_exp:.3f})", flush=True)
    with locked_json(out) as doc:
        doc["probe"] = {"what": probe.__doc__.split("\n\n")[0].strip(), "train_tokens":
                        train_tokens, "held_out_tokens": int(wins.numel()), "steps": steps,
                        "chance": top_k / n_exp, "layers": layers}


def plot(out: pathlib.Path, sweep: pathlib.Path | None, image: pathlib.Path) -> None:
    """EOR gain against perplexity change: the study's variants over the sweep's recipes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(out.read_text())
    base = doc["original"]

    def xy(r):
        return (100 * (r["perplexity"] / base["perplexity"] - 1),
                100 * (r["eor"] / base["eor"] - 1))

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    if sweep is not None:
        sdoc = json.loads(sweep.read_text())
        pts = [xy(r["report"]) for r in sdoc["runs"].values()]
        pts = [(x, y) for x, y in pts if x < 6]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=25, color="lightgray",
                   label="lambda sweep (method's loss)", zorder=2)
    markers = "osD^v<>pP*hX"
    for i, (name, r) in enumerate(doc["runs"].items()):
        x, y = xy(r["report"])
        ax.scatter([x], [y], s=45, marker=markers[i % len(markers)], zorder=3,
                   label=f"{i + 1}: {name}")
        ax.annotate(str(i + 1), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(1.0, color="gray", ls="--", lw=0.8)
    ax.axhline(40.0, color="gray", ls=":", lw=0.8)
    ax.set_xlim(-0.2, 5.5)
    ax.set_xlabel("held-out perplexity change vs original (%)")
    ax.set_ylabel("EOR gain vs original (%)")
    ax.set_title("Loss variants vs the method's lambda sweep, built-in tiny model "
                 f"({doc['held_out_tokens']} held-out tokens)\ndashed: +1% perplexity; dotted: "
                 "+40% EOR target", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(image))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score the variants (appends rows to --out)")
    r.add_argument("--out", type=pathlib.Path, required=True)
    r.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/remoe-frontier"))
    r.add_argument("--shard", default="0/1", help="i/n: run every n-th variant from the i-th")
    r.add_argument("--only", action="append", default=None, help="a variant name (repeatable)")
    r.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("decompose", help="split a delta's perplexity cost (selection/weights)")
    d.add_argument("--out", type=pathlib.Path, required=True)
    d.add_argument("--delta", type=pathlib.Path, required=True)
    d.add_argument("--threads", type=int, default=1)
    b = sub.add_parser("probe", help="linear probe: previous token's experts from the router input")
    b.add_argument("--out", type=pathlib.Path, required=True)
    b.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("plot", help="draw the study over the lambda sweep")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--sweep", type=pathlib.Path, default=None)
    p.add_argument("--plot", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if args.cmd == "run":
        torch.set_num_threads(args.threads)
        i, n = (int(x) for x in args.shard.split("/"))
        run(args.out, args.work, (i, n), args.only)
    elif args.cmd == "probe":
        torch.set_num_threads(args.threads)
        probe(args.out)
    elif args.cmd == "decompose":
        torch.set_num_threads(args.threads)
        decompose(args.out, args.delta)
    else:
        plot(args.out, args.sweep, args.plot)


if __name__ == "__main__":
    main()
