"""`remoe --help` and every `remoe X --help` answer without importing torch (it takes seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from remoe_engine import cli

COMMANDS = [name.rsplit(".", 1)[1] for name in cli._COMMAND_MODULES]

PROBE = """
import contextlib, io, sys
from remoe_engine import cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main(sys.argv[1:])
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "remoe_engine._C") if m in sys.modules)
print(",".join(heavy))
"""

pytestmark = pytest.mark.slow  # each test runs remoe or a subprocess


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"remoe {' '.join(argv)} imported {out.stdout.strip()}"
