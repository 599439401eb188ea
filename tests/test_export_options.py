"""``align export`` options, each checked tensor by tensor against the source folder.

* ``--dtype`` left out keeps the source's dtype: an fp32 folder exports bit-identical fp32 tensors, a bf16 folder
  bit-identical bf16 tensors (the config says the same dtype);
* ``--dtype bf16`` writes every tensor as the source's rounded to bf16 (``Tensor.to(torch.bfloat16)``),
  ``--dtype fp32`` of a bf16 folder every tensor widened exactly;
* every export keeps the source's canonical llava-hf weight names, one for one.

``tests/test_export.py`` covers logits, sharding, the generation config and the model card.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.checkpoint import CANONICAL_PREFIXES
from align.cli import main


def export_cli(source: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(source), "--out", str(out), *options]) == 0
    return load_file(out / "model.safetensors")


def text_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return config["text_config"].get("dtype") or config.get("dtype") or "float32"


@pytest.fixture(scope="module")
def source(siglip_qwen2: Path) -> dict[str, torch.Tensor]:
    return load_file(siglip_qwen2 / "model.safetensors")


@pytest.fixture(scope="module")
def bf16(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export_options") / "bf16"
    export_cli(siglip_qwen2, out, "--dtype", "bf16")
    return out


def test_source_is_fp32_with_canonical_names(source: dict) -> None:
    assert {t.dtype for t in source.values()} == {torch.float32}
    assert all(k.startswith(CANONICAL_PREFIXES) for k in source)


def test_default_dtype_of_an_fp32_source_is_fp32_bit_for_bit(
    siglip_qwen2: Path, source: dict, tmp_path: Path
) -> None:
    got = export_cli(siglip_qwen2, tmp_path / "default")
    assert got.keys() == source.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], source[k]) for k in source)
    assert text_dtype(tmp_path / "default") == "float32"


def test_bf16_rounds_every_tensor_of_the_source(bf16: Path, source: dict) -> None:
    got = load_file(bf16 / "model.safetensors")
    assert got.keys() == source.keys()
    for k, tensor in source.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], tensor.to(torch.bfloat16)), k
    assert any(not torch.equal(got[k].float(), t) for k, t in source.items()), "bf16 must round something"
    assert text_dtype(bf16) == "bfloat16"


def test_default_dtype_of_a_bf16_source_stays_bf16(bf16: Path, tmp_path: Path) -> None:
    before = load_file(bf16 / "model.safetensors")
    got = export_cli(bf16, tmp_path / "again")
    assert got.keys() == before.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], before[k]) for k in before)
    assert text_dtype(tmp_path / "again") == "bfloat16"


def test_fp32_of_a_bf16_source_widens_exactly(bf16: Path, tmp_path: Path) -> None:
    before = load_file(bf16 / "model.safetensors")
    got = export_cli(bf16, tmp_path / "wide", "--dtype", "fp32")
    assert got.keys() == before.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], before[k].float()) for k in before)
    assert text_dtype(tmp_path / "wide") == "float32"
