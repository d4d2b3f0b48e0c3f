"""Local text for router fine-tuning: plain text files, JSONL, folders, `datasets` saved to disk.

Every source becomes one token stream (each document followed by the tokenizer's end-of-text
token, as the built-in model's own training stream), from which training draws windows. With no
source given, the built-in model's own training split is used (the held-out files never are), so
the held-out perplexity stays comparable with the model card.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import torch

from remoe_engine.zoo import ZooError
from remoe_engine.zoo import data as zdata

# Keys tried, in order, for the text of a JSONL record or a dataset row.
TEXT_KEYS = ("text", "content", "document", "body")


class DataError(ValueError):
    """Unusable training or evaluation text; the message is one line naming the problem."""


def _record_text(record, where: str, text_key: str | None) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    keys = (text_key,) if text_key else TEXT_KEYS
    for key in keys:
        if isinstance(record.get(key), str):
            return record[key]
    raise DataError(f"{where}: no string field {' or '.join(repr(k) for k in keys)} "
                    f"(fields: {', '.join(sorted(record)) or 'none'}); pass --text-key")


def read_jsonl(path: pathlib.Path, text_key: str | None = None) -> list[str]:
    """The texts of a JSON-lines file (one object per line; blank lines skipped).

    Args:
        path: the .jsonl file.
        text_key: field holding the text; None tries `TEXT_KEYS` in order.

    Returns:
        One string per record.

    Raises:
        DataError: on a line that is not JSON or has no text field.
    """
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            texts.append(_record_text(record, f"{path}:{number}", text_key))
    return texts


def _is_saved_dataset(path: pathlib.Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json").is_file()


def read_saved_dataset(path: pathlib.Path, text_key: str | None = None,
                       split: str = "train") -> list[str]:
    """The texts of a Hugging Face `datasets` dataset written with `save_to_disk`.

    Args:
        path: the dataset folder.
        text_key: column holding the text; None tries `TEXT_KEYS`.
        split: split to read when the folder holds a DatasetDict.

    Returns:
        One string per row.

    Raises:
        DataError: if `datasets` is not installed, the split or the text column is missing.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved `datasets` dataset; pip install datasets to read "
                        "it") from None
    ds = datasets.load_from_disk(os.fspath(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    keys = (text_key,) if text_key else TEXT_KEYS
    column = next((k for k in keys if k in ds.column_names), None)
    if column is None:
        raise DataError(f"{path}: no text column {' or '.join(repr(k) for k in keys)} "
                        f"(columns: {', '.join(ds.column_names)}); pass --text-key")
    return [t for t in ds[column] if isinstance(t, str)]


def read_texts(source: str | os.PathLike, text_key: str | None = None,
               suffixes: Sequence[str] | None = None) -> list[str]:
    """Documents from a local source.

    Args:
        source: a text file (any suffix but .jsonl: the whole file is one document), a .jsonl
            file, a folder saved by `datasets.save_to_disk`, or a folder of text files (read
            recursively, see `remoe_engine.zoo.data.discover`).
        text_key: JSONL field or dataset column holding the text.
        suffixes: file endings read from a folder of text files.

    Returns:
        Non-empty documents in a fixed order.

    Raises:
        DataError: if the source does not exist or holds no text.
    """
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    if path.is_dir():
        if _is_saved_dataset(path):
            texts = read_saved_dataset(path, text_key)
        else:
            try:
                texts = [f.read() for f in zdata.discover(path, suffixes)]
            except ZooError as e:
                raise DataError(str(e)) from None
    elif path.suffix == ".jsonl":
        texts = read_jsonl(path, text_key)
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"data source {str(path)!r} holds no text (empty)")
    return texts


def zoo_split_texts(card: dict | None = None) -> tuple[list[str], list[str]]:
    """The built-in model's own (train, held-out) texts, by the split its card records.

    Args:
        card: the model's card.json dict (its "data" section gives the fraction and seed);
            None uses the zoo defaults (fraction 0.1, seed 0, the standard library).

    Returns:
        (train texts, held-out texts), each in the order the zoo tokenizes them.
    """
    data = (card or {}).get("data", {})
    fraction = float(data.get("held_out_fraction", 0.1))
    seed = int(data.get("split_seed", 0))
    source = data.get("source", "python-stdlib")
    root = None if source == "python-stdlib" else source
    files = zdata.discover(root, data.get("suffixes"))
    train, held = zdata.split(files, fraction, seed)
    return [f.read() for f in train], [f.read() for f in held]


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each text followed by end-of-text (the zoo's own encoding).

    Args:
        tokenizer: a transformers tokenizer with an eos token.
        texts: documents.

    Returns:
        int64 [N].

    Raises:
        DataError: if the texts encode to fewer than 2 tokens.
    """
    from remoe_engine.zoo.train import encode_files

    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text token to separate documents")
    if hasattr(tokenizer, "backend_tokenizer"):
        ids = encode_files(tokenizer, texts).long()
    else:  # a slow tokenizer: same stream, one call per document
        stream: list[int] = []
        for t in texts:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor(stream, dtype=torch.int64)
    if ids.numel() < 2:
        raise DataError("the text encodes to fewer than 2 tokens")
    return ids


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Random training windows (uniform start positions) from a token stream.

    Args:
        stream: int64 [N] token stream.
        batch: windows to draw.
        seq_len: tokens per window.
        generator: the random source (seeded per step and process by the trainer).

    Returns:
        int64 [batch, seq_len].

    Raises:
        DataError: if the stream is shorter than one window.
    """
    if stream.numel() < seq_len:
        raise DataError(f"need at least {seq_len} tokens for one window, the text has "
                        f"{stream.numel()}; use less --seq-len or more text")
    starts = torch.randint(0, stream.numel() - seq_len + 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).long()


def load_card(model_path: str | os.PathLike) -> dict | None:
    """The built-in model card (`card.json`) of a checkpoint folder, or None."""
    path = pathlib.Path(model_path) / "card.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_texts(model_path: str | os.PathLike, data: str | os.PathLike | None, part: str,
                  text_key: str | None = None) -> tuple[list[str], str]:
    """Texts for training ("train") or evaluation ("held_out").

    With `data`, its documents (all of them, for either part). Without, the checkpoint's own
    split when it is a built-in model (its card.json records the split), so training never sees
    the held-out files and perplexities match the card's.

    Returns:
        (texts, a one-line description of where they came from).

    Raises:
        DataError: if no data is given and the checkpoint is not a built-in model, or the source
            is unusable.
    """
    if data is not None:
        return read_texts(data, text_key), os.fspath(data)
    card = load_card(model_path)
    if card is None:
        raise DataError(f"{os.fspath(model_path)!r} is not a built-in model (no card.json): "
                        "pass --data with local text")
    train, held = zoo_split_texts(card)
    texts = train if part == "train" else held
    return texts, f"built-in model's {part.replace('_', '-')} split ({len(texts)} files)"
