"""The package's shape: each module imports only layers below it (docs/design.md section 3), and
only families.py names a model family."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "remoe_engine"

# Bottom up, as docs/design.md section 3 draws them; a module may import its own layer and below.
LAYERS = [
    {"units", "hf_compat", "tiny_models"},
    {"ops", "reference", "sim_reference", "quant"},
    {"families"},
    {"store"},
    {"pool"},
    {"router", "experts"},
    {"trace"},
    {"offload"},
    {"metrics", "sim"},
    {"evaluation"},
    {"zoo"},
    {"finetune"},
    {"compare", "coverage", "serve", "cli", "commands", "__main__"},
]


def _layer(module: str) -> int | None:
    """Layer index of `remoe_engine.X[.Y]`, None for the package itself."""
    parts = module.split(".")
    if parts[0] != "remoe_engine" or len(parts) == 1:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/design.md")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path) -> set[str]:
    """Every remoe_engine module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("remoe_engine")}


def test_every_import_goes_down_the_layers():
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        mine = _layer(name)
        for target in _imports(path):
            if target not in modules or target == name:
                continue
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def _code_strings(path: pathlib.Path) -> list[tuple[int, str]]:
    """String constants and names of a file, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            out.append((node.lineno, node.value.lower()))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id.lower()))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr.lower()))
    return out


def test_only_families_py_names_a_family():
    pytest.importorskip("transformers")
    from remoe_engine.families import FAMILIES

    names = set(FAMILIES) | {"block_sparse_moe", "deepseek", "mixtral", "qwen", "gpt_oss"}
    # The built-in model is a Qwen3-MoE by definition: its training script builds that config.
    # tiny_models shrinks every family's config for `remoe families`: per-family config data.
    allowed = {PACKAGE / "families.py", PACKAGE / "zoo" / "train.py",
               PACKAGE / "commands" / "zoo.py", PACKAGE / "tiny_models.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in allowed:
            continue
        for line, text in _code_strings(path):
            hits = [n for n in names if n in text]
            if hits:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {hits[0]}")
    assert not found, "family knowledge outside families.py:\n" + "\n".join(found)
