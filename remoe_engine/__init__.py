"""remoe-engine: run Mixture-of-Experts LLMs whose experts do not fit in fast memory.

Importing the package is cheap: the compiled extension (`remoe_engine._C`) loads when an op is
first used, through `remoe_engine.ops`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("remoe-engine")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
