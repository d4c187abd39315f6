"""The library's shape (issue: readable library): short functions, short module docstrings, no private names
crossing modules, no repeated blocks. Each test lists what breaks the rule, so a failure says where to look."""
import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "kedit_lite"
MODULES = sorted(LIB.glob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_DOCSTRING_LINES = 20
REPEAT_LINES = 6


def _tree(path):
    return ast.parse(path.read_text(encoding="utf-8"))


def test_functions_are_short():
    long = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_module_docstrings_are_short():
    long = []
    for path in MODULES:
        doc = ast.get_docstring(_tree(path), clean=False)
        assert doc, f"{path.name} has no module docstring"
        if len(doc.splitlines()) > MAX_DOCSTRING_LINES:
            long.append(f"{path.name} ({len(doc.splitlines())} lines)")
    assert not long, f"module docstrings over {MAX_DOCSTRING_LINES} lines: {long}"


def _module_aliases(tree):
    """Names bound to kedit_lite modules in this file: `from . import hooks`, `from .x import y as z` of a module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1 and not node.module:
            for a in node.names:
                names[a.asname or a.name] = a.name
    return names


def test_no_private_names_cross_modules():
    crossing = []
    for path in MODULES:
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level >= 1 or (node.module or "").startswith("kedit_lite")):
                crossing += [f"{path.name}: from .{node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not crossing, f"private names used across modules: {crossing}"


def test_notebooks_use_no_private_library_names():
    import json
    root = LIB.parent / "notebooks"
    found = []
    for nb in sorted(root.glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            for m in re.finditer(r"\b(?:ke|kedit_lite|mend|rome|memit|hooks|res|result|r|t_patcher|ike|tracing)"
                                 r"\.(_[a-z]\w*)", src):
                found.append(f"{nb.name} cell {i}: {m.group(0)}")
    assert not found, f"notebooks read private library names: {found}"


def _normalised_lines(path):
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and s not in ("try:", "else:", "finally:", ")", "]", "}", "return out",
                                                      '"""', "return result"):
            out.append((s, i))
    return out


def test_no_block_repeated_across_the_library():
    seen, repeats = {}, []
    for path in MODULES:
        lines = _normalised_lines(path)
        for j in range(len(lines) - REPEAT_LINES + 1):
            block = tuple(s for s, _ in lines[j:j + REPEAT_LINES])
            if sum(len(s) for s in block) < 120:     # short boilerplate (imports, closing brackets) is not a copy
                continue
            here = (path.name, lines[j][1])
            first = seen.setdefault(block, here)
            if first != here and (first[0] != here[0] or abs(first[1] - here[1]) >= REPEAT_LINES):
                repeats.append(f"{first[0]}:{first[1]} and {here[0]}:{here[1]}")
    assert not repeats, f"blocks of {REPEAT_LINES}+ lines repeated: {sorted(set(repeats))[:20]}"




@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_hooks_are_registered_only_through_hooks_py(path):
    if path.name == "hooks.py":
        return
    raw = [f"{path.name}:{i}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
           if re.search(r"register_(forward|full_backward|backward)_(pre_)?hook\(", line)]
    assert not raw, f"raw hook registration outside hooks.py: {raw}"
