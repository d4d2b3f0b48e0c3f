"""A tiny random causal LM for EVERY MoE family in the installed transformers, or why there is none.

`tests/hf_tiny.py` hand-writes a config per family for a sample of twelve. This module enumerates
instead: a family is every `transformers/models/<x>/` whose modeling file uses
`use_experts_implementation`, found at runtime, so a new transformers release adds its new families
here without a code change.

A config is shrunk by generic rules keyed on field names (`_shrink`), starting from the config
class defaults; `OVERRIDES` holds the few fields per family that no name rule can guess. Every
model returned has run one forward and one greedy `generate` on CPU; a model that cannot is
`Unbuildable`, with the first line of the error as the reason. Nothing here imports remoe_engine.
"""

from __future__ import annotations

import functools
import glob
import math
import os

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import (
    CONFIG_MAPPING_NAMES,
    model_type_to_module_name,
)

LAYERS = 4  # decoder layers kept: one dense-first layer (where a family has one) + >= 2 MoE layers
HIDDEN = 64
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
EXPERTS, TOP_K, SHARED = 8, 2, 1
GROUPS, TOPK_GROUPS = 4, 2  # 8 experts in 4 groups of 2: DeepSeek-V3 scores a group by its top-2
VOCAB = 256
POSITIONS = 128
MAX_PARAMS = 5_000_000  # a tiny model here has well under 1M; more means a field was missed
WINDOW = 8  # smaller than the 12 tokens a check sees, so sliding-window masks really cut
# No expert matrix may be square: with I, 2I and the dense width all unlike HIDDEN, a checkpoint
# read transposed (or gate and up swapped for down) changes a shape and cannot pass a check.
EXPERT_WIDTH, DENSE_WIDTH = 24, 40

# Exact field names -> tiny value. A value is only ever lowered: a 0 or a small default stays.
SIZES: dict[str, int] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": POSITIONS,
    "model_max_length": POSITIONS,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "o_lora_rank": 16,
    # MLA: 24 + 8 = 32, so a rope share computed as rope / (nope + rope) is exactly 1/4.
    "qk_nope_head_dim": 24,
    "qk_rope_head_dim": 8,
    "rotary_dim": 8,
    "index_topk": 4,
    "sliding_window": WINDOW,
    "sliding_window_size": WINDOW,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_chunk_size": 16,
    "chunk_size": 16,
    "mamba_dt_rank": 8,
    "index_kpool": 4,  # index_topk must be a multiple
    "mamba_d_head": HEAD_DIM,
    "n_groups": 2,  # Mamba-2 B/C groups: must divide the mamba heads
    "mamba_n_groups": 1,
    "hidden_size_per_layer_input": 16,
    "router_hidden_size": 32,
    # Vision and audio towers: only built, never run (the check feeds text only).
    "depth": 2,
    "encoder_layers": 2,
    "d_model": HIDDEN,
    "out_hidden_size": HIDDEN,  # projects into the text model
    "output_dim": HIDDEN,
    "mlp_dim": 64,
    "output_channels": 64,
    "downsample_hidden_size": 32,
    "moe_hidden_size": EXPERT_WIDTH,
}
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                 "num_routed_experts")
TOP_KS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k",
          "experts_per_token", "top_k_experts")
SHARED_COUNTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
GROUP_COUNTS = ("n_group", "num_expert_group")
# Counts of leading dense layers: keep the pattern with one.
DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Per family, the fields a name rule cannot guess (applied last, to the text config;
# "vision_config.x" reaches a sub-config). Each entry says why.
OVERRIDES: dict[str, dict] = {
    # The default config has no layer_types and the model indexes it; conv and attention alternate.
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # The default stack is Mamba only, which its cache cannot serve; Granite-4 mixes in attention.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
    # The default 4-layer block pattern has one MoE layer; 2 show routing across layers.
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"]},
    # Sliding layers take their MLA dims from per_layer_config (qk_nope 192 + qk_rope 64 = 256);
    # after the shrink that is 24 + 8.
    "dots3_note": {"head_dim": 32},
    # The model, not the config, holds the default mrope_section ([22, 22, 20] and [8, 12, 12] of
    # a 64- and 32-wide rotary half); the 16-dim head halves to 8 and, with partial rope, to 4.
    "ernie4_5_vl_moe": {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default",
                                            "mrope_section": [3, 3, 2]}},
    "glm4v_moe": {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "rope_type": "default", "mrope_section": [2, 1, 1]}},
    # ZAYA's validator accepts top-1 routing only.
    "zaya": {"num_experts_per_tok": 1},
    # mlp_layer_types defaults to None and the model indexes it.
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    # The default layer_types use indexed attention but every indexer size defaults to None.
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                  "indexer_budget": 8, "indexer_compress_ratio": 4},
}


class Unbuildable(Exception):
    """The family cannot give a tiny runnable causal LM here; `reason` is one line saying why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@functools.cache
def moe_model_types() -> list[str]:
    """Every model directory whose modeling file uses `use_experts_implementation`, sorted.

    The names are the `transformers/models/<x>` directories; they equal the model type except
    where a family registers only sub-types (`inkling` -> `inkling_text`), which `build_tiny`
    resolves.
    """
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = set()
    for path in glob.glob(os.path.join(root, "*", "modeling_*.py")):
        with open(path, encoding="utf-8") as f:
            if "use_experts_implementation" in f.read():
                found.add(os.path.basename(os.path.dirname(path)))
    return sorted(found)


def _registered_types(family: str) -> list[str]:
    """Config model types living in `models/<family>/`, the family's own name first."""
    types = [t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) == family]
    return sorted(types, key=lambda t: (t != family, len(t), t))


def _mapping(name: str) -> dict[str, str]:
    return getattr(modeling_auto, f"MODEL_FOR_{name}_MAPPING_NAMES", {})


def _choose(family: str) -> tuple[str, str]:
    """(config model type, model class name) to build: a text-only causal LM when there is one."""
    types = _registered_types(family)
    if not types:
        raise Unbuildable("no config model type registered for the directory")
    causal = _mapping("CAUSAL_LM")
    text_only = [(t, causal[t]) for t in types
                 if t in causal and "ConditionalGeneration" not in causal[t]]
    # A text causal LM is registered for both the composite type and `<x>_text` in some families;
    # the one whose config has no sub-configs builds without a vision tower.
    text_only.sort(key=lambda tc: bool(getattr(AutoConfig.for_model(tc[0]), "sub_configs", None)))
    if text_only:
        return text_only[0]
    for mapping in ("CAUSAL_LM", "IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM"):
        for t in types:
            if t in _mapping(mapping):
                return t, _mapping(mapping)[t]
    heads = sorted({m[t] for t in types for k, m in vars(modeling_auto).items()
                    if k.startswith("MODEL_FOR_") and isinstance(m, dict) and t in m})
    raise Unbuildable(f"no causal-LM class registered (only {', '.join(heads) or 'a base model'})")


def _pick_layers(per_layer: list[list], total: int, n: int) -> list[int]:
    """Which `n` of `total` layers to keep so that every kind of layer survives.

    A layer's kind is its entry in every per-layer list with few distinct values (attention
    type, dense/sparse, rope on/off). The first n layers keep a dense-first prefix (cut to one
    layer when longer) and a short period; a kind that only appears later (the one
    full-attention layer in six) replaces the tail, in order of first appearance.
    """
    kinds = [tuple(values[i] for values in per_layer) for i in range(total)]
    first: dict[tuple, int] = {}
    for i, kind in enumerate(kinds):
        first.setdefault(kind, i)
    run = next((i for i in range(total) if kinds[i] != kinds[0]), total)
    # A long dense-first prefix (DeepSeek-V3.2: 3 dense layers) keeps one layer, so that at
    # least two of the n layers come after it.
    keep = [0, *range(run, run + n - 1)] if 1 < run < total and run > n - 2 else list(range(n))
    missing = [i for kind, i in first.items() if i >= n][: n - 1]  # layer 0 always stays
    if missing:
        keep[n - len(missing):] = missing
    return keep


def _is_index_list(name: str, values: list) -> bool:
    return ("layer" in name or name.endswith(("indexes", "indices"))) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in values)


def _shrink(cfg) -> dict:
    """Field -> tiny value for one (sub-)config, by generic name rules. Only changed fields."""
    old = cfg if isinstance(cfg, dict) else cfg.to_dict()
    new: dict = {}

    def lower(name: str, value: int) -> None:
        cur = old.get(name)
        if isinstance(cur, int) and not isinstance(cur, bool) and cur > value:
            new[name] = value

    for name, value in SIZES.items():
        lower(name, value)
    for name, cur in old.items():
        if not isinstance(cur, int) or isinstance(cur, bool) or name in SIZES:
            continue
        if name.endswith(("intermediate_size", "ffn_hidden_size", "ffn_dim", "_hidden_size")):
            lower(name, EXPERT_WIDTH if any(s in name for s in ("moe", "expert", "shared"))
                  else DENSE_WIDTH)
        elif name.endswith("head_dim"):
            lower(name, HEAD_DIM)
        elif name.endswith("heads"):
            grouped = any(s in name for s in ("key_value", "kv_", "key_heads", "n_groups"))
            full = old.get("num_attention_heads")
            if grouped and cur == full:
                lower(name, HEADS)  # multi-head attention stays multi-head
            else:
                lower(name, KV_HEADS if grouped else HEADS)
    for name, cur in old.items():
        if name.endswith(("hidden_sizes", "channels")) and isinstance(cur, list):
            new[name] = [min(c, HIDDEN) if isinstance(c, int) else c for c in cur]
    for name, cur in old.items():
        if name.endswith("intermediate_size") and "moe" in name and cur is None:
            new[name] = EXPERT_WIDTH  # DiffusionGemma leaves its MoE sizes None, builds experts
        elif name.endswith("intermediate_size") and isinstance(cur, list):
            new[name] = [min(c, EXPERT_WIDTH) for c in cur]  # ERNIE-VL: [text, vision experts]
    for name, cur in old.items():
        if cur is False and "moe" in name and name.startswith(("enable", "use")):
            new[name] = True  # Gemma-4 builds its MoE block only when asked
    # Routing sizes are set, not just lowered: a default of None (DeepSeek-V2, dots1) or of one
    # expert (HunYuan) would leave nothing to route.
    for names, value in ((EXPERT_COUNTS, EXPERTS), (TOP_KS, TOP_K), (SHARED_COUNTS, SHARED)):
        for name in names:
            cur = old.get(name, 0)
            if cur is None or (isinstance(cur, int) and not isinstance(cur, bool) and cur > 0):
                new[name] = value
    for name in DENSE_FIRST:
        lower(name, 1)
    for name in GROUP_COUNTS:
        if isinstance(old.get(name), int) and old[name] > 1:
            new[name] = GROUPS
            if isinstance(old.get("topk_group"), int):
                new["topk_group"] = min(old["topk_group"], TOPK_GROUPS)
    for name, cur in old.items():
        # Hybrid-stack periods (Jamba: attention every 8th layer from the 4th) fit in 4 layers.
        if name.endswith("_period") and isinstance(cur, int) and cur > 2:
            new[name] = 2
            offset = name[: -len("period")] + "offset"
            if isinstance(old.get(offset), int):
                new[offset] = old[offset] % 2
    for name in [n for n in old if "mamba" in n and n.endswith("heads")]:
        # Mamba-2 heads tile the expanded width: heads * head_dim == expand * hidden.
        head_dim = new.get("mamba_head_dim", new.get("mamba_d_head", HEAD_DIM))
        new[name] = old.get("mamba_expand", old.get("expand", 2)) * HIDDEN // head_dim
    if "head_dim" in old and old["head_dim"] is None:
        new["head_dim"] = HIDDEN // HEADS  # HunYuan's default None crashes its attention
    if old.get("head_dim") and old.get("head_dim") == old.get("qk_rope_head_dim"):
        new["head_dim"] = new.get("qk_rope_head_dim", old["head_dim"])  # DeepSeek ropes head_dim
    if "qk_nope_head_dim" in old:
        qk = (new.get("qk_nope_head_dim", old["qk_nope_head_dim"])
              + new.get("qk_rope_head_dim", old.get("qk_rope_head_dim") or 0))
        if old.get("qk_head_dim"):
            new["qk_head_dim"] = qk
        was = old["qk_nope_head_dim"] + (old.get("qk_rope_head_dim") or 0)
        if old.get("head_dim") and old["head_dim"] in (old.get("qk_head_dim"), was):
            new["head_dim"] = qk  # Mistral-4's head_dim is the whole MLA query head
    rope = old.get("rope_parameters")
    if "qk_rope_head_dim" in old and isinstance(rope, dict) and "partial_rotary_factor" in rope:
        # MLA ropes qk_rope_head_dim of the qk_nope + qk_rope query dims (Mistral-4 writes 0.5).
        rotary = new.get("qk_rope_head_dim", old["qk_rope_head_dim"])
        new["rope_parameters"] = {**rope, "partial_rotary_factor": rotary / (
            rotary + new.get("qk_nope_head_dim", old["qk_nope_head_dim"]))}
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        # Multimodal rope splits the rotary half-dim into (time, height, width) sections; they
        # shrink with the head (or with MLA's rope part).
        key = "qk_rope_head_dim" if "qk_rope_head_dim" in old else "head_dim"
        heads = old.get("num_attention_heads") or 1
        was = old.get(key) or old["hidden_size"] // heads
        now = new.get(key) or new.get("hidden_size", old["hidden_size"]) // new.get(
            "num_attention_heads", heads)
        section = rope["mrope_section"]
        total = max(len(section), sum(section) * now // was)
        scaled = [max(1, round(x * total / sum(section))) for x in section]
        scaled[0] += total - sum(scaled)
        rope = new["rope_parameters"] = {**new.get("rope_parameters", rope),
                                         "mrope_section": scaled}
    layers = old.get("num_hidden_layers")
    if isinstance(layers, int) and layers > LAYERS:
        per_layer = {k: v for k, v in old.items() if isinstance(v, list) and len(v) == layers}
        overrides = old.get("per_layer_config") or {}
        if overrides:  # heterogeneous layers (dots3, DiffusionGemma): an override is a kind too
            by_layer = {int(k): v for k, v in overrides.items()}
            per_layer["per_layer_config"] = [repr(by_layer.get(i)) for i in range(layers)]
        # Lists of layer ids (kv_source_layers) are not kinds: every entry differs.
        kinds = [v for k, v in per_layer.items()
                 if len({repr(x) for x in v}) <= LAYERS and not (_is_index_list(k, v) and
                                                                 len(set(v)) == len(v))]
        keep = _pick_layers(kinds, layers, LAYERS)
        if overrides:
            del per_layer["per_layer_config"]
            new["per_layer_config"] = {str(j): {**by_layer[i], **_shrink(by_layer[i])}
                                       for j, i in enumerate(keep) if i in by_layer}
        for name, values in per_layer.items():
            picked = [values[i] for i in keep]
            if _is_index_list(name, values) and len(set(values)) > LAYERS:
                # A layer id must point into the kept layers: its new index, else the layer itself.
                picked = [keep.index(v) if v in keep else j for j, v in enumerate(picked)]
            new[name] = picked
        for name, values in old.items():
            if isinstance(values, list) and name not in per_layer and _is_index_list(name, values):
                new[name] = [i for i in values if i < LAYERS]  # e.g. mlp_only_layers
    vocab = new.get("vocab_size", old.get("vocab_size"))
    if isinstance(vocab, int):
        for name, small in TOKEN_IDS.items():
            cur = old.get(name)
            if isinstance(cur, int) and cur >= vocab:
                new[name] = small
            elif isinstance(cur, list) and any(i >= vocab for i in cur):
                new[name] = [small]
    return new


def _shrink_tree(config, overrides: dict, prefix: str = "", text=None) -> dict:
    """`_shrink` of a config and, recursively, of every sub-config (vision towers nest two deep)."""
    text = config.get_text_config() if text is None else text
    kwargs = _shrink(config)
    subs = dict(getattr(config, "sub_configs", None) or {})
    for key in subs:
        sub = getattr(config, key, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        # A sub-config is passed whole: its composite parent may set defaults of its own.
        kwargs[key] = {**sub.to_dict(), **_shrink_tree(sub, overrides, f"{prefix}{key}.", text)}
    for key, value in overrides.items():
        own = key[len(prefix):] if prefix and key.startswith(prefix) else None
        if own is None and "." not in key and config is text:
            own = key  # a plain key is a text-config field
        if own is not None and "." not in own:
            kwargs[own] = value
    return kwargs


def _tiny_config(model_type: str, family: str):
    config = AutoConfig.for_model(model_type)
    overrides = OVERRIDES.get(family, {})
    return AutoConfig.for_model(model_type, **_shrink_tree(config, overrides))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _randomize_routers(model: torch.nn.Module) -> None:
    """Give zero-initialized routing tensors values so routing is not a tie.

    Some families zero-init the router weight (every expert scores the same, top-k then falls
    back to index order) or a score-correction bias (its code path adds nothing); both would let
    a wrong routing implementation pass a test.
    """
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.any():
                continue
            leaf = name.rsplit(".", 2)
            owner = leaf[-2] if len(leaf) > 1 else ""
            if "bias" in leaf[-1] and ("correction" in leaf[-1] or "expert" in leaf[-1]):
                tensor.normal_(0.0, 0.05)
            elif leaf[-1] == "weight" and ("router" in owner or owner == "gate"):
                tensor.normal_(0.0, 0.5)


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the family, fp32, eval mode, checked to run on CPU.

    Args:
        model_type: a name from `moe_model_types()`.
        seed: seeds the weight init.

    Returns:
        The model; it has run a forward on [2, 9] random ids and a 3-token greedy `generate`.

    Raises:
        Unbuildable: the family has no causal LM, its config cannot be made small, or the model
            fails to build or to run; `reason` says which, in one line.
    """
    config_type, class_name = _choose(model_type)
    try:
        config = _tiny_config(config_type, model_type)
    except Exception as exc:  # noqa: BLE001 - any config error is the reason
        raise Unbuildable(f"config does not shrink: {_first_line(exc)}") from exc
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise Unbuildable(f"{class_name} is not importable from transformers")
    try:
        with torch.device("meta"):  # count first: an unshrunk field can mean gigabytes
            size = sum(p.numel() for p in cls._from_config(config).parameters())
    except Exception as exc:  # noqa: BLE001
        raise Unbuildable(f"{class_name} does not build: {_first_line(exc)}") from exc
    if size > MAX_PARAMS:
        raise Unbuildable(f"config does not shrink: {size / 1e6:.1f}M parameters")
    torch.manual_seed(seed)
    try:
        model = cls._from_config(config, torch_dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001
        raise Unbuildable(f"{class_name} does not build: {_first_line(exc)}") from exc
    _randomize_routers(model)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            model.generate(ids, max_new_tokens=3, do_sample=False)
    except Exception as exc:  # noqa: BLE001
        raise Unbuildable(f"{class_name} does not run: {_first_line(exc)}") from exc
    if logits.shape != (*ids.shape, vocab):
        raise Unbuildable(f"{class_name} is not a causal LM: logits {list(logits.shape)} for ids "
                          f"{list(ids.shape)}")
    if not torch.isfinite(logits).all() or math.isclose(logits.std().item(), 0.0):
        raise Unbuildable(f"{class_name} gives non-finite or constant logits")
    return model
