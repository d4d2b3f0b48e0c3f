"""The README stays true: its results tables are generated from bench/results/*.json."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_results_tables_are_generated_from_the_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_table.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
