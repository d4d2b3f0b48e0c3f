"""What a new user meets first: importing the package without its compiled extension."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import remoe_engine

PACKAGE = pathlib.Path(remoe_engine.__file__).resolve().parent

# Imports remoe_engine.ops twice from the copy in the working directory: first with no compiled
# extension there, then with a file in its place that is not a shared library. One interpreter for
# both, since importing torch is most of the cost.
_SCRIPT = textwrap.dedent("""
    import importlib, json, pathlib, sys

    # As after a plain `pip install .`: an editable install's finder (one may be in this venv)
    # would otherwise supply remoe_engine._C from its own tree when the copy here has none.
    sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]

    def attempt():
        for name in [m for m in sys.modules if m.startswith("remoe_engine")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        package = importlib.import_module("remoe_engine")
        try:
            importlib.import_module("remoe_engine.ops")
        except ImportError as e:
            return dict(type=type(e).__name__, message=str(e), file=package.__file__)
        return dict(type=None, message="", file=package.__file__)

    missing = attempt()
    pathlib.Path("remoe_engine/_C.abi3.so").write_bytes(b"not a shared library\\n" * 8)
    broken = attempt()
    print(json.dumps(dict(missing=missing, broken=broken)))
""")


@pytest.mark.slow  # about 2 s: a fresh interpreter imports torch
def test_import_from_a_source_tree_without_the_extension_says_what_to_do(tmp_path):
    """Running a README block from the repository root imports ./remoe_engine, which holds no
    compiled _C unless it was built in place: the error must say so and how to fix it."""
    shutil.copytree(PACKAGE, tmp_path / "remoe_engine",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "zoo", "__pycache__"))
    (tmp_path / "setup.py").write_text("")  # what makes a checkout a source tree
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    missing, broken = res["missing"], res["broken"]
    package_dir = str((tmp_path / "remoe_engine").resolve())
    assert missing["file"].startswith(package_dir), missing  # the copy, not an installed package

    assert missing["type"] == "ImportError"
    message = missing["message"]
    assert f"source tree at {tmp_path.resolve()}" in message, message
    assert "no compiled extension" in message, message
    assert "run from another directory" in message, message
    assert "pip install --no-build-isolation -e ." in message, message
    assert "python setup.py build_ext --inplace" in message, message
    assert "failed to load" not in message, message

    # An extension that is there but does not load: say which file, keep the loader's reason.
    assert broken["type"] == "ImportError"
    message = broken["message"]
    assert os.path.join(package_dir, "_C.abi3.so") in message, message
    assert "failed to load" in message, message
    assert "invalid ELF header" in message, message  # the dynamic loader's own words
    assert f"torch {_torch_version()}" in message, message


def _torch_version() -> str:
    import torch

    return torch.__version__
