"""`remoe eval`: perplexity, expert reuse, cache hit rates and router agreement on held-out text."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

from remoe_engine.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe eval`.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "eval", help="compare the original and a fine-tuned router on held-out text",
        description="Evaluate the original router of a checkpoint and, optionally, a fine-tuned "
        "router (a `remoe finetune` output folder or a router-delta file) on the same held-out "
        "windows: perplexity, EOR per layer and mean, LRU/LFU/OPT hit rates at several cache "
        "sizes per layer (the cache simulator), top-k agreement and KL to the original router. "
        "Prints a table; --out writes report.json and report.png. --reuse-bias adds decode-loop "
        "rows (token by token with the KV cache, the bias feeding back) for the inference-time "
        "reuse bias, alone and combined with the fine-tuned router.",
    )
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="original checkpoint folder (default: the built-in tiny model)")
    parser.add_argument("--finetuned", type=pathlib.Path, default=None,
                        help="a `remoe finetune` output folder or a router-delta .safetensors")
    parser.add_argument("--data", default=None,
                        help="held-out text (file, .jsonl, folder, saved dataset); default for "
                        "built-in models: their held-out split")
    parser.add_argument("--text-key", default=None, help="JSONL field / dataset column of text")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (256)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use only the first N held-out tokens (default: all)")
    parser.add_argument("--slots", default=None,
                        help="cache sizes per layer, e.g. 4,8,16 (default: K, 2K, 4K, ... and E/2)")
    parser.add_argument("--reuse-bias", default=None,
                        help="comma-separated inference-time bias strengths for decode-loop rows, "
                        "e.g. 0.02,0.05")
    parser.add_argument("--bias-source", default="previous,resident",
                        help="bias sources for the decode rows (previous,resident)")
    parser.add_argument("--decode-tokens", type=int, default=2048,
                        help="held-out tokens for the decode-loop rows (2048)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder for report.json and report.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _floats(spec: str | None, name: str) -> list[float]:
    if not spec:
        return []
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"{name} must be comma-separated numbers, got {spec!r}") from None
    if any(not (math.isfinite(v) and v >= 0) for v in values):
        raise CommandError(f"{name} values must be finite numbers >= 0, got {spec!r}")
    return values


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remoe_engine import evaluation as ev
    from remoe_engine.families import routing_spec
    from remoe_engine.finetune import data as fdata
    from remoe_engine.finetune import delta as fdelta
    from remoe_engine.zoo import ZooError
    from remoe_engine.zoo import path as zoo_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    biases = _floats(args.reuse_bias, "--reuse-bias")
    sources = [s.strip() for s in args.bias_source.split(",") if s.strip()]
    bad = [s for s in sources if s not in ("previous", "resident")]
    if bad:
        raise CommandError(f"--bias-source must be previous and/or resident, got {bad[0]!r}")
    slots = None
    if args.slots:
        try:
            slots = sorted({int(s) for s in args.slots.split(",") if s.strip()})
        except ValueError:
            raise CommandError(f"--slots must be comma-separated integers, got "
                               f"{args.slots!r}") from None
    try:
        model_path = args.model if args.model is not None else zoo_path("tiny")
        if not (pathlib.Path(model_path) / "config.json").is_file():
            raise CommandError(f"{str(model_path)!r} is not a Hugging Face checkpoint folder "
                               "(no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_path))
        texts, where = fdata.resolve_texts(model_path, args.data, "held_out", args.text_key)
        stream = fdata.encode(tokenizer, texts)
        wins = ev.windows(stream, args.seq_len, args.max_tokens)
        model = AutoModelForCausalLM.from_pretrained(os.fspath(model_path), dtype=torch.float32)
        top_k = int(routing_spec(model).top_k)
        base, base_trace = ev.teacher_forced(model, wins, slots=slots)
        rows = [("original", base)]
        tuned = None
        if args.finetuned is not None:
            tuned = AutoModelForCausalLM.from_pretrained(os.fspath(model_path),
                                                         dtype=torch.float32)
            fdelta.apply_router_delta(tuned, args.finetuned)
            report, _ = ev.teacher_forced(tuned, wins, slots=slots, reference=base_trace)
            rows.append(("fine-tuned router", report))
        decode_rows = []
        if biases:
            dwins = wins[: max(1, args.decode_tokens // args.seq_len)]
            original = ev.frozen_routers(model)
            candidates = [("original", model)] + ([("fine-tuned", tuned)] if tuned else [])
            for label, m in candidates:
                decode_rows.append((f"{label} (decode)", ev.decode_report(
                    m, dwins, original, slots=slots, progress=not args.no_progress,
                    label=label)))
                for source in sources:
                    for b in biases:
                        name = f"{label} + bias {b:g} {source}"
                        decode_rows.append((name, ev.decode_report(
                            m, dwins, original, reuse_bias=b, bias_source=source, slots=slots,
                            progress=not args.no_progress, label=name)))
    except (fdata.DataError, ZooError, ValueError, FileNotFoundError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    print(f"held-out: {where}; {wins.shape[0]} windows x {wins.shape[1]} tokens, teacher-forced")
    print(ev.format_table(rows, base, top_k))
    if decode_rows:
        tokens = decode_rows[0][1]["tokens"]
        print(f"\ndecode loop (token by token, KV cache, teacher-forced): {tokens} tokens; "
              "agreement and KL against the original router on the same hidden states")
        print(ev.format_table(decode_rows, decode_rows[0][1], top_k))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"model": os.fspath(model_path), "finetuned": None if args.finetuned is None
               else os.fspath(args.finetuned), "held_out": where,
               "teacher_forced": dict(rows), "decode": dict(decode_rows)}
        tmp = args.out / "report.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out / "report.json")
        ev.plot_report(rows + decode_rows, base, top_k, args.out / "report.png",
                       title=f"{model_path}: held-out routing")
        print(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 0
