"""Only ``align/engine.py`` may touch ``torch.distributed``, ``deepspeed`` or ``accelerate``, or read a DeepSpeed
parameter's ``ds_*`` attributes (docs/ARCHITECTURE.md); the stages import no command module.

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


def deepspeed_attributes(source: str) -> list[tuple[int, str]]:
    """(line, name) for every read of a DeepSpeed parameter attribute (``ds_numel``, ``ds_shape``, ``ds_id``,
    ...): as ``p.ds_x`` or as a string given to ``getattr``/``hasattr``/``setattr``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("ds_"):
            hits.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) in ("getattr", "hasattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("ds_")
        ):
            hits.append((node.lineno, node.args[1].value))
    return sorted(set(hits))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("n = p.ds_numel", ["ds_numel"]),
        ("n = getattr(p, 'ds_shape', p.shape)", ["ds_shape"]),
        ("ok = hasattr(p, 'ds_id')", ["ds_id"]),
        ("n = p.numel()\ns = 'ds_numel'", []),
    ],
)
def test_attribute_checker_finds_every_form(source: str, expected: list[str]) -> None:
    assert [name for _, name in deepspeed_attributes(source)] == expected


def test_only_the_engine_reads_deepspeed_parameter_attributes() -> None:
    """A ZeRO-3 parameter's ``ds_*`` attributes are the engine's business (``full_numel``, ``full_ndim``,
    ``held_parameters``): model, stage and data code see plain parameters."""
    offenders = [
        f"{path.relative_to(ALIGN.parent)}:{line}: {name}"
        for path in sorted(ALIGN.rglob("*.py"))
        if path.relative_to(ALIGN).as_posix() not in ALLOWED
        for line, name in deepspeed_attributes(path.read_text())
    ]
    assert offenders == [], "only align/engine.py may read DeepSpeed attributes:\n" + "\n".join(offenders)


def test_the_stages_do_not_import_command_modules() -> None:
    """The stages share code through align/stages/common.py and library modules, never through another
    command's module (align plan's accounting lives in align/memory.py)."""
    commands = {"plan", "inspect", "export", "chat", "evaluate", "pipeline", "demo", "cli"}
    offenders = []
    for path in sorted((ALIGN / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("align.") and module.split(".")[1] in commands:
                offenders.append(f"{path.name}:{node.lineno}: {module}")
    assert offenders == []
