"""Write docs/recipes.md: every recipe key, its type, default, range and meaning, read from the schemas.

The meaning is the comment on the field's declaration in the source (on any of its lines, when the formatter
wrapped it) and the range is the one the field declares with ``align.config.ranged``, so the reference cannot
drift from the code. Run: ``.venv/bin/python scripts/recipe_reference.py`` after changing a schema;
tests/test_recipe_ranges.py fails while docs/recipes.md is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

from align.config import SCHEMAS, _type_name, field_range, schema_for

OUT = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comments on the lines of its declaration, for cls and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = inspect.getsource(klass)
        by_line: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            text = tok.string.lstrip("#").strip()
            if tok.type == tokenize.COMMENT and not text.startswith(("type:", "noqa")):
                by_line[tok.start[0]] = text
        (node,) = ast.parse(source).body
        assert isinstance(node, ast.ClassDef)
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                text = " ".join(by_line[n] for n in lines if n in by_line)
                if text:
                    found[stmt.target.id] = text
    return found


def _summary(cls: type) -> str:
    """First docstring line, unless it is the signature dataclasses write when there is none."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "**required**"


def _range(f: dataclasses.Field) -> str:
    bound = field_range(f)
    if bound is None:
        return ""
    note = f" ({bound.note})" if bound.note else ""
    return f"`{bound.describe().removeprefix('in ')}`{note}"


def _nested(tp: typing.Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    rows, later = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = _nested(hints[f.name])
        doc = notes.get(f.name) or (_summary(nested) if nested else "")
        cells = (f"`{key}`", f"`{_type_name(hints[f.name])}`", f"`{_default(f)}`", _range(f), doc)
        # a | inside a cell, even in a code span, would end the cell: GFM wants it escaped
        row = " | ".join(c.replace("|", "\\|") for c in cells).replace("`(section)`", "section")
        rows.append(f"| {row} |")
        if nested is not None:
            suffix = "[i]." if typing.get_origin(hints[f.name]) is list else "."
            later.extend(_rows(nested, key + suffix))
    return rows + later


def render() -> str:
    parts = [
        "# Recipe reference",
        "",
        "Generated from the schema dataclasses by `scripts/recipe_reference.py`; do not edit by hand.",
        "Every recipe names its `kind`; unknown keys, wrong types, numbers outside their range and impossible",
        "combinations are errors that name the file and key path, before any work starts. A range applies to",
        "each number of a list; a float key never takes NaN or an infinity (YAML `.nan`, `.inf`).",
        "Override any key on the command line: `align sft r.yaml optim.lr=1e-5`.",
        "Share a base with `extends: base.yaml` (deep-merged under the file).",
        "",
    ]
    for kind in SCHEMAS:
        cls = schema_for(kind)
        parts += [
            f"## `kind: {kind}` ({cls.__module__})",
            "",
            "| key | type | default | range | meaning |",
            "|---|---|---|---|---|",
        ]
        parts += _rows(cls, "")
        parts.append("")
    return "\n".join(parts)


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
