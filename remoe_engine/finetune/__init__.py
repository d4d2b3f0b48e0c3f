"""ReMoE router fine-tuning: the reuse-locality loss, router-only training, router deltas.

`remoe_engine.finetune.apply_router_delta(model, path)` loads a shipped router delta (e.g.
`remoe_engine/zoo/tiny/router-delta.safetensors`) into a model. The loss is in `.loss`, training
in `.train` (runs under `accelerate launch`), evaluation in `.evaluate`.
"""

from __future__ import annotations

from remoe_engine.finetune.delta import apply_router_delta, save_router_delta
from remoe_engine.finetune.loss import ReMoEConfig

__all__ = ["ReMoEConfig", "apply_router_delta", "save_router_delta"]
