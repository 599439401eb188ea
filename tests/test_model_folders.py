"""Wrong model folders are refused at once: one ``error:`` line naming the folder and what was found, exit 2.

Each case goes through ``align.cli.main``. Loading any weights is made to fail the test, so every refusal is
proven to come from the folder's config.json (or its file list) before a weight is read; nothing is written
to the output folder. ``--debug`` keeps the traceback.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_model_folders.py
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
LLM_HINT = "model_type is 'qwen2', expected 'llava'; this is a language model"
PICKLE = (
    "holds only pickle weights (pytorch_model.bin); pickle weights are not loaded; convert to safetensors"
)


@pytest.fixture(scope="module")
def work(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data, an assembled Llava and the same Llava with pickle weights only."""
    from align.data.synth import synthesize

    root = tmp_path_factory.mktemp("folders")
    synthesize(root / "synth", train=2, test=1)
    recipe = root / "assemble.yaml"
    recipe.write_text(
        f"kind: assemble\nvision: {{source: hf, name_or_path: {zoo / 'siglip-hf'}}}\n"
        f"llm: {{name_or_path: {zoo / 'qwen2-r1'}}}\noutput_dir: {root / 'llava'}\n"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["assemble", str(recipe)]) == 0
    shutil.copytree(root / "llava", root / "pickled")
    weights = root / "pickled" / "model.safetensors"
    torch.save(load_file(weights), root / "pickled" / "pytorch_model.bin")
    weights.unlink()
    return root


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model construction from weights fails the test: a refusal must come before it."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI; it must exit 2 with exactly one non-empty stderr line, returned without ``error: ``."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def stage_argv(stage: str, model: Path, out: Path, work: Path) -> list[str]:
    data = (
        work
        / "synth"
        / "train"
        / {"projector": "captions.jsonl", "sft": "sft.jsonl", "grpo": "rl.jsonl"}[stage]
    )
    return [
        stage,
        str(TINY / f"{stage}.yaml"),
        f"model={model}",
        f"output_dir={out}",
        f"data.sources.0.path={data}",
    ]


@pytest.mark.parametrize("stage", ["projector", "sft", "grpo"])
@pytest.mark.parametrize(
    ("folder", "found"),
    [
        ("llm", LLM_HINT),
        ("tower", "model_type is 'siglip_vision_model', expected 'llava'"),
        ("pickled", PICKLE),
    ],
)
def test_stage_refuses_a_folder_that_is_not_a_llava(
    zoo: Path, work: Path, tmp_path: Path, stage: str, folder: str, found: str, capsys, no_weight_loading
) -> None:
    model = {"llm": zoo / "qwen2-r1", "tower": zoo / "siglip-hf", "pickled": work / "pickled"}[folder]
    out = tmp_path / "out"
    message = refused(stage_argv(stage, model, out, work), capsys)
    assert message.startswith(f"{model}: ") and found in message
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


@pytest.mark.parametrize("folder", ["llm", "pickled"])
def test_other_commands_refuse_it_too(
    zoo: Path, work: Path, tmp_path: Path, folder: str, capsys, no_weight_loading
) -> None:
    model = {"llm": zoo / "qwen2-r1", "pickled": work / "pickled"}[folder]
    found = {"llm": LLM_HINT, "pickled": PICKLE}[folder]
    questions = str(work / "synth" / "test" / "rl.jsonl")
    commands = {
        "export": ["export", str(model), "--out", str(tmp_path / "export")],
        "eval": ["eval", str(model), "--data", questions, "--format", "rl", "--out", str(tmp_path / "eval")],
        "chat": ["chat", str(model), "How many circles?"],
        "data check": ["data", "check", str(TINY / "sft.yaml"), "--model", str(model)],
    }
    for name, argv in commands.items():
        message = refused(argv, capsys)
        assert str(model) in message and found in message, (name, message)
    assert list(tmp_path.iterdir()) == []


def assemble_argv(tmp_path: Path, vision: str, llm: Path | str, source: str = "hf") -> list[str]:
    recipe = tmp_path / "assemble.yaml"
    recipe.write_text(
        f"kind: assemble\nvision: {{source: {source}, name_or_path: '{vision}'}}\n"
        f"llm: {{name_or_path: '{llm}'}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    return ["assemble", str(recipe)]


@pytest.mark.parametrize(
    ("llm", "found"),
    [
        (
            "siglip-hf",
            "model_type is 'siglip_vision_model' (a vision tower); the LLM must be a causal language model",
        ),
        ("clip-hf", "model_type is 'clip_vision_model' (a vision tower)"),
        ("empty", "no config.json (not a model folder)"),
        ("no-model-type", "config.json: no model_type (found ['hidden_size'])"),
        ("pickled-llm", PICKLE),
        ("llava", "model_type is 'llava' (not a causal LM)"),
    ],
)
def test_assemble_refuses_an_llm_folder_that_is_not_one(
    zoo: Path, work: Path, tmp_path: Path, llm: str, found: str, capsys, no_weight_loading
) -> None:
    folder = {"llava": work / "llava"}.get(llm, zoo / llm)
    if llm in ("empty", "no-model-type", "pickled-llm"):
        folder = tmp_path / llm
        folder.mkdir()
    if llm == "no-model-type":
        (folder / "config.json").write_text(json.dumps({"hidden_size": 3}))
    if llm == "pickled-llm":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo / "qwen2-r1" / name, folder / name)
        torch.save(load_file(zoo / "qwen2-r1" / "model.safetensors"), folder / "pytorch_model.bin")
    message = refused(assemble_argv(tmp_path, str(zoo / "siglip-hf"), folder), capsys)
    assert str(folder) in message and found in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source", "vision", "found"),
    [
        ("hf", "{zoo}/qwen2-r1", "is a qwen2 model; the vision tower must be CLIP or SigLIP"),
        (
            "open_clip",
            "local-dir:{zoo}/qwen2-r1",
            "open_clip_config.json not found (it is a Hugging Face 'qwen2' folder",
        ),
        ("hf", "{tmp}/empty", "no config.json (not a model folder)"),
        ("hf", "{tmp}/pickled-tower", PICKLE),
    ],
)
def test_assemble_refuses_a_vision_folder_that_is_not_a_tower(
    zoo: Path, tmp_path: Path, source: str, vision: str, found: str, capsys, no_weight_loading
) -> None:
    (tmp_path / "empty").mkdir()
    tower = tmp_path / "pickled-tower"
    tower.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(zoo / "siglip-hf" / name, tower / name)
    torch.save(load_file(zoo / "siglip-hf" / "model.safetensors"), tower / "pytorch_model.bin")
    vision = vision.format(zoo=zoo, tmp=tmp_path)
    message = refused(assemble_argv(tmp_path, vision, zoo / "qwen2-r1", source), capsys)
    assert vision.removeprefix("local-dir:") in message and found in message
    assert not (tmp_path / "out").exists()


def test_debug_keeps_the_traceback(zoo: Path, work: Path, tmp_path: Path) -> None:
    with pytest.raises(AlignError, match=LLM_HINT):
        main(["--debug", *stage_argv("sft", zoo / "qwen2-r1", tmp_path / "out", work)])


@pytest.mark.parametrize(
    ("layout", "found"),
    [
        ("missing", "does not exist (not a model folder, nor a stage output)"),
        ("file", "is a file, not a model folder"),
        ("empty", "no config.json (not a model folder, nor a stage output with model/config.json)"),
        ("unfinished sft", "this run is unfinished (no model/ yet"),
        ("unfinished checkpoints only", "this run is unfinished (no model/ yet"),
    ],
)
def test_a_folder_without_a_model_says_why(tmp_path: Path, layout: str, found: str) -> None:
    from align.checkpoint import resolve_model_folder

    folder = tmp_path / "run"
    if layout == "file":
        folder.write_text("x")
    elif layout != "missing":
        folder.mkdir()
    if layout == "unfinished sft":
        (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        (folder / "recipe.resolved.yaml").write_text("kind: sft\n")
    if layout == "unfinished checkpoints only":
        (folder / "checkpoints" / "step-0000002").mkdir(parents=True)
    with pytest.raises(AlignError) as err:
        resolve_model_folder(folder)
    assert str(err.value).startswith(f"{folder}: {found}")
    if layout == "unfinished sft":
        assert "`align sft RECIPE --resume` continues it" in str(err.value)


def test_model_folders_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from align.checkpoint import atomic_folder

    before = os.umask(0o027)
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.safetensors").write_bytes(b"x")
            (tmp / "w.safetensors").touch(mode=0o600)
    finally:
        os.umask(before)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]
    }
    assert modes == {"model": 0o750, "sub": 0o750, "w.safetensors": 0o640}


def test_wandb_missing_names_every_log_that_is_written(tmp_path: Path, monkeypatch, capsys) -> None:
    import sys

    from align.stages.common import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    for tensorboard, said in ((True, "metrics.jsonl and TensorBoard"), (False, "metrics.jsonl\n")):
        writer = MetricsWriter(tmp_path / str(tensorboard), True, tensorboard, "proj", {})
        writer.close()
        assert said in capsys.readouterr().out
