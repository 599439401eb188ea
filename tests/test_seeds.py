"""recipes/seeds/: one recipe per public system, each with a tiny twin that runs here end to end.

A twin (``recipes/seeds/tiny/<name>.yaml``) extends its seed and changes only what makes it run in seconds on CPU:
the model (the tour's tiny Llava), sizes, steps and the distribution settings; its data sources are the seed's
with other paths. The rows come from ``align data seeds``, written in each system's published layout. Each twin
passes ``align data check`` with 0 problems (the gold self-check included) and trains 2 steps through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from align.cli import main
from align.config import read_yaml
from align.data.seeds import SYSTEMS, write_seed_rows

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "recipes" / "seeds"
# seed stage recipes and the kind of their twin's run; r1_onevision's GRPO starts from its SFT twin's output
STAGES = {
    "r1_v": "grpo",
    "open_r1_multimodal": "grpo",
    "visualthinker_r1_zero": "grpo",
    "vlm_r1_rec": "grpo",
    "visual_rft": "grpo",
    "visual_rft_classification": "grpo",
    "r1_onevision_sft": "sft",
    "r1_onevision_grpo": "grpo",
    "deepseek_r1_vision": "sft",
    "ms_swift": "grpo",
    "easyr1": "grpo",
    "align_ds_v_projector": "projector",
    "align_ds_v_sft": "sft",
}
# what a twin may change in its seed (everything else must be the seed's)
TWIN_KEYS = {"model", "output_dir", "run", "data.max_length", "data.sources"}
TWIN_GRPO_KEYS = {"num_generations", "max_completion_length", "log_completions", "rollout"}


def _cli(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(args)
    return rc, printed.getvalue()


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("grpo.rollout",):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def test_every_seed_recipe_has_a_tiny_twin() -> None:
    seeds = {p.stem for p in SEEDS.glob("*.yaml")}
    assert seeds == set(STAGES) | {"align_ds_v"}
    assert {p.stem for p in (SEEDS / "tiny").glob("[!_]*.yaml")} == seeds


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_twin_changes_only_paths_sizes_and_distribution(name: str) -> None:
    seed, twin = _flat(read_yaml(SEEDS / f"{name}.yaml")), _flat(read_yaml(SEEDS / "tiny" / f"{name}.yaml"))
    allowed = {k for k in seed.keys() | twin.keys() if k.split(".")[0] == "run" or k in TWIN_KEYS}
    allowed |= {f"grpo.{k}" for k in TWIN_GRPO_KEYS}
    changed = {k for k in seed.keys() | twin.keys() if seed.get(k) != twin.get(k)}
    assert changed <= allowed, f"the twin changes {sorted(changed - allowed)}"
    for ours, theirs in zip(seed["data.sources"], twin["data.sources"], strict=True):
        assert {k: v for k, v in ours.items() if k not in ("path", "image_root")} == {
            k: v for k, v in theirs.items() if k not in ("path", "image_root")
        }
        # the twin reads the seed's file under checkpoints/seeds/data/<system>/ instead of data/
        assert theirs["path"].endswith(ours["path"].removeprefix("data/"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, zoo: Path, siglip_qwen2: Path):
    """A folder laid out as the tour leaves the repository (the zoo, the tiny Llava, the seed rows), made the
    working directory, as the twins' relative paths expect."""
    root = tmp_path_factory.mktemp("seeds")
    (root / "checkpoints" / "tiny").mkdir(parents=True)
    (root / "recipes").symlink_to(ROOT / "recipes")
    (root / "checkpoints" / "zoo").symlink_to(zoo)
    (root / "checkpoints" / "tiny" / "siglip-qwen2").symlink_to(siglip_qwen2)
    write_seed_rows(root / "checkpoints" / "seeds" / "data")
    before = Path.cwd()
    os.chdir(root)
    yield root
    os.chdir(before)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _run_twin(name: str, model: str | None = None) -> list[dict]:
    """``align data check`` (0 problems) and the stage on a twin; its two metrics rows."""
    twin = f"recipes/seeds/tiny/{name}.yaml"
    rc, printed = _cli(["data", "check", twin, *([f"--model={model}"] if model else [])])
    assert rc == 0 and "ok: 0 problems" in printed, printed
    rc, printed = _cli([STAGES[name], twin])
    assert rc == 0, printed
    rows = _metrics(Path(read_yaml(SEEDS / "tiny" / f"{name}.yaml")["output_dir"]))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n, kind in STAGES.items() if kind == "grpo" and not n.startswith("r1_onevision")]
)
def test_a_grpo_twin_checks_and_trains_two_steps(workspace: Path, name: str) -> None:
    rows = _run_twin(name)
    rewards = read_yaml(SEEDS / f"{name}.yaml")["grpo"]["reward_funcs"]
    for row in rows:
        assert {f"reward/{r}" for r in rewards} <= row.keys()
        assert all(row[f"reward_errors/{r}"] == 0 for r in rewards)
    logged = [
        json.loads(line)
        for line in (workspace / f"checkpoints/seeds/tiny/{name}/completions.jsonl").read_text().splitlines()
    ]
    assert logged and all(str(c.get("gold", "")).strip() for c in logged)


@pytest.mark.slow
def test_a_grpo_twin_updates_every_part_it_trains_once_its_rewards_spread(
    workspace: Path, siglip_qwen2: Path
) -> None:
    """On random weights every completion scores 0 on the seeds' rewards, so a twin's GRPO steps move nothing.
    With a reward that tells random completions apart (their length in characters) the advantages are not 0:
    R1-V's twin then changes the vision tower, the projector and the LLM, as R1-V trains all three."""
    from safetensors.torch import load_file

    (workspace / "spread.py").write_text(
        "def chars(completions, **columns):\n    return [len(c) / 100 for c in completions]\n"
    )
    out = workspace / "checkpoints/seeds/tiny/r1_v_spread"
    overrides = [f"grpo.reward_funcs=[accuracy,format,{workspace / 'spread.py'}:chars]", f"output_dir={out}"]
    rc, printed = _cli(["grpo", "recipes/seeds/tiny/r1_v.yaml", *overrides])
    assert rc == 0, printed
    assert all(r["reward_std"] > 0 for r in _metrics(out))
    before, after = load_file(siglip_qwen2 / "model.safetensors"), load_file(out / "model/model.safetensors")
    changed = {k.split(".")[0] for k in before if not before[k].equal(after[k])}
    assert changed == {"vision_tower", "multi_modal_projector", "language_model"}


@pytest.mark.slow
def test_deepseek_r1_vision_twin_trains_its_reasoning(workspace: Path) -> None:
    rows = _run_twin("deepseek_r1_vision")
    assert all(r["loss"] > 0 for r in rows)


@pytest.mark.slow
def test_r1_onevision_twins_run_sft_then_grpo_from_it(workspace: Path) -> None:
    assert all(r["loss"] > 0 for r in _run_twin("r1_onevision_sft"))
    _run_twin("r1_onevision_grpo", model="checkpoints/seeds/tiny/r1_onevision/sft")
    resolved = yaml.safe_load(
        Path("checkpoints/seeds/tiny/r1_onevision/grpo/recipe.resolved.yaml").read_text()
    )
    assert resolved["model"] == "checkpoints/seeds/tiny/r1_onevision/sft"


@pytest.mark.slow
def test_align_ds_v_twin_builds_aligns_and_tunes_a_llava(workspace: Path) -> None:
    rc, printed = _cli(["run", "recipes/seeds/tiny/align_ds_v.yaml"])
    assert rc == 0, printed
    run = Path("checkpoints/seeds/tiny/align_ds_v")
    for name in ("align_ds_v_projector", "align_ds_v_sft"):  # lengths measured with the assembled model
        rc, printed = _cli(
            ["data", "check", f"recipes/seeds/tiny/{name}.yaml", f"--model={run / 'assembled'}"]
        )
        assert rc == 0 and "ok: 0 problems" in printed, printed
    for stage in ("projector", "sft"):
        assert [r["step"] for r in _metrics(run / stage)] == [1, 2]
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "llama"


def test_seed_rows_are_written_in_each_systems_layout(tmp_path: Path) -> None:
    import datasets

    folders = write_seed_rows(tmp_path)
    assert set(folders) == set(SYSTEMS)
    r1_v = datasets.load_from_disk(str(folders["r1_v"] / "clevr_cogen_a_train"))
    assert r1_v.column_names == ["image", "problem", "solution"] and r1_v[0]["image"].mode == "RGBA"
    assert r1_v[0]["solution"].startswith("<answer> ") and r1_v[0]["solution"].endswith(" </answer>")
    rft = datasets.load_from_disk(str(folders["visual_rft"] / "ViRFT_COCO_base65"))
    assert (
        rft[0]["solution"].startswith("<answer>[{'Position': [") and "'Confidence': 1}" in rft[0]["solution"]
    )
    geo = datasets.load_from_disk(str(folders["easyr1"] / "geometry3k"))
    assert set(geo) == {"train", "validation", "test"} and isinstance(geo["train"][0]["images"], list)
    assert geo["train"][0]["problem"].startswith("<image>")
    onevision = datasets.load_dataset(
        "parquet", data_files=str(folders["r1_onevision"] / "R1-Onevision/*/*.parquet"), split="train"
    )
    images = [r["image"] for r in onevision]
    assert any(i.startswith("data:image/png;base64,") for i in images) and any(
        i.startswith("iVBOR") for i in images
    )
    assert all("<image>" not in r["conversations"][0]["value"] for r in onevision)
    swift = [
        json.loads(line)
        for line in (folders["ms_swift"] / "clevr_count/train.jsonl").read_text().splitlines()
    ]
    assert all("<image>" not in r["messages"][0]["content"] and r["images"] for r in swift)
    sat = json.loads((folders["visualthinker_r1_zero"] / "SAT/SAT_train_15000.json").read_text())
    assert sat[0]["messages"][0]["content"].startswith("<image> Answer in natural language.")
    distill = json.loads((folders["deepseek_r1_vision"] / "deepseek-r1-vision/distill.json").read_text())
    assert all("<answer>" not in m["content"] for r in distill for m in r["messages"])
    rec = [
        json.loads(line)
        for line in (folders["vlm_r1_rec"] / "VLM-R1/rec_jsons_processed/refcoco_train.jsonl")
        .read_text()
        .splitlines()
    ]
    box = json.loads(rec[0]["conversations"][1]["value"])
    with Image.open(folders["vlm_r1_rec"] / "VLM-R1/train2014" / rec[0]["image"]) as image:
        assert image.format == "JPEG" and len(box) == 4 and box[2] <= image.width and box[3] <= image.height


def test_visual_rft_classification_images_are_bytes_structs_the_reader_decodes(tmp_path: Path) -> None:
    import datasets

    from align.data.config import DataSource
    from align.data.readers import read_source

    folder = write_seed_rows(tmp_path)["visual_rft_classification"] / "ViRFT_CLS_fgvc_aircraft_4_shot/data"
    pattern = str(folder / "*.parquet")
    raw = datasets.load_dataset("parquet", data_files=pattern, split="train")
    assert set(raw[0]["image"]) == {"bytes", "path"} and isinstance(raw[0]["image"]["bytes"], bytes)
    samples = list(read_source(DataSource(name="cls", path=pattern, format="hf")))
    assert len(samples) == 8 and all(isinstance(s.images[0], Image.Image) for s in samples)
    # the gold as published; the rewards read what is inside <answer>
    assert [s.gold for s in samples] == list(raw["solution"])
    assert all(
        s.messages[0]["content"].startswith("<image>\nThis is an image containing shapes.") for s in samples
    )
