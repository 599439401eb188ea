"""``align run``: a short version of the demo pipeline, and the demo's cached preparation.

The pipeline test runs the demo's own stage recipes (``recipes/demo/*.yaml``) through ``align.cli.main`` with
tiny overrides: the zoo's untrained parts instead of the demo's pre-trained ones, a few synthetic rows, two
optimizer steps per stage and short generations. Run: ``.venv/bin/pytest -q tests/test_pipeline.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.config import RecipeError
from align.data.synth import RL_QUESTION_TEMPLATE, synthesize

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"
STAGES = ("projector", "sft", "grpo")
STEPS = 2


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def short_pipeline(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline recipe: the demo's stage recipes on 12 train / 4 test scenes, 2 steps each."""
    root = tmp_path_factory.mktemp("pipeline")
    synth = root / "synth"
    synthesize(synth, train=12, test=4, image_size=64, seed=0)
    train = synth / "train"
    assemble = _write(
        root / "assemble.yaml",
        {
            "extends": str(DEMO / "assemble.yaml"),
            "vision": {"name_or_path": f"local-dir:{zoo / 'openclip-vit'}"},
            "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        },
    )
    common = [
        f"run.max_steps={STEPS}",
        "run.tensorboard=false",
        "run.log_every=1",
        "data.sources.0.sampling=all",
    ]
    stages = {
        "projector": [f"data.sources.0.path={train / 'captions.jsonl'}", "run.micro_batch_size=2"],
        "sft": [f"data.sources.0.path={train / 'sft.jsonl'}", "run.micro_batch_size=2", "run.save_every=1"],
        "grpo": [
            f"data.sources.0.path={train / 'rl.jsonl'}",
            "run.micro_batch_size=2",
            "run.save_every=1",
            "grpo.num_generations=2",
            "grpo.max_completion_length=8",
        ],
    }
    return _write(
        root / "pipeline.yaml",
        {
            "kind": "pipeline",
            "output_dir": str(root / "run"),
            "assemble": str(assemble),
            "stages": [
                {"recipe": str(DEMO / f"{k}.yaml"), "overrides": common + v} for k, v in stages.items()
            ],
            "eval": {
                "data": [
                    {
                        "name": "test",
                        "path": str(synth / "test" / "rl.jsonl"),
                        "format": "rl",
                        "question_template": RL_QUESTION_TEMPLATE,
                    }
                ],
                "rewards": ["accuracy", "format", "iou"],
                "max_new_tokens": 8,
                "batch_size": 4,
                "probe": "align.demo_probe:attribute_probe",
                "probe_params": {"scenes_dir": str(synth / "test")},
            },
        },
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _report_rows(run: Path) -> list[str]:
    """Stage names of report.md's first table."""
    lines = (run / "report.md").read_text().split("\n\n")[0].splitlines()[2:]
    return [line.split("|")[1].strip() for line in lines]


@pytest.mark.slow
def test_short_pipeline_runs_resumes_and_skips(short_pipeline: Path, capsys) -> None:
    from transformers import LlavaForConditionalGeneration

    run = Path(yaml.safe_load(short_pipeline.read_text())["output_dir"])
    assert main(["run", str(short_pipeline)]) == 0
    first = capsys.readouterr().out

    # every stage: a loadable model, its metrics, its evaluation; then the export and the report
    assert LlavaForConditionalGeneration.from_pretrained(run / "assembled") is not None
    assert json.loads((run / "assembled-eval" / "summary.json").read_text())["questions"] == 4
    for stage in STAGES:
        folder = run / stage
        assert LlavaForConditionalGeneration.from_pretrained(folder / "model") is not None
        assert [row["step"] for row in _lines(folder / "metrics.jsonl")] == list(range(1, STEPS + 1))
        summary = json.loads((folder / "eval" / "summary.json").read_text())
        assert summary["questions"] == 4
        assert 0.0 <= summary["groups"]["all"]["accuracy"] <= 1.0
        assert list((folder / "plots").glob("*.png"))
        assert f"== {stage}: " in first
    assert LlavaForConditionalGeneration.from_pretrained(run / "export") is not None
    assert (run / "export" / "README.md").is_file()
    assert _report_rows(run) == ["assembled", *STAGES]
    report = (run / "report.md").read_text()
    assert "Accuracy ± SE per question family" in report
    # the attribute probe ran on every stage's model, its table has a row per stage with paired gains
    for folder in ("assembled-eval", *(f"{stage}/eval" for stage in STAGES)):
        scores = json.loads((run / folder / "probe.json").read_text())
        assert set(scores) == {"colour", "shape", "position", "all"} and len(scores["all"]) == 4
    probe_rows = report.split("Probe `align.demo_probe:attribute_probe`")[1].split("\n\n")[1].splitlines()[2:]
    assert [r.split("|")[1].strip() for r in probe_rows] == ["assembled", *STAGES]
    assert all(" SE)" in r or "(+0.000)" in r or "(-0.000)" in r for r in probe_rows[1:])
    for stage in STAGES:  # each stage's curves are linked, and the links resolve
        links = re.findall(rf"\[[^]]+\]\(({stage}/plots/[^)]+\.png)\)", report)
        assert links and all((run / link).is_file() for link in links), stage
    assert re.search(r"\| sft \| 0\.\d{3} ± 0\.\d{3} \| 0\.\d{3}-[01]\.\d{3} \| [+-]\d\.\d{3} ± ", report), (
        report
    )

    # the same command again: every stage is done, nothing trains or evaluates again
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/**/predictions.jsonl")}
    assert len(stamps) == 4
    assert main(["run", str(short_pipeline)]) == 0
    again = capsys.readouterr().out
    for stage in STAGES:
        assert f"== {stage}: done already" in again
        assert len(_lines(run / stage / "metrics.jsonl")) == STEPS
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # an interrupted last stage (no summary, no final model) resumes from its checkpoint at step 1
    (run / "grpo" / "summary.json").unlink()
    for path in sorted((run / "grpo" / "model").iterdir()):
        path.unlink()
    (run / "grpo" / "model").rmdir()
    grpo_eval = run / "grpo" / "eval" / "predictions.jsonl"
    assert main(["run", str(short_pipeline)]) == 0
    resumed = capsys.readouterr().out
    assert "== sft: done already" in resumed and "== grpo: " in resumed
    assert json.loads((run / "grpo" / "summary.json").read_text())["resumed_from_round"] == STEPS - 1
    assert LlavaForConditionalGeneration.from_pretrained(run / "grpo" / "model") is not None
    assert grpo_eval.stat().st_mtime_ns != stamps[grpo_eval]  # the new model was evaluated again
    assert _report_rows(run) == ["assembled", *STAGES]

    # a changed SFT recipe re-runs SFT and, since its model changed, GRPO after it
    recipe = yaml.safe_load(short_pipeline.read_text())
    recipe["stages"][1]["overrides"].append("optim.lr=1.0e-4")
    changed = _write(short_pipeline.parent / "changed.yaml", recipe)
    assert main(["run", str(changed)]) == 0
    rerun = capsys.readouterr().out
    assert "== projector: done already" in rerun
    for stage in ("sft", "grpo"):
        assert f"== {stage}: its recipe or input model changed since it ran; starting it over" in rerun
        assert len(_lines(run / stage / "metrics.jsonl")) == STEPS
    assert json.loads((run / "sft" / "summary.json").read_text())["resumed_from"] == 0
    assert json.loads((run / "grpo" / "summary.json").read_text())["resumed_from_round"] == 0
    assert json.loads((run / "sft" / "input.json").read_text())["recipe"]["optim"]["lr"] == 1.0e-4


def test_prepare_builds_once_then_reuses(tmp_path: Path, zoo: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from align.demo import ClipSettings, DemoSettings, LMSettings, SynthSettings, prepare
    from align.vision import load_vision_tower

    settings = DemoSettings(
        root=str(tmp_path / "cache"),
        zoo=str(zoo),
        synth=SynthSettings(train=8, val=2, test=2),
        clip=ClipSettings(width=32, layers=2, text_width=32, text_layers=1, epochs=1, batch_size=4),
        lm=LMSettings(
            hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, seq_len=64, batch_size=2
        ),
    )
    parts = prepare(settings)
    built = capsys.readouterr().out
    assert "cached" not in built
    assert (parts.synth / "test" / "rl.jsonl").is_file()
    _, _, info = load_vision_tower("open_clip", f"local-dir:{parts.clip}")
    grid = settings.clip.image_size // settings.clip.patch_size
    assert (info.hidden_size, info.num_layers, info.num_patches) == (32, 2, grid * grid)
    llm = AutoModelForCausalLM.from_pretrained(parts.llm)
    assert (llm.config.hidden_size, llm.config.num_hidden_layers) == (32, 1)
    markers = {p: (p / "demo-part.json").read_text() for p in (parts.synth, parts.clip, parts.llm)}

    assert prepare(settings) == parts
    assert capsys.readouterr().out.count("cached") == 3
    assert {p: (p / "demo-part.json").read_text() for p in markers} == markers

    # changed LM settings rebuild the LLM only
    settings = dataclasses.replace(settings, lm=dataclasses.replace(settings.lm, lr=1e-4))
    prepare(settings)
    out = capsys.readouterr().out
    assert out.count("cached") == 2 and "causal-LM pre-training" in out

    # more test scenes rebuild the data only: the parts learn from the train split, which stays the same
    prepare(dataclasses.replace(settings, synth=dataclasses.replace(settings.synth, test=3)))
    out = capsys.readouterr().out
    assert out.count("cached") == 2 and "demo: synthetic tasks (8 train / 2 val / 3 test scenes) ->" in out
    assert len((parts.synth / "test" / "rl.jsonl").read_text().splitlines()) == 3


def test_stages_after_an_assembly_they_cannot_train_are_refused_before_assembling(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny = DEMO.parent / "tiny"
    pipeline = _write(
        tmp_path / "pipeline.yaml",
        {
            "kind": "pipeline",
            "output_dir": str(tmp_path / "run"),
            "assemble": str(tiny / "assemble_pixel_shuffle.yaml"),
            "stages": [{"recipe": str(tiny / "sft.yaml")}],
        },
    )
    assert main(["run", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert "Idefics3ForConditionalGeneration folder, which the stages do not train" in err
    assert not (tmp_path / "run" / "assembled").exists()


def test_report_tables_for_probes_and_other_rewards(tmp_path: Path) -> None:
    from align.pipeline import _other_rewards, _probe_table

    probes = {
        "assembled": {"colour": [0.0, 0.0, 1.0, 0.0], "all": [0.0, 0.5, 0.5, 0.5]},
        "projector": {"colour": [1.0, 1.0, 1.0, 0.0], "all": [0.5, 0.5, 1.0, 0.5]},
    }
    md = _probe_table(probes, "m:f")
    assert md[1].startswith("Probe `m:f`") and md[3] == "| stage | colour | all |"
    assert md[5] == "| assembled | 0.250 ± 0.250 | 0.375 ± 0.125 |"
    # colour gains 0.5 with per-item differences [1, 1, 0, 0]: SE 0.289, 1.7 SE
    assert md[6] == "| projector | 0.750 ± 0.250 (+0.500, +1.7 SE) | 0.625 ± 0.125 (+0.250, +1.7 SE) |"

    for stage, ious in (("sft", [0.0, 1.0]), ("grpo", [1.0, 1.0])):
        (tmp_path / stage).mkdir()
        rows = [{"family": "grounding", "rewards": {"accuracy": 0.0, "format": 1.0, "iou": v}} for v in ious]
        rows.append({"family": "count", "rewards": {"accuracy": 1.0, "format": 1.0, "iou": None}})
        (tmp_path / stage / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = _other_rewards({"sft": tmp_path / "sft", "grpo": tmp_path / "grpo"})
    assert md[3:] == [
        "| stage | grounding iou |",
        "|---|---|",
        "| sft | 0.500 ± 0.500 |",
        "| grpo | 1.000 ± 0.000 |",
    ]
    assert _other_rewards({"sft": tmp_path / "grpo"})[3] == "| stage | grounding iou |"


@pytest.mark.parametrize(
    "eval_keys, message",
    [
        ({"probe": "align.demo_probe"}, "eval.probe: expected 'module:function'"),
        ({"probe": "align.no_such_module:f"}, "eval.probe: cannot import 'align.no_such_module'"),
        ({"probe": "align.demo_probe:no_such_probe"}, "eval.probe: 'align.demo_probe' has no function"),
        ({"probe_params": {"scenes_dir": "x"}}, "eval.probe_params: are given but no probe is"),
    ],
)
def test_a_bad_probe_is_refused_when_the_recipe_is_read(
    tmp_path: Path, eval_keys: dict, message: str
) -> None:
    from align.config import load_any

    pipeline = _write(
        tmp_path / "pipeline.yaml",
        {
            "kind": "pipeline",
            "output_dir": str(tmp_path / "run"),
            "assemble": "assembled",
            "eval": {"data": [{"name": "t", "path": "t.jsonl", "format": "rl"}], **eval_keys},
        },
    )
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_any(pipeline, [], expect="pipeline")
