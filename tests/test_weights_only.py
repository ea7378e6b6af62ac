"""Every torch.load call in the tree passes weights_only=True: a pickled checkpoint must not run code on load."""
from __future__ import annotations

import os
import re
from pathlib import Path

from tests.runs import REPO

CALL = "torch" + ".load("  # split, so that this file does not match itself
WEIGHTS_ONLY = re.compile(r"\bweights_only\s*=\s*True\b")
SKIPPED = {".git", "__pycache__", "site-packages", "node_modules"}


def python_files(root: Path) -> list[Path]:
    """*.py under root, outside .git and virtual environments (folders holding a pyvenv.cfg)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders
                         if d not in SKIPPED and not (Path(folder) / d / "pyvenv.cfg").is_file()]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def unsafe_loads(source: str) -> list[str]:
    """The text of each torch.load call without weights_only=True (the call runs to its closing parenthesis)."""
    unsafe = []
    for match in re.finditer(re.escape(CALL), source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        call = source[match.start():end + 1]
        if not WEIGHTS_ONLY.search(call):
            unsafe.append(call)
    return unsafe


def test_the_check_tells_safe_from_unsafe_calls():
    assert unsafe_loads(f"x = {CALL}path, map_location='cpu')\ny = {CALL}p, weights_only=True)") == [
        f"{CALL}path, map_location='cpu')"]
    assert unsafe_loads(f"state = {CALL}\n    open(name, 'rb'),\n    weights_only=True,\n)") == []
    assert unsafe_loads(f"a = {CALL}f(x), weights_only=False)\nb = dict(weights_only=True)") == [
        f"{CALL}f(x), weights_only=False)"]


def test_no_torch_load_without_weights_only_in_the_tree():
    files = python_files(REPO)
    assert REPO / "utils" / "checkpoint.py" in files and Path(__file__).resolve() in files
    unsafe = [f"{path.relative_to(REPO)}: {call}" for path in files for call in unsafe_loads(path.read_text())]
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)
