"""`remoe finetune`: router-only ReMoE fine-tuning (runs under `accelerate launch` too)."""

from __future__ import annotations

import argparse
import os
import pathlib

from remoe_engine.cli import CommandError


def _lags(spec: str) -> tuple[int, ...]:
    try:
        lags = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"lags must be comma-separated integers, got {spec!r}") from None
    if not lags or min(lags) < 1:
        raise argparse.ArgumentTypeError(f"lags must be positive integers, got {spec!r}")
    return lags


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe finetune`.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    from remoe_engine.finetune.config import BIAS_SOURCES, ReMoEConfig, ReuseBiasConfig

    d = ReMoEConfig()
    b = ReuseBiasConfig()
    parser = subparsers.add_parser(
        "finetune", help="fine-tune only the routers for expert reuse (the ReMoE loss)",
        description="Train only the router weights of a Hugging Face MoE checkpoint so that "
        "consecutive tokens reuse experts (ReMoE, docs/design.md section 7), with a trust-region "
        "KL to the original router. Writes a checkpoint folder in which only router tensors differ "
        "from the input, plus router-delta.safetensors. Resumes from --out/remoe-state when "
        "interrupted. For many GPUs: accelerate launch -m remoe_engine finetune ...",
    )
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="input checkpoint folder (default: the built-in tiny model)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    parser.add_argument("--data", default=None,
                        help="training text: a text file, a .jsonl file, a folder of text files "
                        "or a `datasets` folder saved to disk (default for built-in models: "
                        "their own training split)")
    parser.add_argument("--text-key", default=None, help="JSONL field / dataset column of text")
    parser.add_argument("--eval-data", default=None,
                        help="held-out text for periodic evaluation (default for built-in models: "
                        "their held-out split)")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="held-out tokens used by the periodic evaluation (16384)")
    for name, help_text in [
        ("lambda_kl", "weight of the trust KL to the original router"),
        ("lambda_reuse", "weight of the reuse-mass term"),
        ("lambda_smooth", "weight of the adjacent-token symmetric KL"),
        ("lambda_lag", "weight of the multi-lag symmetric KL"),
        ("lambda_ws", "weight of the window entropy"),
        ("locality_warmup", "locality warm-up T_warm as a fraction of --steps"),
        ("lr", "AdamW peak learning rate"),
        ("lr_warmup", "learning-rate warm-up as a fraction of --steps"),
        ("weight_decay", "AdamW weight decay"),
        ("grad_clip", "gradient-norm clip"),
    ]:
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name),
                            help=f"{help_text} ({getattr(d, name)})")
    for name, help_text in [
        ("steps", "optimizer steps"), ("batch", "sequences per step and process"),
        ("seq_len", "tokens per sequence"), ("window", "W of the window-entropy term"),
        ("seed", "seed of the batch sampling"),
        ("save_every", "steps between checkpoints (0: at the end only)"),
        ("eval_every", "steps between held-out evaluations (0: none)"),
    ]:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                            help=f"{help_text} ({getattr(d, name)})")
    parser.add_argument("--lags", type=_lags, default=d.lags,
                        help=f"lags of the lag term ({','.join(map(str, d.lags))})")
    bias = parser.add_argument_group(
        "learned reuse bias",
        "With --learn-bias, train the strengths of the cache-aware reuse bias instead of the "
        "router weights (which stay as they are): one per MoE layer (or per layer and expert), "
        "with the selection inference applies, against the loss CE + KL(biased || original "
        "selection) - reuse mass of the preferred experts. Writes router-delta.safetensors with "
        "the router weights and the strengths; remoe run --learned-delta and "
        "remoe_engine.apply_router_delta() on a loaded model apply it. --batch, --seq-len and "
        "--seed apply; the other ReMoE options do not.")
    bias.add_argument("--learn-bias", choices=BIAS_SOURCES, default=None,
                      help="what the bias prefers: the previous token's experts, or the experts "
                      "resident in an LRU pool of --bias-slots slots per layer")
    bias.add_argument("--bias-slots", type=int, default=b.slots,
                      help=f"pool slots per layer for --learn-bias resident ({b.slots}); for a "
                      "remoe run --memory-budget, the budget's slots divided by the MoE layers")
    bias.add_argument("--bias-per-expert", action="store_true",
                      help="one strength per layer and expert (default: one per layer)")
    bias.add_argument("--base-delta", default=None,
                      help="a router delta applied first (e.g. ReMoE router weights); the output "
                      "delta holds its router weights")
    for name, help_text in [
        ("init", "initial strength"), ("lambda_kl", "weight of the KL to the original selection"),
        ("lambda_reuse", "weight of the reuse-mass term"),
        ("tau", "temperature of the straight-through soft top-k"), ("lr", "Adam learning rate"),
    ]:
        bias.add_argument("--bias-" + name.replace("_", "-"), type=float,
                          default=getattr(b, name), help=f"{help_text} ({getattr(b, name)})")
    bias.add_argument("--bias-ce-gradient", choices=("straight-through", "spsa"),
                      default=b.ce_gradient,
                      help="how the cross-entropy's gradient reaches the strengths: the "
                      "straight-through soft top-k, or a two-forward simultaneous-perturbation "
                      f"estimate that also sees the displaced experts ({b.ce_gradient})")
    bias.add_argument("--bias-spsa-c", type=float, default=b.spsa_c,
                      help=f"perturbation size of --bias-ce-gradient spsa ({b.spsa_c})")
    bias.add_argument("--bias-steps", type=int, default=b.steps,
                      help=f"optimizer steps ({b.steps})")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if --out holds a checkpoint of this config")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default=None,
                        help="bf16 autocast (default: bf16 on a GPU that supports it, else no)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from remoe_engine.evaluation import windows
    from remoe_engine.finetune import data as fdata
    from remoe_engine.finetune.config import ReMoEConfig
    from remoe_engine.finetune.train import FinetuneError, finetune
    from remoe_engine.zoo import ZooError
    from remoe_engine.zoo import path as zoo_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model_path = args.model if args.model is not None else zoo_path("tiny")
    except ZooError as e:
        raise CommandError(str(e)) from None
    if not (pathlib.Path(model_path) / "config.json").is_file():
        raise CommandError(f"{str(model_path)!r} is not a Hugging Face checkpoint folder "
                           "(no config.json)")
    fields = ("lambda_kl", "lambda_reuse", "lambda_smooth", "lambda_lag", "lambda_ws",
              "locality_warmup", "lr", "lr_warmup", "weight_decay", "grad_clip", "steps",
              "batch", "seq_len", "window", "seed", "save_every", "eval_every", "lags")
    if args.learn_bias is not None:
        return _learn_bias(args, model_path)
    cfg = ReMoEConfig(**{f: getattr(args, f) for f in fields})
    try:
        cfg.validate()
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        texts, where = fdata.resolve_texts(model_path, args.data, "train", args.text_key)
        stream = fdata.encode(tokenizer, texts)
        eval_wins = None
        if cfg.eval_every:
            held, _ = fdata.resolve_texts(model_path, args.eval_data, "held_out", args.text_key)
            eval_wins = windows(fdata.encode(tokenizer, held), min(cfg.seq_len, 256),
                                args.eval_tokens)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch: once, not per process
            print(f"remoe finetune: {stream.numel():,} training tokens from {where}")
        summary = finetune(model_path, args.out, stream, cfg, eval_windows=eval_wins,
                           resume=not args.no_resume, progress=not args.no_progress,
                           mixed_precision=args.mixed_precision)
    except (fdata.DataError, FinetuneError, ValueError, OSError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    if summary.get("changed_tensors") is not None:
        print(f"remoe finetune: wrote {args.out} ({len(summary['changed_tensors'])} router tensors "
              f"changed, nothing else) and {args.out / 'router-delta.safetensors'}")
    return 0


def _learn_bias(args: argparse.Namespace, model_path) -> int:
    from transformers import AutoTokenizer

    from remoe_engine.finetune import data as fdata
    from remoe_engine.finetune.bias import train_reuse_bias
    from remoe_engine.finetune.config import ReuseBiasConfig

    cfg = ReuseBiasConfig(source=args.learn_bias, slots=args.bias_slots,
                          per_expert=args.bias_per_expert, init=args.bias_init,
                          lambda_kl=args.bias_lambda_kl, lambda_reuse=args.bias_lambda_reuse,
                          tau=args.bias_tau, ce_gradient=args.bias_ce_gradient,
                          spsa_c=args.bias_spsa_c, lr=args.bias_lr, steps=args.bias_steps,
                          batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    try:
        cfg.validate()
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        texts, where = fdata.resolve_texts(model_path, args.data, "train", args.text_key)
        stream = fdata.encode(tokenizer, texts)
        print(f"remoe finetune: learned reuse bias ({cfg.source}), {stream.numel():,} training "
              f"tokens from {where}")
        summary = train_reuse_bias(model_path, args.out, stream, cfg,
                                   router_delta=args.base_delta, progress=not args.no_progress)
    except (fdata.DataError, ValueError, OSError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    print(f"remoe finetune: wrote {summary['delta']}")
    return 0
