"""Tiny checkpoints whose routed experts are stored compressed, in the exact layouts of
transformers' quantization integrations: finegrained FP8 (quantized by transformers' own
`Fp8Quantize`) and MXFP4 (GPT-OSS's `*_blocks` / `*_scales`, quantized here; transformers only
quantizes MXFP4 with its Triton kernels)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _rewrite(directory: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))


def is_routed_expert_weight(key: str) -> bool:
    return ".experts." in key and ".shared_expert" not in key and key.endswith(".weight")


def write_fp8(model, directory: Path, block: tuple[int, int] = (16, 32),
              scale_fmt: str = "float") -> Path:
    """Save `model` with every routed expert weight quantized by transformers' Fp8Quantize
    (float8_e4m3fn + `weight_scale_inv`, fp32 or UE8M0), config.json saying so."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    directory = Path(directory)
    model.save_pretrained(directory)
    config = FineGrainedFP8Config(weight_block_size=list(block), scale_fmt=scale_fmt)
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=config))
    out = {}
    for key, value in load_file(directory / "model.safetensors").items():
        if is_routed_expert_weight(key):
            pair = quantize._quantize_one(key, value)
            assert len(pair) == 2, f"{key} {list(value.shape)} does not tile into {block} blocks"
            out.update(pair)
        else:
            out[key] = value
    _rewrite(directory, out, {"quant_method": "fp8", "weight_block_size": list(block),
                              "activation_scheme": "dynamic", "scale_fmt": scale_fmt})
    return directory


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., R, C] (C a multiple of 32) -> (blocks uint8 [.., R, C/32, 16], scales uint8
    [.., R, C/32]): per 32 values the smallest power of two 2^e with max |w| / 2^e <= 6, stored
    as e + 127, and each value's nearest e2m1 code (low nibble = even element)."""
    *lead, R, C = w.shape
    g = w.float().reshape(*lead, R, C // 32, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    idx = (x.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1)
    codes = (idx | ((x < 0).long() << 3)).to(torch.uint8)  # [.., R, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8)


def write_mxfp4(model, directory: Path) -> Path:
    """Save a GPT-OSS model with its experts' gate_up_proj and down_proj as MXFP4 blocks and
    scales, as the GPT-OSS releases ship them (biases stay as they are)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    out = {}
    for key, value in load_file(directory / "model.safetensors").items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            # In memory [E, in, out]; on disk the blocks hold [E, out, in] (transformers
            # transposes after dequantizing).
            blocks, scales = quantize_mxfp4(value.transpose(1, 2))
            out[key + "_blocks"], out[key + "_scales"] = blocks, scales
        else:
            out[key] = value
    _rewrite(directory, out, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]})
    return directory


def with_dequantized_experts(model, store):
    """A copy of `model` whose routed experts are a compressed store's dequantized tensors
    (float32): what loading that store must compute."""
    import copy

    from remoe_engine.families import find_moe_blocks

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for block in find_moe_blocks(ref):
            for e in range(store.num_experts):
                for name, t in store.expert_tensors(block.layer_idx, e, torch.float32).items():
                    getattr(block.experts, name)[e].copy_(t)
    return ref
