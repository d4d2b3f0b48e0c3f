"""Corpus discovery and the held-out split for the built-in models.

The default corpus is the running Python's standard library (`.py` sources, docstrings included):
real text that every machine with this package has. Any folder of text files works by option.

The split is by file and depends only on each file's relative path and the seed (a hash), never on
which other files exist, so two Pythons whose standard libraries differ by a few files still agree
on every file they share.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from remoe_engine.zoo import ZooError

# Directories never read from the standard library: test suites are huge, repetitive and partly
# machine-generated (they would dominate the corpus), site-packages is not the standard library,
# and __pycache__ holds bytecode.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

# Suffixes read from a user-given folder unless the caller names others.
DEFAULT_TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")

# Directories never read from any folder (version control, caches, virtual environments).
ALWAYS_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "node_modules"})


@dataclass(frozen=True)
class TextFile:
    """One corpus file.

    Args:
        name: path relative to the corpus root, POSIX separators (the split key).
        path: absolute path on this machine.
    """

    name: str
    path: pathlib.Path

    def read(self) -> str:
        """The file's text (UTF-8; undecodable bytes replaced so one odd file cannot stop a run)."""
        return self.path.read_text(encoding="utf-8", errors="replace")


def stdlib_dir() -> pathlib.Path:
    """The running Python's standard library directory (the default corpus)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def discover(
    root: pathlib.Path | str | None = None, suffixes: Sequence[str] | None = None
) -> list[TextFile]:
    """Find the corpus files under a folder.

    Args:
        root: folder to read; None means this Python's standard library (`.py` only, skipping
            `STDLIB_SKIP_DIRS`).
        suffixes: file name endings to read (e.g. [".py", ".txt"]); None means `.py` for the
            standard library and `DEFAULT_TEXT_SUFFIXES` for any other folder.

    Returns:
        Non-empty files sorted by relative name.

    Raises:
        ZooError: if the folder does not exist or holds no non-empty file with those suffixes.
    """
    is_stdlib = root is None
    base = stdlib_dir() if root is None else pathlib.Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ZooError(f"data folder {str(base)!r} does not exist or is not a folder")
    if suffixes is None:
        suffixes = (".py",) if is_stdlib else DEFAULT_TEXT_SUFFIXES
    wanted = tuple(s if s.startswith(".") else "." + s for s in suffixes)
    skip = ALWAYS_SKIP_DIRS | (STDLIB_SKIP_DIRS if is_stdlib else frozenset())
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Pruning here (not filtering afterwards) keeps a large site-packages from being walked.
        dirnames[:] = [d for d in dirnames if d not in skip]
        for filename in filenames:
            p = pathlib.Path(dirpath, filename)
            if p.suffix in wanted and p.is_file() and p.stat().st_size > 0:
                files.append(TextFile(p.relative_to(base).as_posix(), p))
    if not files:
        raise ZooError(
            f"no non-empty text files ({', '.join(wanted)}) under {str(base)!r}; "
            "pass --data with a folder of text files"
        )
    return sorted(files, key=lambda f: f.name)


def is_held_out(name: str, fraction: float, seed: int) -> bool:
    """Whether a file belongs to the held-out set.

    A hash of (seed, name) decides, so the answer for one file never depends on the others.

    Args:
        name: the file's relative name.
        fraction: expected share of files held out, in (0, 1).
        seed: split seed.

    Returns:
        True for held-out files.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split(
    files: Iterable[TextFile], fraction: float = 0.1, seed: int = 0
) -> tuple[list[TextFile], list[TextFile]]:
    """Split corpus files into training and held-out sets, by file.

    Args:
        files: corpus files (see `discover`).
        fraction: expected share of files held out, in (0, 1).
        seed: split seed.

    Returns:
        (train, held_out), each sorted by name.

    Raises:
        ZooError: if the fraction is out of range, or either side would be empty (too few files).
    """
    if not 0.0 < fraction < 1.0:
        raise ZooError(f"held-out fraction must be in (0, 1), got {fraction}")
    files = sorted(files, key=lambda f: f.name)
    train = [f for f in files if not is_held_out(f.name, fraction, seed)]
    held = [f for f in files if is_held_out(f.name, fraction, seed)]
    if not held and len(files) >= 2:
        # A small folder can hash no file below the fraction; hold out the file with the smallest
        # hash so that any folder of two or more files still gives a split, still seeded.
        key = [hashlib.sha256(f"{seed}:{f.name}".encode()).digest() for f in files]
        pick = files[min(range(len(files)), key=key.__getitem__)]
        train = [f for f in files if f is not pick]
        held = [pick]
    if not train or not held:
        raise ZooError(
            f"need at least 2 text files for a held-out split by file, found {len(files)}"
        )
    return train, held
