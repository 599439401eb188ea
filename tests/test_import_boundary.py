"""Only ``align/engine.py`` may touch ``torch.distributed``, ``deepspeed`` or ``accelerate`` (docs/ARCHITECTURE.md).

Checked on the syntax tree, so comments and strings do not count but every way of reaching the modules does:
``import x``, ``from x import y``, ``from torch import distributed``, ``importlib.import_module("x")``,
``__import__("x")`` and attribute access ``torch.distributed`` (importing torch makes it reachable without any
import statement).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ALIGN = Path(__file__).resolve().parents[1] / "align"
ALLOWED = {"engine.py"}
FORBIDDEN = ("torch.distributed", "deepspeed", "accelerate")


def _forbidden(name: str) -> str | None:
    """The forbidden module ``name`` is or lies inside, if any."""
    return next((f for f in FORBIDDEN if name == f or name.startswith(f + ".")), None)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def distribution_uses(source: str) -> list[tuple[int, str]]:
    """(line, forbidden module) for every reach into one in ``source``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Call) and _dotted(node.func) in (
            "importlib.import_module",
            "import_module",
            "__import__",
        ):
            names = [
                a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node) or ""]
        hits += [(node.lineno, f) for f in map(_forbidden, names) if f]
    return sorted(set(hits))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch.distributed as dist", ["torch.distributed"]),
        ("from torch import distributed", ["torch.distributed"]),
        ("from torch.distributed import barrier", ["torch.distributed"]),
        ("import deepspeed", ["deepspeed"]),
        ("from deepspeed.ops.adam import DeepSpeedCPUAdam", ["deepspeed"]),
        ("from accelerate import Accelerator", ["accelerate"]),
        ("import importlib\nimportlib.import_module('deepspeed.zero')", ["deepspeed"]),
        ("__import__('accelerate')", ["accelerate"]),
        ("import torch\nok = torch.distributed.is_initialized()", ["torch.distributed"]),
        ("import torch\nimport torch.nn as nn\nx = torch.zeros(1)", []),
        ("# import deepspeed\ns = 'torch.distributed'", []),
        ("from .deepspeed_notes import x\nimport accelerated", []),
    ],
)
def test_checker_finds_every_form(source: str, expected: list[str]) -> None:
    assert sorted({name for _, name in distribution_uses(source)}) == expected


def test_only_the_engine_imports_distribution() -> None:
    files = sorted(ALIGN.rglob("*.py"))
    assert files, f"no Python files under {ALIGN}"
    offenders = [
        f"{path.relative_to(ALIGN.parent)}:{line}: {name}"
        for path in files
        if path.relative_to(ALIGN).as_posix() not in ALLOWED
        for line, name in distribution_uses(path.read_text())
    ]
    assert offenders == [], "only align/engine.py may use distribution libraries:\n" + "\n".join(offenders)


def test_the_engine_is_the_one_that_does() -> None:
    assert {n for _, n in distribution_uses((ALIGN / "engine.py").read_text())} == {
        "torch.distributed",
        "deepspeed",
    }
