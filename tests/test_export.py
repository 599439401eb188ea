"""``align export``: exported folders load offline with plain transformers and give the source's logits.

One tiny assembled model (SigLIP + Qwen2 "R1 distill") is shared by the module; its generation config is made
greedy first, so the R1 sampling in the export is the export's doing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from align.checkpoint import CANONICAL_PREFIXES, INDEX_NAME, weight_names
from align.cli import main
from align.errors import AlignError
from align.export import (
    R1_SAMPLING,
    StageRecord,
    export,
    generation_config_for,
    is_r1_distill,
    lineage,
    model_card,
    parse_size,
    pickle_files,
    portable,
)

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def source(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict

    out = tmp_path_factory.mktemp("export") / "assembled"
    recipe = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(out),
    }
    assemble(from_dict(AssembleRecipe, recipe))
    gen_file = out / "generation_config.json"
    greedy = {k: v for k, v in json.loads(gen_file.read_text()).items() if k not in ("temperature", "top_p")}
    gen_file.write_text(json.dumps({**greedy, "do_sample": False}))
    return out


@pytest.fixture(scope="module")
def fp32(source: Path) -> Path:
    return export(source, source.parent / "fp32", "fp32")


@pytest.fixture(scope="module")
def bf16(source: Path) -> Path:
    return export(source, source.parent / "bf16", "bf16")


def _logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of an image + text prompt, with the folder loaded the way any transformers user would."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": "<image>\nWhat colour is the square?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 56, 3, generator=generator) * 255).to(torch.uint8).numpy()
    inputs = processor(
        text=prompt, images=[Image.fromarray(pixels)], return_tensors="pt", add_special_tokens=False
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.fixture(scope="module")
def source_logits(source: Path) -> torch.Tensor:
    return _logits(source)


def test_fp32_export_loads_offline_with_identical_logits(fp32: Path, source_logits: torch.Tensor) -> None:
    assert float((_logits(fp32) - source_logits).abs().max()) < 1e-6


def test_weights_are_canonical_safetensors_without_pickles(fp32: Path, source: Path) -> None:
    names = weight_names(fp32)
    assert names == weight_names(source)
    assert all(n.startswith(CANONICAL_PREFIXES) for n in names)
    assert {n.split(".")[0] for n in names} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert pickle_files(fp32) == []
    for name in (
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
        "README.md",
    ):
        assert (fp32 / name).is_file(), name


def test_generation_config_has_r1_sampling(fp32: Path) -> None:
    generation = json.loads((fp32 / "generation_config.json").read_text())
    assert {k: generation.get(k) for k in R1_SAMPLING} == R1_SAMPLING
    assert (
        generation["eos_token_id"]
        == json.loads((fp32 / "config.json").read_text())["text_config"]["eos_token_id"]
    )


@pytest.mark.parametrize(
    ("template", "r1"),
    [
        ("{{ '<｜Assistant｜>' }}{% if add_generation_prompt %}<think>\n{% endif %}", True),
        ("{{ '<｜Assistant｜>' }}", False),  # R1's markers without thinking: not a reasoning distill
        (CHATML, False),
        (None, False),
    ],
)
def test_r1_detection_and_sampling(template: str | None, r1: bool) -> None:
    from transformers import GenerationConfig

    source = GenerationConfig(do_sample=False, max_new_tokens=7)
    generation = generation_config_for(source, template)
    assert is_r1_distill(template) is r1
    expected = R1_SAMPLING if r1 else {"do_sample": False, "temperature": None, "top_p": None}
    assert {k: getattr(generation, k) for k in R1_SAMPLING} == expected
    assert generation.max_new_tokens == 7
    assert source.do_sample is False  # the source config is not modified


def test_readme_lineage_names_encoder_and_llm(fp32: Path, zoo: Path) -> None:
    card = (fp32 / "README.md").read_text()
    # named by their last two parts: the build machine's folders stay out of a published card
    assert f"…/{zoo.name}/siglip-hf" in card
    assert f"…/{zoo.name}/qwen2-r1" in card
    assert str(zoo) not in card and str(fp32.parent) not in card
    assert "### 1. assemble" in card
    assert "siglip_vision_model" in card and "qwen2" in card


def test_bf16_round_trip(bf16: Path, source_logits: torch.Tensor, tmp_path: Path) -> None:
    config = json.loads((bf16 / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(bf16 / "model.safetensors").values()} == {torch.bfloat16}
    logits = _logits(bf16, torch.bfloat16)
    # bf16 keeps 8 bits of mantissa: a relative error of a few 2^-8 through two tiny transformer stacks
    tolerance = 0.05 * float(source_logits.abs().max())
    assert float((logits - source_logits).abs().max()) < tolerance
    again = export(bf16, tmp_path / "again", "bf16")
    first, second = load_file(bf16 / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sharded_export_through_the_cli(
    source: Path, source_logits: torch.Tensor, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "sharded"
    assert (
        main(["export", str(source), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "600KB"]) == 0
    )
    assert "exported" in capsys.readouterr().out
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert all(p.stat().st_size <= 600_000 + 1024 for p in shards)  # + the safetensors header
    assert float((_logits(out) - source_logits).abs().max()) < 1e-6


def _fake_stage(source: Path, run: Path, model: str, rows: list[str]) -> Path:
    """A stage output as the stages write it: model/ (with the stage recipe), recipe, metrics, summary."""
    shutil.copytree(source, run / "model")
    recipe = {
        "kind": "sft",
        "model": model,
        "output_dir": str(run),
        "data": {"sources": [{"name": "cot-mix", "path": "data/cot.jsonl", "format": "messages"}]},
        "lora": {"r": 8, "alpha": 16},
    }
    for folder in (run, run / "model"):
        (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run / "metrics.jsonl").write_text("\n".join(rows))
    (run / "summary.json").write_text(json.dumps({"stage": "sft", "steps": 2, "wall_time_s": 3.25}))
    return run


def test_lineage_walks_stage_outputs_back_to_assemble(source: Path, tmp_path: Path, zoo: Path) -> None:
    rows = ['{"step": 1, "loss": 2.5}', '{"step": 2, "loss": 1.875, "lr": 1e-05}', '{"step": 3, "lo']
    run = _fake_stage(source, tmp_path / "sft", str(source), rows)
    stages = lineage(run / "model")
    assert [s.kind for s in stages] == ["assemble", "sft"]
    assert stages[0].model_dir == source.resolve()
    assert stages[1].final_metrics == {"step": 2, "loss": 1.875, "lr": 1e-05}  # the torn line is skipped
    out = export(run, tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert card.index("### 1. assemble") < card.index("### 2. sft")
    assert f"…/{zoo.name}/qwen2-r1" in card and str(tmp_path) not in card
    assert "`cot-mix`: messages `data/cot.jsonl`" in card  # relative paths stay as written
    assert "loss 1.875" in card and "wall_time_s 3.25" in card
    assert "LoRA r=8" in card


def test_lineage_reports_a_missing_input(source: Path, tmp_path: Path) -> None:
    run = _fake_stage(source, tmp_path / "orphan", str(tmp_path / "deleted"), ['{"step": 1, "loss": 1.0}'])
    stages = lineage(run)
    assert [s.kind for s in stages] == ["sft"]
    assert "deleted is not a model folder" in stages[0].note


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("1000", 1000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5 TB", "GB", "-1MB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(AlignError, match="--max-shard-size"):
        parse_size(text)


def test_refuses_to_export_over_the_source(source: Path) -> None:
    with pytest.raises(AlignError, match="overlaps the source"):
        export(source, source / "inside")
    with pytest.raises(AlignError, match="overlaps the source"):
        export(source, source.parent)


def test_refuses_to_replace_a_folder_that_is_not_a_model(source: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AlignError, match="is not a model folder"):
        export(source, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_card_survives_unexpected_recipe_shapes(source: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    odd = {"kind": "grpo", "model": "x", "data": ["not", "a", "mapping"], "lora": 8}
    record = StageRecord(tmp_path, odd, None, None, {"step": 3, "reward": 0.5})
    card = model_card(
        name="m",
        config=AutoConfig.from_pretrained(source),
        parameters={},
        dtype="fp32",
        generation={},
        r1=False,
        stages=[record],
    )
    assert "### 1. grpo" in card and "reward 0.5" in card


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/home/alice/scratch/models/qwen2-r1", "…/models/qwen2-r1"),
        ("checkpoints/tiny/run/sft", "checkpoints/tiny/run/sft"),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ({"a": ["/x/y/z.jsonl", 3]}, {"a": ["…/y/z.jsonl", 3]}),
    ],
)
def test_portable_paths(value, shown) -> None:
    assert portable(value) == shown


def test_portable_paths_inside_the_working_folder_become_relative(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert portable(str(tmp_path / "checkpoints" / "run")) == "checkpoints/run"


def test_exported_files_follow_the_umask(source: Path, tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        out = export(source, tmp_path / "shared", "fp32")
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_card_states_the_dtype_and_the_r1_prefill(fp32: Path, bf16: Path) -> None:
    fp32_card, bf16_card = (fp32 / "README.md").read_text(), (bf16 / "README.md").read_text()
    assert "safetensors, fp32)" in fp32_card and "safetensors, bf16)" in bf16_card
    assert "The chat template prefills `<think>\\n`" in fp32_card


def test_reexport_replaces_a_previous_export_and_pickles_are_never_published(
    source: Path, tmp_path: Path, monkeypatch
) -> None:
    import align.checkpoint

    out = export(source, tmp_path / "out", "fp32")
    (out / "stale.txt").write_text("from the previous export")
    assert export(source, out, "fp32") == out and not (out / "stale.txt").exists()
    real_save = align.checkpoint.save_llava

    def save_with_a_pickle(folder, **kwargs):
        real_save(folder, **kwargs)
        (Path(folder) / "optimizer.pt").write_bytes(b"\x80")

    monkeypatch.setattr(align.checkpoint, "save_llava", save_with_a_pickle)
    with pytest.raises(
        AlignError, match=r"export wrote pickle files \['optimizer.pt'\]; refusing to publish"
    ):
        export(source, tmp_path / "pickled", "fp32")
    assert not (tmp_path / "pickled").exists()
