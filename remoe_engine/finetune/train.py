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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from remoe_engine import metrics
from remoe_engine.evaluation import teacher_forced_trace
from remoe_engine.families import find_moe_blocks
from remoe_engine.finetune import delta as delta_mod
from remoe_engine.finetune.config import ReMoEConfig
from remoe_engine.finetune.data import sample_windows
from remoe_engine.finetune.loss import combine, layer_terms
from remoe_engine.trace import RouterTap, frozen_routers, router_hash

STATE_DIR = "remoe-state"
CHECKPOINT = "checkpoint.pt"
MIN_LR_RATIO = 0.1


class FinetuneError(ValueError):
    """A user error in fine-tuning (bad checkpoint folder, resume mismatch); one line."""


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


def router_tap(model: nn.Module, cfg: ReMoEConfig) -> RouterTap:
    """The tap the loss reads: each router's logits with their graph, its choices on the device,
    and (for L_trust) a frozen fp32 copy of the original router applied to the same hidden
    states, so the trust term compares the two routers on identical inputs."""
    if not find_moe_blocks(model):
        raise FinetuneError(f"{type(model).__name__} has no MoE router to fine-tune")
    return RouterTap(model, logits=True, ids_on_host=False,
                     reference=frozen_routers(model) if cfg.lambda_kl > 0 else None)


def remoe_loss(model: nn.Module, tap: RouterTap, input_ids: torch.Tensor, cfg: ReMoEConfig,
               step: int, terms_fn: TermsFn = default_terms
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """One teacher-forced forward and the total ReMoE loss.

    Args:
        model: the (possibly accelerate-wrapped) causal LM, tapped by `tap`.
        tap: the routers' tap (`router_tap`), hooked in.
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
    layers = [terms_fn(lg.view(B, S, -1), ids.view(B, S, -1).long(),
                       None if ref is None else ref.view(B, S, -1), cfg, i)
              for i, (lg, ids, ref) in enumerate(tap.take())]
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
    from tqdm.auto import tqdm

    cfg.validate()
    if train_stream.numel() < cfg.seq_len:
        raise FinetuneError(f"training text has {train_stream.numel()} tokens, fewer than one "
                            f"window of {cfg.seq_len}")
    run = _prepare(model_path, pathlib.Path(out), cfg, resume, mixed_precision, log)
    main = run.accelerator.is_main_process
    if main and run.start == 0 and cfg.eval_every:
        _evaluate(run, 0, eval_windows, log)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=run.start, desc="remoe finetune",
               disable=not (progress and main), dynamic_ncols=True)
    with run.tap:
        for step in range(run.start + 1, cfg.steps + 1):
            logged = _train_step(run, train_stream, step, terms_fn)
            bar.update(1)
            bar.set_postfix(ce=f"{logged['ce']:.3f}", reuse=f"{logged['reuse']:.3f}",
                            kl=f"{logged['trust']:.4f}")
            if main and cfg.eval_every and step % cfg.eval_every == 0:
                _evaluate(run, step, eval_windows, log)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                _save(run, step)
    bar.close()
    train_s = time.perf_counter() - t0

    accelerator = run.accelerator
    summary = {"config": cfg.to_dict(), "base": os.fspath(model_path), "base_router_hash":
               run.base_hash, "steps_run_now": cfg.steps - run.start,
               "train_wall_s": round(train_s, 1), "processes": accelerator.num_processes,
               "mixed_precision": run.mixed_precision,
               "distributed_type": str(accelerator.distributed_type),
               "backend": getattr(accelerator.state, "backend", None),
               "evals": run.evals, "history": run.history}
    if main and write_output:
        raw = accelerator.unwrap_model(run.model)
        write_finetuned(model_path, run.out, raw, run.base_hash, cfg)
        summary["changed_tensors"] = verify_only_routers(model_path, run.out, raw)
        tmp = run.out / "remoe-finetune.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run.out / "remoe-finetune.json")
    accelerator.wait_for_everyone()
    return summary


@dataclass
class _Run:
    """One fine-tuning run's state between steps."""

    cfg: ReMoEConfig
    out: pathlib.Path
    accelerator: Any
    mixed_precision: str
    model: nn.Module  # as accelerate prepared it
    routers: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    tap: RouterTap
    base_hash: str
    start: int = 0  # the last step done before this process started (resume)
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def _prepare(model_path: str | os.PathLike, out: pathlib.Path, cfg: ReMoEConfig, resume: bool,
             mixed_precision: str | None, log: Callable[[str], None]) -> _Run:
    """The model with only its routers trainable, the optimizer, the tap, and the state of a
    checkpoint to resume from, all placed by accelerate."""
    from accelerate import Accelerator

    if mixed_precision is None:
        mixed_precision = ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                           else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    model = _load_model(model_path, torch.float32)
    model.eval()  # no dropout: the frozen network should compute what it computes at inference
    model.config.output_router_logits = False
    routers = freeze_all_but_routers(model)
    base_hash = router_hash(model)
    tap = router_tap(model, cfg)
    optimizer = torch.optim.AdamW(list(routers.values()), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    run = _Run(cfg, out, accelerator, mixed_precision, model, routers, optimizer, tap, base_hash)
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        if ckpt["resume_key"] != _resume_key(cfg):
            raise FinetuneError(f"{out / STATE_DIR / CHECKPOINT} was written by another config; "
                                "use the same options, or a new --out, or --no-resume")
        with torch.no_grad():
            for name, p in routers.items():
                p.copy_(ckpt["routers"][name])
        optimizer.load_state_dict(ckpt["optimizer"])
        run.start, run.history, run.evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        if accelerator.is_main_process:
            log(f"resumed from step {run.start}")
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    return run


def _train_step(run: _Run, train_stream: torch.Tensor, step: int, terms_fn: TermsFn) -> dict:
    """One optimizer step on a batch drawn for (seed, step, rank); returns the logged floats."""
    cfg, accelerator = run.cfg, run.accelerator
    batch = sample_windows(train_stream, cfg.batch, cfg.seq_len,
                           _generator(cfg, step, accelerator.process_index))  # [B, S]
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with accelerator.autocast():
        loss, logged = remoe_loss(run.model, run.tap, batch.to(accelerator.device), cfg, step,
                                  terms_fn)
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    logged["grad_norm"] = float(accelerator.clip_grad_norm_(list(run.routers.values()),
                                                            cfg.grad_clip))
    run.optimizer.step()
    logged["step"], logged["lr"] = step, lr_at(step, cfg)
    run.history.append(logged)
    return logged


def _evaluate(run: _Run, step: int, eval_windows: torch.Tensor | None,
              log: Callable[[str], None]) -> None:
    """Held-out perplexity and EOR (the family's own routing), appended to the run's evals."""
    if eval_windows is None:
        return
    ppl, routing = teacher_forced_trace(run.accelerator.unwrap_model(run.model),
                                        eval_windows.to(run.accelerator.device))
    run.tap.clear()  # the evaluation's forwards passed the training tap too
    eor = metrics.expert_reuse(routing).eor
    run.evals.append({"step": step, "perplexity": ppl["perplexity"], "eor": eor})
    log(f"step {step}: held-out ppl {ppl['perplexity']:.4f}, EOR {eor:.4f}")


def _save(run: _Run, step: int) -> None:
    if run.accelerator.is_main_process:
        _atomic_torch_save({
            "step": step, "resume_key": _resume_key(run.cfg), "config": run.cfg.to_dict(),
            "routers": {n: p.detach().cpu().clone() for n, p in run.routers.items()},
            "optimizer": run.optimizer.state_dict(), "history": run.history,
            "evals": run.evals,
        }, run.out / STATE_DIR / CHECKPOINT)
    run.accelerator.wait_for_everyone()


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
