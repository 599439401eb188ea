"""Write docs/recipes.md: every recipe key, its type, default and meaning, read from the schema dataclasses.

The meaning is the comment on the field's line in the source, so the reference cannot drift from the code.
Run: ``.venv/bin/python scripts/recipe_reference.py`` after changing a schema.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

from align.config import SCHEMAS, _type_name, schema_for

OUT = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
_FIELD = re.compile(r"^\s+(\w+):.*?(?:#\s*(.*))?$")


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, for cls and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = _FIELD.match(line)
            if m and m.group(2) and not m.group(2).startswith(("type:", "noqa")):
                found[m.group(1)] = m.group(2).strip()
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
        rows.append(
            f"| `{key}` | `{_type_name(hints[f.name])}` | `{_default(f)}` | {doc} |".replace(
                "`(section)`", "section"
            )
        )
        if nested is not None:
            suffix = "[i]." if typing.get_origin(hints[f.name]) is list else "."
            later.extend(_rows(nested, key + suffix))
    return rows + later


def render() -> str:
    parts = [
        "# Recipe reference",
        "",
        "Generated from the schema dataclasses by `scripts/recipe_reference.py`; do not edit by hand.",
        "Every recipe names its `kind`; unknown keys, wrong types and impossible combinations are errors that",
        "name the file and key path. Override any key on the command line: `align sft r.yaml optim.lr=1e-5`.",
        "Share a base with `extends: base.yaml` (deep-merged under the file).",
        "",
    ]
    for kind in SCHEMAS:
        cls = schema_for(kind)
        parts += [
            f"## `kind: {kind}` ({cls.__module__})",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
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
