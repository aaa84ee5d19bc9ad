"""Every masked tl.load in the kernels says what a masked lane reads (`other=`).

On a GPU a masked-off lane of tl.load without `other` is undefined; the interpreter
zero-fills it, so no interpreter test can catch a missing `other` (the int8 KV write
took max|x| over such lanes for head sizes that are not a power of two). The rule is
checked on the source instead.
"""
from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _masked_loads_without_other(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
            continue
        keywords = {k.arg for k in node.keywords}
        masked = "mask" in keywords or len(node.args) >= 2
        if masked and "other" not in keywords and len(node.args) < 3:
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_every_masked_load_has_other():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 8
    offenders = [where for f in files for where in _masked_loads_without_other(f)]
    assert offenders == []


def test_the_check_sees_a_missing_other(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import triton.language as tl\n"
                   "def k(p, m):\n"
                   "    a = tl.load(p, mask=m)\n"
                   "    b = tl.load(p, mask=m, other=0.0)\n"
                   "    c = tl.load(p)\n")
    assert _masked_loads_without_other(bad) == ["bad.py:3"]
