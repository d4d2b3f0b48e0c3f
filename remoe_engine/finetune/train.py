"""Router-only ReMoE fine-tuning, on one CPU or many GPUs through `accelerate`.

`finetune(...)` loads a Hugging Face MoE checkpoint, freezes everything but the routers (asserted),
and trains them with the ReMoE loss (`remoe_engine.finetune.loss`) on windows drawn from a token
stream. The distributed engine is accelerate's (DDP or FSDP under `accelerate launch`, gloo for
CPU processes); this module only runs the loop:

- batches: each optimizer step s draws `batch` windows per process from a generator seeded by
  (seed, s, rank), so a run is deterministic for a seed and a resumed run draws exactly the data
  the uninterrupted run would have;
- AdamW over router parameters, linear learning-rate warm-up then cosine decay to 10%, gradient
  clipping, bf16 autocast where the device supports it (fp32 on CPU);
- checkpoints every `save_every` steps (router weights, optimizer state, step, history) written to
  a temporary name and renamed, so a kill at any moment leaves the last complete checkpoint;
- at the end, a Hugging Face checkpoint folder in which only router tensors differ from the input
  (checked), plus `router-delta.safetensors`.

Legend: B = sequences per step, S = tokens per sequence, E = experts, K = top-k, H = hidden.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine.families import find_moe_blocks
from remoe_engine.finetune import delta as delta_mod
from remoe_engine.finetune.data import sample_windows
from remoe_engine.finetune.loss import ReMoEConfig, combine, layer_terms

STATE_DIR = "remoe-state"
CHECKPOINT = "checkpoint.pt"
MIN_LR_RATIO = 0.1


class FinetuneError(ValueError):
    """A user error in fine-tuning (bad checkpoint folder, resume mismatch); one line."""


# ---- router capture ---------------------------------------------------------------------------


class RouterTap:
    """Forward hooks on every router: its logits and choices, and the frozen original's logits.

    The hook reads the router's own output `(logits [T, E], weights [T, K], ids [T, K])` and its
    input hidden states; the reference logits come from an fp32 copy of the original router
    weights taken at construction (no grad), applied to the same hidden states, so L_trust
    compares the two routers on identical inputs.
    """

    def __init__(self, model: nn.Module, *, reference: bool = True) -> None:
        self.blocks = find_moe_blocks(model)
        if not self.blocks:
            raise FinetuneError(f"{type(model).__name__} has no MoE router to fine-tune")
        self.reference = reference
        # Frozen fp32 copies of the original routers: weight [E, H] (+ bias [E]).
        self.ref: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for b in self.blocks:
            bias = getattr(b.router, "bias", None)
            self.ref.append((b.router.weight.detach().float().clone(),
                             None if bias is None else bias.detach().float().clone()))
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._handles = [b.router.register_forward_hook(self._hook(i))
                         for i, b in enumerate(self.blocks)]

    def _hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            logits, ids = output[0], output[2]  # [T, E], [T, K]
            ref_logits = None
            if self.reference:
                hidden = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
                with torch.no_grad():
                    weight, bias = self.ref[layer]
                    ref_logits = F.linear(hidden.detach().float(), weight.to(hidden.device),
                                          None if bias is None else bias.to(hidden.device))
            self.records.append((logits, ids, ref_logits))

        return hook

    def pop(self, batch: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None]]:
        """The records of one forward, reshaped to [B, S, *]; clears them."""
        if len(self.records) != len(self.blocks):
            raise RuntimeError(f"expected one router call per MoE layer, got {len(self.records)}")
        out = [(lg.view(batch, seq_len, -1), ids.view(batch, seq_len, -1).long(),
                None if ref is None else ref.view(batch, seq_len, -1))
               for lg, ids, ref in self.records]
        self.records = []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def freeze_all_but_routers(model: nn.Module) -> dict[str, nn.Parameter]:
    """Make only router parameters trainable, and assert it.

    Args:
        model: a transformers MoE model of a supported family.

    Returns:
        The trainable parameters by name (the router weights, GPT-OSS router biases too).
    """
    routers = delta_mod.router_parameters(model)
    router_ids = {id(p) for p in routers.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in router_ids)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(routers), (
        f"non-router parameters are trainable: {sorted(trainable - set(routers))[:3]}")
    return routers


# terms_fn(logits [B, S, E], ids [B, S, K], ref_logits [B, S, E] | None, cfg, layer) -> terms
TermsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, ReMoEConfig, int],
                   dict[str, torch.Tensor]]


def default_terms(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None,
                  cfg: ReMoEConfig, layer: int) -> dict[str, torch.Tensor]:
    """The method's terms (`loss.layer_terms`), the same for every layer."""
    return layer_terms(logits, ids, ref_logits, cfg)


def remoe_loss(model: nn.Module, tap: RouterTap, input_ids: torch.Tensor, cfg: ReMoEConfig,
               step: int, terms_fn: TermsFn = default_terms
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """One teacher-forced forward and the total ReMoE loss.

    Args:
        model: the (possibly accelerate-wrapped) causal LM, tapped by `tap`.
        tap: the router hooks.
        input_ids: int64 [B, S].
        cfg: the config.
        step: 1-based optimizer step (locality warm-up).
        terms_fn: computes one MoE layer's terms (`loss.TERMS` keys); the default is the
            method's. Research variants of the loss plug in here (see
            `bench/experiments/remoe_frontier.py`).

    Returns:
        (loss, logged floats).
    """
    B, S = input_ids.shape
    # output_router_logits=False: no load-balancing aux loss; CE computed here from the logits.
    out = model(input_ids=input_ids, use_cache=False, output_router_logits=False)
    logits = out.logits  # [B, S, V]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                         input_ids[:, 1:].reshape(-1))
    layers = [terms_fn(lg, ids, ref if cfg.lambda_kl > 0 else None, cfg, i)
              for i, (lg, ids, ref) in enumerate(tap.pop(B, S))]
    return combine(ce, layers, cfg, step)


def lr_at(step: int, cfg: ReMoEConfig) -> float:
    """Learning rate for the 1-based step: linear warm-up, then cosine to MIN_LR_RATIO x lr."""
    warm = max(1, round(cfg.lr_warmup * cfg.steps)) if cfg.lr_warmup > 0 else 0
    if step <= warm:
        return cfg.lr * step / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def _generator(cfg: ReMoEConfig, step: int, rank: int) -> torch.Generator:
    # One generator per (seed, step, rank): data never depends on how many steps ran before.
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099 + rank)


# ---- checkpoints ------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume_key(cfg: ReMoEConfig) -> dict:
    # Everything but the bookkeeping intervals must match for a resume to continue the same run.
    d = cfg.to_dict()
    for name in ("eval_every", "save_every"):
        d.pop(name)
    return d


def load_checkpoint(out: pathlib.Path) -> dict | None:
    """The last checkpoint of a run folder, or None."""
    path = out / STATE_DIR / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ---- the run ----------------------------------------------------------------------------------


def _load_model(path: str | os.PathLike, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    p = pathlib.Path(path)
    if not (p / "config.json").is_file():
        raise FinetuneError(f"{str(p)!r} is not a Hugging Face checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(os.fspath(p), dtype=dtype)


def finetune(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    train_stream: torch.Tensor,
    cfg: ReMoEConfig,
    *,
    eval_windows: torch.Tensor | None = None,
    resume: bool = True,
    progress: bool = True,
    mixed_precision: str | None = None,
    write_output: bool = True,
    log: Callable[[str], None] = print,
    terms_fn: TermsFn = default_terms,
) -> dict:
    """Fine-tune the routers of a checkpoint with the ReMoE loss.

    Args:
        model_path: input Hugging Face checkpoint folder (left untouched).
        out: output folder: the fine-tuned checkpoint, `router-delta.safetensors`,
            `remoe-finetune.json` (config, history, evals) and `remoe-state/` (checkpoints).
        train_stream: int64 [N] training token stream.
        cfg: the ReMoE config.
        eval_windows: int64 [W, S] held-out windows for periodic evaluation (ppl and EOR), or None.
        resume: continue from `out/remoe-state/checkpoint.pt` when present (the config must match).
        progress: show a tqdm progress bar (main process only).
        mixed_precision: "no" or "bf16"; None picks bf16 on a CUDA device that supports it, else no.
        write_output: write the checkpoint folder and delta at the end (False: state only).
        log: callable taking one line of text (main process only).
        terms_fn: one MoE layer's loss terms (default: the method's, `loss.layer_terms`); a
            research hook, not part of the config, so a resumed run must pass the same one.

    Returns:
        The summary dict also written to `out/remoe-finetune.json`.

    Raises:
        FinetuneError: bad checkpoint folder, too little text, or a resume with another config.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    if train_stream.numel() < cfg.seq_len:
        raise FinetuneError(f"training text has {train_stream.numel()} tokens, fewer than one "
                            f"window of {cfg.seq_len}")
    if mixed_precision is None:
        mixed_precision = ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                           else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    out = pathlib.Path(out)
    if main:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    model = _load_model(model_path, torch.float32)
    model.eval()  # no dropout: the frozen network should compute what it computes at inference
    model.config.output_router_logits = False
    routers = freeze_all_but_routers(model)
    from remoe_engine.trace import router_hash

    base_hash = router_hash(model)
    tap = RouterTap(model, reference=cfg.lambda_kl > 0)
    params = list(routers.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)

    start, history, evals = 0, [], []
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        if ckpt["resume_key"] != _resume_key(cfg):
            raise FinetuneError(f"{out / STATE_DIR / CHECKPOINT} was written by another config; "
                                "use the same options, or a new --out, or --no-resume")
        with torch.no_grad():
            for name, p in routers.items():
                p.copy_(ckpt["routers"][name])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        if main:
            log(f"resumed from step {start}")

    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    rank = accelerator.process_index

    def evaluate_now(step: int) -> None:
        from remoe_engine.zoo.evaluate import evaluate

        if eval_windows is None:
            return
        ppl, routing = evaluate(accelerator.unwrap_model(model), eval_windows.to(device),
                                block=min(cfg.window, eval_windows.shape[1]))
        tap.records = []  # evaluate's forward passed the hooks too
        evals.append({"step": step, "perplexity": ppl["perplexity"], "eor": routing.eor})
        log(f"step {step}: held-out ppl {ppl['perplexity']:.4f}, EOR {routing.eor:.4f}")

    def save(step: int) -> None:
        if main:
            _atomic_torch_save({
                "step": step, "resume_key": _resume_key(cfg), "config": cfg.to_dict(),
                "routers": {n: p.detach().cpu().clone() for n, p in routers.items()},
                "optimizer": optimizer.state_dict(), "history": history, "evals": evals,
            }, out / STATE_DIR / CHECKPOINT)
        accelerator.wait_for_everyone()

    if main and start == 0 and cfg.eval_every:
        evaluate_now(0)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="remoe finetune",
               disable=not (progress and main), dynamic_ncols=True)
    for step in range(start + 1, cfg.steps + 1):
        batch = sample_windows(train_stream, cfg.batch, cfg.seq_len,
                               _generator(cfg, step, rank)).to(device)  # [B, S]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with accelerator.autocast():
            loss, logged = remoe_loss(model, tap, batch, cfg, step, terms_fn)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        logged["grad_norm"] = float(accelerator.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        logged["step"], logged["lr"] = step, lr_at(step, cfg)
        history.append(logged)
        bar.update(1)
        bar.set_postfix(ce=f"{logged['ce']:.3f}", reuse=f"{logged['reuse']:.3f}",
                        kl=f"{logged['trust']:.4f}")
        if main and cfg.eval_every and step % cfg.eval_every == 0:
            evaluate_now(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save(step)
    bar.close()
    tap.remove()
    train_s = time.perf_counter() - t0

    summary = {"config": cfg.to_dict(), "base": os.fspath(model_path), "base_router_hash":
               base_hash, "steps_run_now": cfg.steps - start, "train_wall_s": round(train_s, 1),
               "processes": accelerator.num_processes, "mixed_precision": mixed_precision,
               "distributed_type": str(accelerator.distributed_type),
               "backend": getattr(accelerator.state, "backend", None),
               "evals": evals, "history": history}
    if main and write_output:
        raw = accelerator.unwrap_model(model)
        write_finetuned(model_path, out, raw, base_hash, cfg)
        summary["changed_tensors"] = verify_only_routers(model_path, out, raw)
        tmp = out / "remoe-finetune.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out / "remoe-finetune.json")
    accelerator.wait_for_everyone()
    return summary


def write_finetuned(model_path: str | os.PathLike, out: pathlib.Path, trained: nn.Module,
                    base_hash: str, cfg: ReMoEConfig) -> None:
    """Write the output checkpoint: the input model at its own dtype with the trained routers.

    The input is reloaded as stored (so nothing but the routers changes, not even a dtype), the
    router weights are copied in, and the folder is written to a temporary folder whose files are
    then renamed into `out` one by one (each file appears complete or not at all).

    Args:
        model_path: the input checkpoint folder.
        out: the output folder.
        trained: the model holding the fine-tuned routers.
        base_hash: router hash of the input model.
        cfg: the config (stored in the delta's metadata).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out / ".tmp-output"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    delta_file = delta_mod.save_router_delta(trained, tmp / delta_mod.DELTA_NAME,
                                             base_router_hash=base_hash,
                                             extra={"remoe_config": cfg.to_dict()})
    base = AutoModelForCausalLM.from_pretrained(os.fspath(model_path), dtype="auto")
    delta_mod.apply_router_delta(base, delta_file)
    base.save_pretrained(os.fspath(tmp))
    source = pathlib.Path(model_path)
    if (source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(os.fspath(source)).save_pretrained(os.fspath(tmp))
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def verify_only_routers(model_path: str | os.PathLike, out: pathlib.Path,
                        model: nn.Module) -> list[str]:
    """Check that only router tensors differ between the input and the output checkpoint.

    Returns:
        The changed tensor names (all routers).

    Raises:
        FinetuneError: naming a non-router tensor that differs.
    """
    changed = delta_mod.changed_tensors(model_path, out)
    routers = set(delta_mod.router_parameters(model))
    others = [name for name in changed if name not in routers]
    if others:
        raise FinetuneError(f"output checkpoint differs from the input outside the routers: "
                            f"{others[:3]}")
    return changed
