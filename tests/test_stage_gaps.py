"""Cases that kill the mutants ``scripts/mutation.sh stages/sft`` (and ``stages/grpo``, begun) found surviving
in ``align/stages/`` (docs/testing.md lists them). The stage helpers are called directly on hand-made rows and the tiny zoo Llava.
One observed 4-step ``align sft`` run (mixed image and text-only rows, a sampled source, a bad row skipped)
is checked for what it trained on, in which order, and what it logged, printed and saved; a copy of it is
resumed. Each expected number is worked out here (or by transformers), not read back from the code under test.

    .venv/bin/pytest -q tests/test_stage_gaps.py
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from align.checkpoint import image_seq_len, load_llava
from align.cli import main
from align.config import load_any
from align.data.batching import length_grouped_batches, pack
from align.data.config import DataSource
from align.data.encode import IGNORE_INDEX, Encoded, encode_sft
from align.data.mixing import build_mix
from align.engine import Dist
from align.errors import AlignError
from align.stages import grpo, sft

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


def _row(labels: list[int], origin: str = "d.jsonl:1", images: list | None = None) -> Encoded:
    images = images or []
    return Encoded(
        input_ids=list(range(10, 10 + len(labels))),
        labels=labels,
        n_images=len(images),
        origin=origin,
        prompt_length=1,
        n_image_tokens=0,
        images=images,
    )


# --- the stage commands ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "recipe", "kind"),
    [("sft", "grpo.yaml", "grpo"), ("projector", "sft.yaml", "sft"), ("grpo", "projector.yaml", "projector")],
)
def test_a_stage_command_takes_only_its_own_kind_of_recipe(command, recipe, kind, capsys) -> None:
    assert main([command, str(TINY / recipe)]) == 2
    assert f"this command takes a '{command}' recipe, got '{kind}'" in capsys.readouterr().err


# --- align/stages/sft.py: counting and ordering -----------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "counted"),
    [
        ([5, 6, IGNORE_INDEX, 7], 2),  # the first label is never predicted: the loss shifts by one
        ([IGNORE_INDEX, 6, 7, 8], 3),
        ([IGNORE_INDEX, IGNORE_INDEX, 7], 1),
        ([4], 0),
    ],
)
def test_supervised_counts_the_labels_the_shifted_loss_sees(labels: list[int], counted: int) -> None:
    assert sft._supervised(_row(labels)) == counted
    shifted = torch.tensor(labels)[1:]
    assert int((shifted != IGNORE_INDEX).sum()) == counted


def test_shuffled_global_batches_are_full_and_follow_the_seeded_order() -> None:
    """``data.group_by_length: false``: 7 rows in batches of 2 give 3 full batches, the first 6 indices of the
    order seeded by (seed, epoch); another seed or epoch gives another order, the same ones the same."""
    units = [_row([1, 2, 3]) for _ in range(7)]
    batches = sft._global_batches(units, 2, seed=3, epoch=1, group_by_length=False)
    order = list(range(7))
    random.Random("sft-order:3:1").shuffle(order)
    assert batches == [order[0:2], order[2:4], order[4:6]]
    assert batches == sft._global_batches(units, 2, seed=3, epoch=1, group_by_length=False)
    assert batches != sft._global_batches(units, 2, seed=4, epoch=1, group_by_length=False)
    assert batches != sft._global_batches(units, 2, seed=3, epoch=2, group_by_length=False)
    assert sft._global_batches(units, 7, seed=3, epoch=1, group_by_length=False) == [order]
    assert sft._global_batches(units, 8, seed=3, epoch=1, group_by_length=False) == []


def test_length_grouped_global_batches_drop_the_short_batch_whole() -> None:
    lengths = [3, 9, 4, 8, 5, 7, 6, 2, 10, 1, 11]
    units = [_row(list(range(n))) for n in lengths]
    for seed, epoch in ((0, 0), (5, 0), (5, 3)):
        grouped = length_grouped_batches(lengths, 3, seed, epoch)
        assert sorted(map(len, grouped)) == [2, 3, 3, 3]
        expected = [b for b in grouped if len(b) == 3]
        assert sft._global_batches(units, 3, seed, epoch, group_by_length=True) == expected


# --- align/stages/sft.py: collation -----------------------------------------------------------------------------


def test_collate_lists_every_image_with_its_row_padded_and_packed() -> None:
    a = _row([IGNORE_INDEX, 1, 2], "d.jsonl:1", images=["a1.png", "a2.png"])
    b = _row([IGNORE_INDEX, 3], "d.jsonl:2", images=["b1.png"])
    padded = sft._collate([a, b], packing=False, pad_id=0)
    assert padded["images"] == ["a1.png", "a2.png", "b1.png"]
    assert padded["image_origins"] == ["d.jsonl:1", "d.jsonl:1", "d.jsonl:2"]
    assert padded["input_ids"].shape == (2, 3)
    packed = sft._collate(pack([b, a], 8), packing=True, pad_id=0)
    assert packed["images"] == ["b1.png", "a1.png", "a2.png"]
    assert packed["image_origins"] == ["d.jsonl:2", "d.jsonl:1", "d.jsonl:1"]
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


# --- align/stages/sft.py: one observed run ----------------------------------------------------------------------


def _sft(data: Path, out: Path, *overrides: str) -> dict:
    """``align sft recipes/tiny/sft.yaml`` in this process on ``data``; records every micro-batch the stage
    formed and the loss sum it got for it, every ``torch.manual_seed`` it called, the wall time, and what it
    handed a stand-in ``wandb`` module (``wandb`` is not a dependency, and must not reach the network here)."""
    batches: list[dict] = []
    sums: list[float] = []
    seeds: list = []
    units: list = []
    wandb: dict = {"init": [], "log": [], "finished": 0}
    original, fit_all = sft.forward_loss_sum, sft.fit_all

    def wandb_init(**kwargs):
        wandb["init"].append(kwargs)
        return SimpleNamespace(
            log=lambda metrics, step: wandb["log"].append((step, metrics)),
            finish=lambda: wandb.update(finished=wandb["finished"] + 1),
        )

    def fitted(*args, **kwargs):
        encoded, report = fit_all(*args, **kwargs)
        units.extend(encoded)
        return encoded, report

    def observed(module, model, batch, *args, **kwargs):
        loss_sum, n = original(module, model, batch, *args, **kwargs)
        batches.append(batch)
        sums.append(float(loss_sum.detach()))
        return loss_sum, n

    argv = [
        "sft", str(TINY / "sft.yaml"), f"output_dir={out}", f"data.sources.0.path={data}",
        "run.save_every=0", "run.tensorboard=false", *overrides,
    ]  # fmt: skip
    manual_seed = torch.manual_seed
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setattr(sft, "forward_loss_sum", observed)
        mp.setattr(sft, "fit_all", fitted)
        mp.setitem(sys.modules, "wandb", SimpleNamespace(init=wandb_init))
        mp.setattr(torch, "manual_seed", lambda s: (seeds.append(s), manual_seed(s))[1])
        t0 = time.perf_counter()
        assert main(argv) == 0, stdout.getvalue()[-3000:]
        wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    saved = (
        sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    )
    return {
        "batches": batches, "sums": sums, "seeds": seeds, "wall": wall, "metrics": metrics, "summary": summary,
        "saved": saved, "out": out, "units": units, "printed": stdout.getvalue(), "wandb": wandb,
    }  # fmt: skip


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic image rows, the same 6 without their image, and at line 13 a row that ends with a question (well formed, but with no reply to learn)."""
    root = tmp_path_factory.mktemp("stage_gaps")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root / "synth"), "--train", "6", "--test", "1"]) == 0
    train = root / "synth" / "train"
    rows = [json.loads(line) for line in train.joinpath("sft.jsonl").read_text().splitlines()]
    for row in rows[:6]:
        text_only = {**row, "id": row["id"] + "-text", "images": []}
        text_only["messages"] = [dict(m) for m in row["messages"]]
        text_only["messages"][0]["content"] = row["messages"][0]["content"].replace("<image>\n", "")
        rows.append(text_only)
    rows.append({**rows[-1], "id": "no-reply", "messages": [*rows[-1]["messages"], rows[-1]["messages"][0]]})
    train.joinpath("mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train / "mixed.jsonl"


MIXED = [
    "run.seed=7", "data.seed=12", "data.strict=false", "data.sources.0.sampling=random:9", "run.micro_batch_size=1",
    "run.grad_accum=2", "run.max_steps=4", "run.log_every=3", "run.save_every=3", "run.keep_last=5",
    "run.wandb_project=gaps",
]  # fmt: skip


@pytest.fixture(scope="module")
def mixed_run(siglip_qwen2: Path, mixed_rows: Path) -> dict:
    """4 steps (an epoch) on 9 of the 12 good mixed rows (drawn with data.seed 12; the bad row skipped,
    data.strict false), length-grouped, 2 accumulated micro-batches of 1 row a step, a log row and a
    checkpoint every 3 steps; torch seeded from run.seed 7."""
    return _sft(
        mixed_rows, mixed_rows.parent / "run", f"model={siglip_qwen2}", *MIXED,
    )  # fmt: skip


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


@pytest.mark.slow
def test_the_log_rows_count_what_each_step_trained_on(mixed_run: dict) -> None:
    """A row at step 3 (log_every) and at the last step 4, not at 1 or 2 (log_every 3 tells ``step + 1`` from
    ``step - 1``, which log_every 2 does not); each row's counts are those of the step's own 2 micro-batches,
    recounted here from the batches the loss saw."""
    metrics, batches = mixed_run["metrics"], mixed_run["batches"]
    assert len(batches) == 8
    assert [r["step"] for r in metrics] == [3, 4]
    assert sum(not b["images"] for b in batches) in range(1, 8), "text-only and image rows both trained"
    for r in metrics:
        step = batches[2 * r["step"] - 2 : 2 * r["step"]]
        assert r["images"] == sum(len(b["images"]) for b in step)
        assert r["text_only_micro_batches"] == sum(not b["images"] for b in step)
        assert r["supervised_tokens"] == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in step)
        assert 0 < r["step_time_s"] < mixed_run["wall"]
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(sum(_tokens(b) for b in step), rel=1e-6)
    # a step not split half and half: counting image micro-batches instead would differ there
    assert any(r["text_only_micro_batches"] != 1 for r in metrics)
    summary = mixed_run["summary"]
    assert summary["steps"] == 4
    assert summary["tokens_per_s"] * summary["wall_time_s"] == pytest.approx(
        sum(_tokens(b) for b in batches), rel=1e-6
    )


@pytest.mark.slow
def test_the_rows_and_their_order_follow_the_data_seed_not_the_run_seed(
    mixed_run: dict, mixed_rows: Path
) -> None:
    """data.seed (12) draws the 9 rows and orders the batches; the run.seed (7) does not: the units are the mix
    ``build_mix`` draws with seed 12 from the 12 good rows (the row without a reply skipped, and said so), and
    step k trains on full batch k of ``length_grouped_batches(lengths, 2, 12, epoch 0)``, micro-batch j on its
    row j. Seed 7, no seed, no epoch or no grouping would give other rows or batches here."""
    bad = f"{mixed_rows}:13"
    source = DataSource(name="reasoning", path=str(mixed_rows), format="messages", sampling="random:9")
    skipped = (
        f"skipping 1 of 13 rows of {mixed_rows} (stage 1), first {bad}: an sft row must end with an assistant"
    )
    assert skipped in mixed_run["printed"]

    def drawn(seed) -> list[str]:
        return [row.origin for row in build_mix([source], seed, strict=False, exclude={bad})[0]]

    table = build_mix([source], 12, strict=False, exclude={bad})[1].table()
    assert table in mixed_run["printed"]  # read 13, problems 1, kept 12, sampled 9, mixed 9
    assert (
        "max_length 1024: kept 9 rows, truncated the target of 0 (0 tokens), dropped 0"
        in mixed_run["printed"]
    )
    assert "9 units, global batch 2, 4 steps/epoch, 4 steps" in mixed_run["printed"]

    units, batches = mixed_run["units"], mixed_run["batches"]
    assert [u.origin for u in units] == drawn(12)
    assert drawn(7) != drawn(12) and drawn(None) != drawn(12), "choose other seeds for this test"
    lengths = [len(u) for u in units]

    def full(seed, epoch) -> list[list[int]]:  # the short batch of the 9th row is dropped
        return [b for b in length_grouped_batches(lengths, 2, seed, epoch) if len(b) == 2]

    expected = full(12, 0)
    others = [full(seed, epoch) for seed, epoch in ((7, 0), (None, 0), (12, None))]
    others.append(sft._global_batches(units, 2, 12, 0, group_by_length=False))
    assert all(other != expected for other in others), "choose other seeds for this test"
    trained = [units[i].input_ids for batch in expected for i in batch]
    assert [b["input_ids"][0].tolist() for b in batches] == trained


@pytest.mark.slow
def test_a_checkpoint_every_save_every_steps_but_not_after_the_last(mixed_run: dict) -> None:
    """save_every 3 of 4 steps: step 3 only, not the last (the final model is the output's own ``model/``);
    save_every 2 would not tell ``step + 1`` from ``step - 1``. A model folder with its processor, so that it
    loads on its own."""
    assert mixed_run["saved"] == ["step-0000003"]
    processor = AutoProcessor.from_pretrained(mixed_run["out"] / "checkpoints/step-0000003/model")
    assert processor.image_token == "<image>"


@pytest.mark.slow
def test_the_summary_gives_the_last_loss_the_start_and_the_memory_held(mixed_run: dict) -> None:
    """``summary.json``: the final loss is the last step's, a fresh run starts at 0, and one process holds the
    weights and Adam states ``align plan`` counts for it (the frozen tower has no optimizer state)."""
    summary, metrics = mixed_run["summary"], mixed_run["metrics"]
    assert summary["final_loss"] == metrics[-1]["loss"]
    assert summary["resumed_from"] == 0
    memory = summary["memory_elements"]
    assert memory["weights_held"] == memory["weights_plan"] > memory["optimizer_held"]
    assert memory["optimizer_held"] == memory["optimizer_plan"] > 0


@pytest.mark.slow
def test_a_caller_that_passes_only_resume_keeps_earlier_outputs(
    siglip_qwen2: Path, mixed_rows: Path, tmp_path: Path
) -> None:
    """The pipeline calls ``train(recipe, dist, resume=True)``: with no checkpoint to resume, a fresh start
    keeps what an earlier attempt left (``overwrite`` defaults to off; on, it would remove TensorBoard events).
    What the stage says goes through ``dist.log`` (the main rank's voice), the skipped bad row included: a
    plain ``print`` would repeat it on every rank."""

    logged: list[str] = []

    class RecordingDist(Dist):
        def log(self, *parts) -> None:
            logged.append(" ".join(map(str, parts)))

    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.earlier").write_text("an earlier attempt's events")
    overrides = [
        f"model={siglip_qwen2}", f"output_dir={out}", f"data.sources.0.path={mixed_rows}", "data.strict=false",
        "run.micro_batch_size=1", "run.grad_accum=1", "run.max_steps=1", "run.tensorboard=false",
        "run.save_every=0",
    ]  # fmt: skip
    recipe = load_any(TINY / "sft.yaml", overrides, expect="sft")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        sft.train(recipe, RecordingDist(0, 1, 0, torch.device("cpu"), False), resume=True)
    assert f"--resume: no complete checkpoint under {out / 'checkpoints'}; starting at step 0" in logged
    assert any(line.startswith("data.strict is false: skipping 1 of 13 rows") for line in logged)
    assert "skipping" not in printed.getvalue()
    assert (out / "model" / "config.json").is_file()
    assert (out / "tensorboard" / "events.earlier").is_file()


@pytest.mark.slow
def test_wandb_gets_the_project_the_resolved_recipe_and_each_log_row(mixed_run: dict) -> None:
    """``run.wandb_project``: ``wandb.init(project, config=<the resolved recipe>, dir=<output_dir>)``, every log
    row as written to metrics.jsonl, ``finish`` once; and the plain progress line of each logged step."""
    wandb, out = mixed_run["wandb"], mixed_run["out"]
    (init,) = wandb["init"]
    assert init == {
        "project": "gaps",
        "config": yaml.safe_load((out / "recipe.resolved.yaml").read_text()),
        "dir": str(out),
    }
    assert [(step, {"step": step, **row}) for step, row in wandb["log"]] == [
        (r["step"], r) for r in mixed_run["metrics"]
    ]
    assert wandb["finished"] == 1
    steps = [line.split()[:2] for line in mixed_run["printed"].splitlines() if line.startswith("step ")]
    assert steps == [["step", "3/4"], ["step", "4/4"]]


@pytest.mark.slow
def test_a_resumed_run_goes_on_from_its_checkpoints_step(
    mixed_run: dict, mixed_rows: Path, siglip_qwen2: Path, tmp_path: Path
) -> None:
    """The mixed run's outputs as an interrupted run leaves them (no final model) and ``--resume``: it loads
    the step-3 checkpoint and trains step 4 only, to the uninterrupted run's loss, grad norm and weights."""

    out = tmp_path / "run"
    shutil.copytree(mixed_run["out"], out)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    resumed = _sft(mixed_rows, out, f"model={siglip_qwen2}", *MIXED, "--resume")
    assert len(resumed["batches"]) == 2, "step 4's two micro-batches only"
    assert resumed["summary"]["resumed_from"] == 3
    assert [r["step"] for r in resumed["metrics"]] == [3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert resumed["metrics"][1][key] == pytest.approx(mixed_run["metrics"][1][key], rel=1e-6), key
    final, once = (
        load_file(out / "model/model.safetensors"),
        load_file(mixed_run["out"] / "model/model.safetensors"),
    )
    assert max(float((final[k] - once[k]).abs().max()) for k in once) <= 1e-6
    # the resolved recipe is the first run's (its output_dir is the original folder): a resume does not rewrite it
    resolved = (mixed_run["out"] / "recipe.resolved.yaml").read_text()
    assert (out / "recipe.resolved.yaml").read_text() == resolved and str(out) not in resolved


@pytest.mark.slow
def test_each_step_seeds_torch_from_the_run_seed_and_the_step(mixed_run: dict) -> None:
    """Dropout and any other draw of a step depend on (run.seed, step) only, so a resumed run replays them:
    the stage seeds ``run.seed * 1_000_003 + step`` (an int) before each step's forward passes."""
    step_seeds = [s for s in mixed_run["seeds"] if s != 7]
    assert step_seeds[-4:] == [7 * 1_000_003 + step for step in range(4)]
    assert all(type(s) is int for s in mixed_run["seeds"])


@pytest.mark.slow
def test_a_step_of_one_supervised_token_divides_by_one(siglip_qwen2: Path, mixed_rows: Path) -> None:
    """``data.max_length`` one past a row's prompt keeps one target token (overlong: drop cuts the target):
    the step's loss is that token's cross-entropy itself, divided by 1 (the floor that guards an empty step)."""
    lines = mixed_rows.read_text().splitlines()
    one = mixed_rows.parent / "one.jsonl"
    one.write_text(lines[6] + "\n")  # a text-only row
    full = _sft(one, mixed_rows.parent / "one_full", f"model={siglip_qwen2}", "run.micro_batch_size=1",
                "run.grad_accum=1", "run.max_steps=1")  # fmt: skip
    labels = full["batches"][0]["labels"][0].tolist()
    prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    cut = _sft(one, mixed_rows.parent / "one_cut", f"model={siglip_qwen2}", "run.micro_batch_size=1",
               "run.grad_accum=1", "run.max_steps=1", f"data.max_length={prompt + 1}")  # fmt: skip
    (row,) = cut["metrics"]
    assert row["supervised_tokens"] == 1
    assert row["loss"] == pytest.approx(cut["sums"][0], rel=1e-6)


# --- align/stages/sft.py: the feature cache ---------------------------------------------------------------------


def test_the_feature_cache_lives_in_the_output_and_is_keyed_by_what_makes_the_features(
    siglip_qwen2: Path, tmp_path: Path
) -> None:
    """``disk``: under ``<output_dir>/feature_cache/<fingerprint>``; the fingerprint changes with the tower's
    weights, the image processor, the feature layer and the select strategy (a cache from another of these
    would hand back other features); ``none``: no cache."""

    llava, processor = load_llava(siglip_qwen2)
    recipe = SimpleNamespace(feature_cache="disk", output_dir=str(tmp_path / "out"))
    cache = sft._feature_cache(recipe, llava, processor)
    assert cache.mode == "disk"
    fingerprint = cache.directory.name
    assert cache.directory.parent == tmp_path / "out" / "feature_cache"
    assert sft._feature_cache(recipe, llava, processor).directory.name == fingerprint
    assert sft._feature_cache(SimpleNamespace(feature_cache="none"), llava, processor) is None
    memory = SimpleNamespace(**{**vars(recipe), "feature_cache": "memory"})
    assert sft._feature_cache(memory, llava, processor).mode == "memory"

    def changed(change) -> str:
        model, proc = load_llava(siglip_qwen2)
        change(model, proc)
        return sft._feature_cache(recipe, model, proc).directory.name

    layer, strategy = llava.config.vision_feature_layer, llava.config.vision_feature_select_strategy
    others = [
        changed(lambda m, p: setattr(m.config, "vision_feature_layer", layer - 1)),
        changed(
            lambda m, p: setattr(
                m.config, "vision_feature_select_strategy", {"full": "default", "default": "full"}[strategy]
            )
        ),
        changed(lambda m, p: setattr(p.image_processor, "image_mean", [0.0, 0.0, 0.0])),
        changed(lambda m, p: m.model.vision_tower.parameters().__next__().data.add_(1.0)),
    ]
    assert len({fingerprint, *others}) == 5, (fingerprint, others)


@pytest.mark.slow
@pytest.mark.parametrize(("packing", "what"), [("false", "rows"), ("true", "packed rows")])
def test_fewer_rows_than_one_global_batch_are_refused_with_the_counts(
    siglip_qwen2: Path, mixed_rows: Path, tmp_path: Path, packing: str, what: str, capsys
) -> None:
    """One row and a global batch of 2 x 3 (packed: still one row): the error names both sides."""
    one = tmp_path / "one.jsonl"
    one.write_text(mixed_rows.read_text().splitlines()[6] + "\n")  # text-only: no image path to resolve
    argv = [
        "sft", str(TINY / "sft.yaml"), f"model={siglip_qwen2}", f"output_dir={tmp_path / 'out'}",
        f"data.sources.0.path={one}", f"data.packing={packing}", "run.micro_batch_size=2", "run.grad_accum=3",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"error: 1 training {what} after length filtering, fewer than one global batch (2 micro x 3 accum x "
        "1 ranks)\n"
    ) in err


@pytest.mark.slow
def test_without_a_data_seed_the_run_seed_orders_the_rows(siglip_qwen2: Path, mixed_rows: Path) -> None:
    """data.seed unset: the 12 good rows go in the order of ``length_grouped_batches(lengths, 1, run.seed 3, 0)``
    (the longest first), not of an unseeded draw."""
    run = _sft(
        mixed_rows, mixed_rows.parent / "run_seed", f"model={siglip_qwen2}", "run.seed=3", "data.strict=false",
        "run.micro_batch_size=1", "run.grad_accum=1", "run.max_steps=3",
    )  # fmt: skip
    units = run["units"]
    lengths = [len(u) for u in units]
    expected = length_grouped_batches(lengths, 1, 3, 0)[:3]
    assert length_grouped_batches(lengths, 1, None, 0)[:3] != expected, (
        "choose another run.seed for this test"
    )
    assert [b["input_ids"][0].tolist() for b in run["batches"]] == [units[i].input_ids for (i,) in expected]


def test_no_max_steps_trains_every_epoch_however_many_steps(
    siglip_qwen2: Path, mixed_rows: Path, tmp_path: Path, monkeypatch
) -> None:
    """run.max_steps unset (null) caps nothing: 11 epochs of 12 one-row steps are 132 steps (the steps themselves are
    skipped here: only the count is under test)."""
    monkeypatch.setattr(sft, "_step", lambda s, step, control: None)
    argv = [
        "sft", str(TINY / "sft.yaml"), f"model={siglip_qwen2}", f"output_dir={tmp_path / 'out'}",
        f"data.sources.0.path={mixed_rows}", "data.strict=false", "run.micro_batch_size=1", "run.grad_accum=1",
        "run.epochs=11", "run.tensorboard=false", "run.save_every=0",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    assert "12 units, global batch 1, 12 steps/epoch, 132 steps" in printed.getvalue()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 132


# --- align/stages/sft.py: the forward -----------------------------------------------------------------------------


def _good_rows(mixed_rows: Path) -> list:
    """The mixed file's 12 good rows in file order (the bad row 13 left out)."""
    source = DataSource(name="s", path=str(mixed_rows), format="messages")
    return build_mix([source], 0, strict=False, exclude={f"{mixed_rows}:13"})[0]


def _blue_image(folder: Path) -> Path:
    image = folder / "image.png"
    Image.new("RGB", (40, 30), "blue").save(image)
    return image


def test_the_training_forward_gives_hf_llavas_own_loss(siglip_qwen2: Path, mixed_rows: Path) -> None:
    """``forward_loss_sum`` on an image row beside a text-only row, and on text-only rows alone (the blank-image
    term), is the summed token cross-entropy of transformers' own Llava forward (``pixel_values`` from the
    processor) on the same ids: the stage's embedding path, not the replay's, is what is checked here."""

    model, processor = load_llava(siglip_qwen2)
    model.eval()
    samples = _good_rows(mixed_rows)
    units = [
        encode_sft(s, processor.tokenizer, model.config.image_token_id, image_seq_len(processor))
        for s in (samples[0], samples[6], samples[7])
    ]
    assert [u.n_images for u in units] == [1, 0, 0]
    cpu = torch.device("cpu")
    for rows in ([units[0], units[1]], [units[1], units[2]]):
        batch = sft._collate(rows, packing=False, pad_id=processor.tokenizer.pad_token_id)
        with torch.no_grad():
            got, n = sft.forward_loss_sum(model, model, batch, processor, None, 10**8, cpu)
            images = [Image.open(p).convert("RGB") for p in batch["images"]]
            pixels = (
                processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
                if images
                else None
            )
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels
            ).logits
        labels = batch["labels"][:, 1:].reshape(-1)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, reduction="sum")
        assert n == int((labels != IGNORE_INDEX).sum()) > 0
        assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_an_image_gone_since_the_check_is_named_with_its_own_row(siglip_qwen2: Path, tmp_path: Path) -> None:
    """Rows are checked before training; a file removed after that fails in the forward, naming the row of
    that image (the second of two here), not the first row or none."""

    model, processor = load_llava(siglip_qwen2)
    there = tmp_path / "there.png"
    Image.new("RGB", (16, 16), "red").save(there)
    gone = tmp_path / "gone.png"
    with pytest.raises(AlignError) as err:
        sft._image_features(
            model, [str(there), str(gone)], processor, None, 10**8, ["d.jsonl:4", "d.jsonl:9"]
        )
    assert str(err.value).startswith(f"d.jsonl:9: image not found: {gone}")
    batch = sft._collate([_row([IGNORE_INDEX, 1], "d.jsonl:9", images=[str(gone)])], False, pad_id=0)
    with pytest.raises(AlignError) as err:
        sft.input_embeddings(model, batch, processor, None, 10**8, torch.device("cpu"))
    assert str(err.value).startswith(f"d.jsonl:9: image not found: {gone}")


def test_image_features_enter_the_embeddings_in_their_dtype_under_autocast(
    siglip_qwen2: Path, mixed_rows: Path
) -> None:
    """bf16 autocast (how single and DDP runs train on GPU) makes the projector's output bf16 while the token
    embeddings stay fp32: the features are cast to the embeddings' dtype before they are written in."""
    model, processor = load_llava(siglip_qwen2)
    sample = _good_rows(mixed_rows)[0]
    unit = encode_sft(sample, processor.tokenizer, model.config.image_token_id, image_seq_len(processor))
    batch = sft._collate([unit], packing=False, pad_id=processor.tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = sft.input_embeddings(model, batch, processor, None, 10**8, cpu)
        features = sft._image_features(model, batch["images"], processor, None, 10**8)
    assert features.dtype == torch.bfloat16 and embeds.dtype == torch.float32
    at_images = batch["input_ids"][0] == model.config.image_token_id
    assert torch.equal(embeds[0][at_images], features.float())


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_a_text_only_batch_runs_the_tower_as_an_image_batch_does(
    siglip_qwen2: Path, tmp_path: Path, strategy: str
) -> None:
    """No image: one blank image through the same tower modules and the same feature selection, so exactly one
    image's features come back (``input_embeddings`` adds 0 x them): every rank then runs the same modules,
    which ZeRO-3 and DDP need whatever a rank's rows hold."""

    model, processor = load_llava(siglip_qwen2)
    model.config.vision_feature_select_strategy = strategy
    image = _blue_image(tmp_path)
    ran: list[str] = []
    for name, module in model.model.vision_tower.named_modules():
        module.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    with torch.no_grad():
        blank = sft._image_features(model, [], processor, None, 10**8)
        blank_modules, ran[:] = list(ran), []
        one = sft._image_features(model, [str(image)], processor, None, 10**8)
    assert blank_modules == ran
    assert blank.shape == one.shape
    assert one.shape[1] == model.config.text_config.hidden_size


def test_the_tower_inputs_take_the_towers_dtype(siglip_qwen2: Path, tmp_path: Path) -> None:
    """bf16 weights (ZeRO in bf16 trains bf16 weights): the pixels and the blank image are cast to the tower's
    dtype; fp32 inputs would fail in the tower's first convolution."""

    model, processor = load_llava(siglip_qwen2, dtype=torch.bfloat16)
    image = _blue_image(tmp_path)
    with torch.no_grad():
        for images in ([], [str(image)]):
            assert sft._image_features(model, images, processor, None, 10**8).dtype == torch.bfloat16


def test_image_tokens_that_do_not_match_the_features_are_refused_with_both_counts(
    siglip_qwen2: Path, tmp_path: Path
) -> None:
    """Rows encoded for another image size: 3 image tokens for one image of ``image_seq_len`` features."""

    model, processor = load_llava(siglip_qwen2)
    image = _blue_image(tmp_path)
    unit = _row([IGNORE_INDEX] * 4 + [5], images=[str(image)])
    unit.input_ids[:3] = [model.config.image_token_id] * 3
    batch = sft._collate([unit], packing=False, pad_id=0)
    with pytest.raises(AlignError) as err:
        sft.input_embeddings(model, batch, processor, None, 10**8, torch.device("cpu"))
    assert str(err.value) == (
        f"3 image tokens in the micro-batch but {image_seq_len(processor)} image features (1 images): the data "
        "was encoded for another image size"
    )


# --- align/stages/grpo.py ---------------------------------------------------------------------------------------


def test_the_sampling_mismatch_row_takes_means_of_means_and_extremes_of_extremes() -> None:
    """TRL's names; two micro-batches' statistics (one process): the means are averaged, the max is the larger
    max and the min the smaller min, not the first or last micro-batch's."""

    stats = [
        SimpleNamespace(
            logp_difference_mean=0.25, logp_difference_max=0.5, ratio_min=0.75, ratio_mean=1.0, ratio_max=1.5
        ),
        SimpleNamespace(
            logp_difference_mean=0.75, logp_difference_max=2.0, ratio_min=0.5, ratio_mean=1.5, ratio_max=1.25
        ),
    ]
    row = grpo._mismatch_row(Dist(0, 1, 0, torch.device("cpu"), False), stats)
    assert row == {
        "sampling/sampling_logp_difference/mean": pytest.approx(0.5),
        "sampling/sampling_logp_difference/max": 2.0,
        "sampling/importance_sampling_ratio/min": 0.5,
        "sampling/importance_sampling_ratio/mean": pytest.approx(1.25),
        "sampling/importance_sampling_ratio/max": 1.5,
    }
