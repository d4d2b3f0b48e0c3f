"""Router deltas: the fine-tuned router weights alone, as one small safetensors file.

`router-delta.safetensors` holds every router parameter of the fine-tuned model under its
`state_dict` name (full tensors, not differences: applying it twice is harmless, and any tool that
reads safetensors can inspect it). Its metadata names the model type and the hash of the routers
it was trained from, so applying it to another model is refused with a clear message.

A delta may also carry a learned reuse bias (`remoe_engine.finetune.bias`): the tensor
`STRENGTHS_NAME` ([MoE layers, 1] or [MoE layers, experts], float32) and the metadata
`reuse_bias_source` ("previous" or "resident") and `reuse_bias_slots`. Deltas without it load as
before; strengths whose shape does not fit the model are refused.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from torch import nn

from remoe_engine.families import find_moe_blocks

DELTA_NAME = "router-delta.safetensors"
STRENGTHS_NAME = "remoe.reuse_bias.strengths"
# install_learned_bias and LEARNED_ATTR live with the routers they configure (router.py, a layer
# below fine-tuning, where patch()/load() reach them); re-exported here.
from remoe_engine.router import LEARNED_ATTR, install_learned_bias  # noqa: E402,F401


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router parameter of a model, by `state_dict` name, in layer order.

    Args:
        model: a transformers MoE model of a supported family.

    Returns:
        name -> parameter (weight [E, H], plus bias [E] for GPT-OSS). Buffers such as DeepSeek-V3's
        `e_score_correction_bias` are not parameters and never train.

    Raises:
        ValueError: if the model has no MoE router.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks with a router")
    ids = {id(b.router) for b in blocks}
    params = {}
    for module_name, module in model.named_modules():
        if id(module) in ids:
            for name, p in module.named_parameters(recurse=False):
                params[f"{module_name}.{name}"] = p
    return params


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: pathlib.Path,
                      metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(tmp),
              metadata=metadata)
    os.replace(tmp, path)


def save_router_delta(model: nn.Module, path: str | os.PathLike, *, base_router_hash: str = "",
                      extra: dict | None = None, reuse_bias=None) -> pathlib.Path:
    """Write the router weights of a model as a router delta (atomically).

    Args:
        model: the fine-tuned model.
        path: output file (or a folder, which gets `router-delta.safetensors`).
        base_router_hash: `remoe_engine.trace.router_hash` of the original model's routers.
        extra: more JSON-serializable metadata (e.g. the fine-tuning config).
        reuse_bias: a `bias.LearnedBias` to ship with the router weights, or None.

    Returns:
        The written file's path.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / DELTA_NAME
    metadata = {
        "format": "remoe-router-delta/1",
        "model_type": str(getattr(model.config, "model_type", "")),
        "base_router_hash": base_router_hash,
        "extra": json.dumps(extra or {}),
    }
    tensors = dict(router_parameters(model))
    if reuse_bias is not None:
        metadata["format"] = "remoe-router-delta/2"
        metadata["reuse_bias_source"] = reuse_bias.source
        metadata["reuse_bias_slots"] = "" if reuse_bias.slots is None else str(reuse_bias.slots)
        tensors[STRENGTHS_NAME] = reuse_bias.strengths.float()
    _atomic_save_file(tensors, path, metadata)
    return path


def learned_bias_of(tensors: dict[str, torch.Tensor], meta: dict[str, str]):
    """The `bias.LearnedBias` a delta carries (removed from `tensors`), or None.

    Raises:
        ValueError: strengths without a source, or a source without strengths, or bad values.
    """
    from remoe_engine.finetune.bias import LearnedBias

    strengths = tensors.pop(STRENGTHS_NAME, None)
    source = meta.get("reuse_bias_source")
    if strengths is None and not source:
        return None
    if strengths is None or not source:
        raise ValueError("router delta has reuse-bias strengths without a source, or a source "
                         "without strengths (a damaged file)")
    slots = meta.get("reuse_bias_slots") or None
    return LearnedBias(source, strengths.float(), None if slots is None else int(slots))


def read_learned_bias(path: str | os.PathLike):
    """The learned reuse bias of a router-delta file, or None when it has none."""
    tensors, meta = read_router_delta(path)
    return learned_bias_of(tensors, meta)


def read_router_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a router-delta file.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    if path.is_dir():
        path = path / DELTA_NAME
    if not path.is_file():
        raise FileNotFoundError(f"router delta {str(path)!r} does not exist")
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@torch.no_grad()
def apply_router_delta(model: nn.Module, path: str | os.PathLike, *,
                       check_base: bool = False, weights_only: bool = False) -> nn.Module:
    """Load fine-tuned router weights into a model in place.

    Args:
        model: a transformers MoE model of the family the delta was trained on (may be patched
            by `remoe_engine.patch`: routers keep their parameters).
        path: a router-delta file, or a folder holding `router-delta.safetensors`.
        check_base: also require the model's current routers to be the ones the delta was
            trained from (their hash); off by default so a delta can be re-applied.
        weights_only: leave out a learned reuse bias the delta carries.

    Returns:
        The model (its router parameters overwritten, cast to their dtype and device; a learned
        reuse bias installed in its patched routers, or kept for a later `patch()`).

    Raises:
        ValueError: if the delta's model type, names or shapes do not match the model's routers,
            or its reuse-bias strengths do not fit the model.
    """
    tensors, meta = read_router_delta(path)
    learned = learned_bias_of(tensors, meta)
    model_type = str(getattr(model.config, "model_type", ""))
    if meta.get("model_type") and meta["model_type"] != model_type:
        raise ValueError(f"router delta is for model type {meta['model_type']!r}, the model is "
                         f"{model_type!r}")
    if check_base and meta.get("base_router_hash"):
        from remoe_engine.trace import router_hash

        if router_hash(model) != meta["base_router_hash"]:
            raise ValueError("router delta was trained from other routers than this model's "
                             "(router hash differs)")
    params = router_parameters(model)
    missing = sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise ValueError(f"router delta does not match the model's routers: missing "
                         f"{missing[:3]}, unknown {unknown[:3]}")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"router delta {name}: shape {list(tensors[name].shape)} != "
                             f"model {list(param.shape)}")
    if learned is not None and not weights_only:
        blocks = find_moe_blocks(model)
        learned.check_model(len(blocks), int(blocks[0].experts.num_experts))
    for name, param in params.items():
        param.copy_(tensors[name].to(param.device, param.dtype))
    if learned is not None and not weights_only:
        install_learned_bias(model, learned)
    return model


def checkpoint_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint folder's model safetensors files.

    Raises:
        FileNotFoundError: if the folder holds no model safetensors.
    """
    from safetensors import safe_open

    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: exactly the files the index names
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:  # other .safetensors in the folder (a delta, a data slice) are not the model
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if not files:
        raise FileNotFoundError(f"no model .safetensors files in {str(folder)!r}")
    tensors = {}
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def changed_tensors(before: str | os.PathLike, after: str | os.PathLike) -> list[str]:
    """Names of the tensors that differ between two checkpoint folders (bitwise, with dtype).

    A tensor present in only one of the two counts as changed.

    Args:
        before, after: Hugging Face checkpoint folders.

    Returns:
        Sorted tensor names.
    """
    a, b = checkpoint_tensors(before), checkpoint_tensors(after)
    changed = set(a) ^ set(b)
    for key in set(a) & set(b):
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape or not torch.equal(
                a[key], b[key]):
            changed.add(key)
    return sorted(changed)
