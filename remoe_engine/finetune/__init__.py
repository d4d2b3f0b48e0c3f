"""ReMoE router fine-tuning: the reuse-locality loss, router-only training, router deltas.

`remoe_engine.finetune.apply_router_delta(model, path)` loads a shipped router delta (e.g.
`remoe_engine/zoo/tiny/router-delta.safetensors`) into a model. The config is in `.config`, the
loss in `.loss`, training in `.train` (runs under `accelerate launch`); evaluation is the
project's one harness, `remoe_engine.evaluation`.

Importing the package is cheap (the command line reads the config's defaults): torch loads with
the first name that needs it.
"""

from __future__ import annotations

from remoe_engine.finetune.config import ReMoEConfig

__all__ = ["ReMoEConfig", "apply_router_delta", "save_router_delta"]


def __getattr__(name: str):
    if name in ("apply_router_delta", "save_router_delta"):
        from remoe_engine.finetune import delta

        return getattr(delta, name)
    raise AttributeError(f"module 'remoe_engine.finetune' has no attribute {name!r}")
