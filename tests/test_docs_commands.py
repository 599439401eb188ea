"""Every shell block of README.md and docs/*.md runs as written, in order, in a fresh copy of the repository.

A block that cannot run here (GPUs, several nodes, the full demo, long training) carries
``<!-- not-run: reason -->`` on the line before it; those are listed as skipped with their reasons. The copy
holds the tracked and unignored files (what a clone plus this change has) and a ``.venv`` that is this test's
interpreter's environment, so ``source .venv/bin/activate`` works as it does after ``scripts/test.sh``; a block
after one that activates it runs activated, as it would in the reader's shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- not-run: (?P<reason>[^>]*?) -->\n)?```(?:bash|sh|shell)\n(?P<body>.*?)```", re.DOTALL
)


def blocks() -> list[tuple[str, str, str | None]]:
    """(where, commands, why not run) for every shell block, in page order."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            where = f"{page.relative_to(ROOT)}:{text[: m.start('body')].count(chr(10))}"
            found.append((where, m["body"], m["reason"]))
    return found


RUN = [b for b in blocks() if b[2] is None]
NOT_RUN = [b for b in blocks() if b[2] is not None]


def test_blocks_that_do_not_run_say_why() -> None:
    assert RUN, "some shell blocks run"
    for where, _, reason in NOT_RUN:
        assert len(reason.strip()) > 10, f"{where}: say why the block cannot run here"


@pytest.mark.parametrize(("where", "reason"), [(w, r) for w, _, r in NOT_RUN])
def test_not_run(where: str, reason: str) -> None:
    pytest.skip(f"{where}: {reason}")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    out = tmp_path_factory.mktemp("fresh") / "align"
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (out / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / os.fsdecode(name))
    (out / ".venv").symlink_to(Path(sys.prefix))
    return out


@pytest.mark.slow
def test_runnable_blocks_run_as_written(clone: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    activated: set[str] = set()  # pages whose reader has run `source .venv/bin/activate` in an earlier block
    for where, body, _ in RUN:
        page = where.split(":")[0]
        # a reader goes on in the same shell: a later block of the page still has the activated environment
        script = ("source .venv/bin/activate\n" if page in activated else "") + body
        if "source .venv/bin/activate" in body:
            activated.add(page)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{where} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
