"""`remoe trace`: record which experts a model routes text to, and save the routing trace."""

from __future__ import annotations

import argparse
import hashlib
import pathlib

from remoe_engine.cli import CommandError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remoe trace`.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "trace", help="record a model's expert routing on text and save it as a trace",
        description="Run a Hugging Face MoE model (default: the built-in one) over text files "
        "(default: the model's held-out files) with a forward pass, or generate() with "
        "--generate, and save every token's top-k experts per MoE layer, with the model, config "
        "and router hashes, as a .safetensors (or .npz) trace for `remoe simulate`. Each file "
        "is cut into sequences of --seq-len tokens.",
    )
    parser.add_argument("--model", type=pathlib.Path, default=None, metavar="DIR",
                        help="checkpoint directory (default: the built-in 'tiny' model)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR|bytes",
                        help="tokenizer directory, or 'bytes' for UTF-8 bytes as token ids "
                        "(test models without a tokenizer); default: the model directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", type=pathlib.Path, action="append", metavar="FILE",
                        help="a text file to route, repeatable")
    source.add_argument("--text-dir", type=pathlib.Path, metavar="DIR",
                        help="route every .py/.txt/.md/.rst file under DIR, by name (version "
                        "control and virtual-environment folders skipped)")
    source.add_argument("--held-out", action="store_true",
                        help="route the held-out files listed in a built-in model's card.json "
                        "(standard-library sources it never trained on); the default when no "
                        "text is given")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="stop after this many prompt tokens in total (4096)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="tokens per sequence (prompt length with --generate) (256)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (8)")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="greedy-generate N new tokens per sequence and record the decode "
                        "steps too (default: one forward pass, no generation)")
    parser.add_argument("--probs", action="store_true",
                        help="also store router probabilities (for KL between two routers)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("trace.safetensors"),
                        help="output trace, .safetensors or .npz (trace.safetensors)")
    parser.set_defaults(func=run)


def _model_dir(arg: pathlib.Path | None) -> pathlib.Path:
    if arg is not None:
        if not (arg / "config.json").is_file():
            raise CommandError(f"--model {arg}: not a checkpoint directory (no config.json)")
        return arg
    from remoe_engine import zoo

    if "tiny" not in zoo.available():
        raise CommandError("no --model given and the built-in 'tiny' model is not installed; "
                           "pass --model DIR")
    return zoo.path("tiny")


def _held_out_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The held-out standard-library files named by a built-in model's card.json."""
    import json

    from remoe_engine.zoo.data import stdlib_dir

    card = model_dir / "card.json"
    if not card.is_file():
        raise CommandError(f"no text given and {model_dir} has no card.json listing held-out "
                           "files; pass --text FILE or --text-dir DIR")
    names = json.loads(card.read_text()).get("data", {}).get("held_out_names", [])
    files = [stdlib_dir() / name for name in names if (stdlib_dir() / name).is_file()]
    if not files:
        raise CommandError(f"none of the {len(names)} held-out files named in {card} exists "
                           f"under {stdlib_dir()}; pass --text FILE or --text-dir DIR")
    return files


def _text_files(args: argparse.Namespace, model_dir: pathlib.Path) -> list[pathlib.Path]:
    if not args.text and args.text_dir is None:
        return _held_out_files(model_dir)
    if args.text:
        missing = [p for p in args.text if not p.is_file()]
        if missing:
            raise CommandError(f"--text {missing[0]}: no such file")
        return list(args.text)
    from remoe_engine.zoo import ZooError
    from remoe_engine.zoo.data import discover

    try:  # the zoo's corpus discovery: same suffixes and skipped folders as its training data
        return [f.path for f in discover(args.text_dir)]
    except ZooError as error:
        raise CommandError(f"--text-dir: {error}") from None


def _encoder(args: argparse.Namespace, model_dir: pathlib.Path, vocab_size: int):
    """A function text -> list of token ids."""
    if args.tokenizer == "bytes":
        if vocab_size < 256:
            raise CommandError(f"--tokenizer bytes needs a vocabulary of at least 256 ids, the "
                               f"model has {vocab_size}")
        return lambda text: list(text.encode("utf-8"))
    from transformers import AutoTokenizer

    where = pathlib.Path(args.tokenizer) if args.tokenizer else model_dir
    hint = "pass --tokenizer DIR, or --tokenizer bytes for a byte-level test model"
    # Without its files AutoTokenizer may still build an empty tokenizer of the model's type,
    # which silently encodes everything to nothing: require the files.
    if not any((where / name).is_file() for name in _TOKENIZER_FILES):
        raise CommandError(f"no tokenizer files in {where}; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(f"no usable tokenizer in {where} ({type(error).__name__}); {hint}"
                           ) from None
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _sequences(files: list[pathlib.Path], encode, seq_len: int, max_tokens: int):
    """Token sequences of at most seq_len from each file in turn, max_tokens in total."""
    sequences, total = [], 0
    for path in files:
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len][: max_tokens - total]
            if len(chunk) >= 2:  # a one-token sequence carries no reuse
                sequences.append(chunk)
                total += len(chunk)
            if total >= max_tokens:
                return sequences
    return sequences


def run(args: argparse.Namespace) -> int:
    for name in ("max_tokens", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got "
                               f"{getattr(args, name)}")
    if args.generate < 0:
        raise CommandError(f"--generate must be >= 0, got {args.generate}")
    if args.out.suffix not in (".safetensors", ".npz"):
        raise CommandError(f"--out {args.out}: use a .safetensors or .npz file name")
    model_dir = _model_dir(args.model)
    files = _text_files(args, model_dir)

    import torch
    from transformers import AutoModelForCausalLM

    from remoe_engine import metrics, trace

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda asked for, but no CUDA GPU is visible")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device).eval()
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"cannot load a model from {model_dir}: {error}") from None
    encode = _encoder(args, model_dir, int(model.config.get_text_config().vocab_size))
    sequences = _sequences(files, encode, args.seq_len, args.max_tokens)
    if not sequences:
        raise CommandError("the text gives no sequence of at least 2 tokens")

    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    names = ", ".join(p.name for p in files[:8]) + (f", ... ({len(files)} files)"
                                                    if len(files) > 8 else "")
    source = f"{names} (sha256 {digest.hexdigest()[:16]}, seq_len {args.seq_len})"
    generate_kwargs = ({"max_new_tokens": args.generate, "do_sample": False}
                       if args.generate else None)
    parts = []
    try:
        for start in range(0, len(sequences), args.batch_size):
            batch = sequences[start : start + args.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):
                # generate() continues from the last position: pad prompts on the left.
                cols = slice(width - len(seq), width) if generate_kwargs else slice(0, len(seq))
                ids[row, cols] = torch.tensor(seq)
                mask[row, cols] = 1
            parts.append(trace.record(model, ids.to(args.device), attention_mask=mask.to(
                args.device), probs=args.probs, generate_kwargs=generate_kwargs, source=source,
                model_name=str(args.model) if args.model else "remoe_engine.zoo:tiny"))
    except NotImplementedError as error:
        raise CommandError(str(error)) from None
    result = trace.concatenate(parts)
    result.save(args.out)
    reuse = metrics.expert_reuse(result)
    print(f"wrote {args.out}: {result.num_tokens} tokens in {result.num_sequences} sequences, "
          f"{result.num_layers} MoE layers, top-{result.top_k} of {result.num_experts} experts, "
          f"EOR {reuse.eor:.3f} (random routing {reuse.eor_random:.3f})")
    return 0
