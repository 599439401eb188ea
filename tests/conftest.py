"""Shared fixtures: the tiny offline model zoo, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Other test processes share these 2 cores, and oversubscribed torch threads spin-wait and run many times
    slower; one thread also keeps the arithmetic of in-process and subprocess runs the same.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo root; parts are sub-folders named as in ``align.zoo.PARTS``.

    ``ALIGN_TEST_ZOO=DIR`` reuses a zoo built there before (``scripts/mutation.sh`` builds one for all its
    mutants instead of one per mutant); tests only read it.
    """
    from align.zoo import build_zoo

    prebuilt = os.environ.get("ALIGN_TEST_ZOO")
    if prebuilt:
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root)
    return root


@pytest.fixture(scope="session")
def siglip_qwen2(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An assembled Llava folder (the zoo's HF SigLIP tower + tiny Qwen2 R1 distill); tests must not change it."""
    import contextlib
    import io

    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict

    out = tmp_path_factory.mktemp("siglip_qwen2") / "model"
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(out),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        assemble(from_dict(AssembleRecipe, spec))
    return out


@pytest.fixture(scope="session")
def vllm_server(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vLLM CPU server for the session (``.venv-vllm``, a free loopback port), serving the assembled tiny
    Llava; yields its port and is killed at the end. Skips without ``.venv-vllm`` (scripts/setup_vllm.sh)."""
    import golden_runs

    if not golden_runs.VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm (run scripts/setup_vllm.sh to test the vLLM backend)")
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    try:
        with golden_runs.vllm_server(siglip_qwen2, log) as port:
            yield port
    except RuntimeError as err:  # it did not start: the log's end says why
        pytest.fail(str(err))
