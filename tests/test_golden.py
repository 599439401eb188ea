"""Golden runs (``tests/golden_runs.py``): every logged number and the final weights of short tiny-recipe runs
equal their recording in ``tests/golden/`` (bitwise on the recording's machine, ``rel 1e-4`` elsewhere).

A refactor of the stages must leave these unchanged. The files change only through
``.venv/bin/python tests/golden_runs.py record [NAME ...]``, never through a test.

    .venv/bin/pytest -q tests/test_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import golden_runs
import pytest

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SINGLE = [n for n, r in golden_runs.RUNS.items() if r.processes == 1 and not r.vllm]
MULTI = [n for n, r in golden_runs.RUNS.items() if r.processes > 1]
VLLM = [n for n, r in golden_runs.RUNS.items() if r.vllm]


@pytest.fixture(scope="module")
def work(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden_runs.prepare_inputs(tmp_path_factory.mktemp("golden") / "work", siglip_qwen2)


def check(name: str, got: dict) -> None:
    want = json.loads((golden_runs.GOLDEN / f"{name}.json").read_text())
    problems = golden_runs.compare(name, got, want)
    assert not problems, f"{name} differs from tests/golden/{name}.json:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("name", SINGLE)
def test_one_process_run_equals_its_golden_record(work: Path, name: str) -> None:
    check(name, golden_runs.execute(name, work, work.parent / name))


@pytest.mark.distributed
@pytest.mark.parametrize("name", MULTI)
def test_two_process_run_equals_its_golden_record(work: Path, name: str) -> None:
    check(name, golden_runs.execute(name, work, work.parent / name))


@pytest.mark.parametrize("name", VLLM)
def test_vllm_server_run_equals_its_golden_record(
    work: Path, name: str, siglip_qwen2: Path, vllm_server: int
) -> None:
    golden_runs.reset_served_weights(siglip_qwen2, vllm_server)
    check(name, golden_runs.execute(name, work, work.parent / name, vllm_server))


def test_golden_files_cover_every_run() -> None:
    """A run added to RUNS without its recording (or a stale file left behind) is caught here."""
    assert sorted(p.stem for p in golden_runs.GOLDEN.glob("*.json")) == sorted(golden_runs.RUNS)


def test_compare_notices_a_changed_number_and_weight() -> None:
    want = {
        "machine": golden_runs.machine(),
        "metrics": [{"step": 1, "loss": 1.0}],
        "weights": {"model": {"sha256": "a", "tensors": {"w": [1.0, 2.0]}}},
    }
    same = json.loads(json.dumps(want))
    assert golden_runs.compare("grpo", same, want) == []
    other = json.loads(json.dumps(want))
    other["metrics"][0]["loss"] = 1.0 + 1e-12
    other["weights"]["model"]["sha256"] = "b"
    problems = golden_runs.compare("grpo", other, want)
    assert len(problems) == 2 and "loss" in problems[0] and "SHA-256" in problems[1]
    other["machine"] = "another CPU"  # tolerance: 1e-12 passes, the SHA-256 is not compared
    assert golden_runs.compare("grpo", other, want) == []
    other["metrics"][0]["loss"] = 1.01
    assert "loss" in golden_runs.compare("grpo", other, want)[0]
