"""The built-in model zoo: small MoE checkpoints trained by this project and shipped in the package.

No model hub is reachable on many machines, and random weights route randomly, so the project
trains its own small Qwen3-MoE on text every machine has (the Python standard library's sources)
and ships it here. Each checkpoint is a plain Hugging Face directory::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import remoe_engine.zoo

    model = AutoModelForCausalLM.from_pretrained(remoe_engine.zoo.path("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(remoe_engine.zoo.path("tiny"))

This subpackage depends on nothing else of ours (only torch, transformers, tokenizers, safetensors,
tqdm and matplotlib), so every other layer may use it. Importing it is cheap: torch and
transformers load only when training or evaluation is asked for (`remoe_engine.zoo.train`,
`remoe_engine.zoo.evaluate`).
"""

from __future__ import annotations

import pathlib

__all__ = ["ZooError", "available", "path"]

_ZOO_DIR = pathlib.Path(__file__).resolve().parent


class ZooError(ValueError):
    """A user error in the zoo (unknown model name, unusable data folder); one clear line."""


def available() -> list[str]:
    """Names of the checkpoints shipped with this installation.

    Returns:
        Sorted names; each is a subdirectory of this package holding a `config.json`.
    """
    return sorted(p.name for p in _ZOO_DIR.iterdir() if (p / "config.json").is_file())


def path(name: str = "tiny") -> pathlib.Path:
    """The directory of a shipped checkpoint, loadable with `from_pretrained`.

    Args:
        name: checkpoint name, e.g. "tiny" (see `available()`).

    Returns:
        Absolute path of the checkpoint directory (config, safetensors, tokenizer, model card).

    Raises:
        ZooError: if no checkpoint of that name is shipped; the message lists those that are.
    """
    names = available()
    if name not in names:
        listed = ", ".join(names) if names else "none (the package was installed without them)"
        raise ZooError(f"unknown built-in model {name!r}; available: {listed}")
    return _ZOO_DIR / name
