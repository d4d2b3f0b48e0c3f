"""remoe-engine: run Mixture-of-Experts LLMs whose experts do not fit in fast memory.

Importing the package is cheap: the compiled extension (`remoe_engine._C`) loads when an op is
first used, through `remoe_engine.ops`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("remoe-engine")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["Handle", "__version__", "apply_router_delta", "load", "patch"]


def __getattr__(name: str):
    # patch/load pull in transformers and the compiled extension: import them on first use.
    if name in ("patch", "load", "Handle"):
        from remoe_engine import offload as _offload

        return getattr(_offload, name)
    if name == "apply_router_delta":
        from remoe_engine.finetune.delta import apply_router_delta

        return apply_router_delta
    raise AttributeError(f"module 'remoe_engine' has no attribute {name!r}")
