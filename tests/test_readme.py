"""The README stays true: its results tables are generated from bench/results/*.json."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each test runs remoe or a subprocess


def test_results_tables_are_generated_from_the_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_table.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if not inside and line.strip() == "```python":
            inside, current = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    """Each Python block of the README runs as written, in a fresh interpreter."""
    import os

    import remoe_engine

    package_root = os.path.dirname(os.path.dirname(remoe_engine.__file__))
    script = tmp_path / f"block{index}.py"
    script.write_text(_python_blocks()[index])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": package_root},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
