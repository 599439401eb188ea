"""Sequence-level GRPO variants: GSPO's ratio, DAPO's dynamic sampling and soft overlong punishment.

GSPO's loss parity with TRL is in ``tests/test_grpo_loss.py`` (``level="sequence"`` cases). Here: the soft
overlong reward (a table, and TRL's own function on the same lengths), the pure helpers of dynamic sampling, and
stage runs through ``align.cli.main`` on the tiny zoo: GSPO with two iterations, dynamic sampling on a reward
that gives known questions zero variance (``tests/dist_scripts/grpo_variant_rewards.py``), its exact resume, and
one 2-process DDP run.

    .venv/bin/pytest -q tests/test_grpo_variants.py
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trl.rewards import get_soft_overlong_punishment

import align.stages.grpo as grpo_stage
from align.cli import main
from align.grpo.rollout import RolloutBatch, fill_groups, has_signal, merge_groups, split_groups
from align.grpo.sampler import Rollout
from align.rewards import RewardSetupError, load_reward, soft_overlong

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
GATED = f"{SCRIPTS / 'grpo_variant_rewards.py'}:gated_vowels"
VOWELS = f"{SCRIPTS / 'grpo_rewards.py'}:vowel_share"
FLAT_FAMILIES = ("count", "colour")
G = 4
TIMING_KEYS = {"step_time_s", "completion_tokens_per_s"}


# ------------------------------------------------------------------------------------ soft overlong punishment


@pytest.mark.parametrize(
    ("length", "limit", "cache", "expected"),
    [
        (0, 100, 20, 0.0),
        (80, 100, 20, 0.0),  # up to L - cache: no penalty
        (81, 100, 20, -0.05),
        (90, 100, 20, -0.5),  # TRL's docstring example
        (100, 100, 20, -1.0),  # a completion cut at the budget
        (101, 100, 20, -1.0),
        (8, 8, 0, 0.0),  # cache 0: nothing but the -1 beyond L
        (9, 8, 0, -1.0),
        (1, 8, 8, -0.125),  # the whole budget is the window
        (6, 8, 4, -0.5),
    ],
)
def test_soft_overlong_table(length: int, limit: int, cache: int, expected: float) -> None:
    assert soft_overlong(length, limit, cache) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("limit", "cache"), [(100, 20), (8, 4), (16, 0), (10, 10), (7, 3)])
def test_soft_overlong_reward_matches_trl(limit: int, cache: int) -> None:
    ids = [[1] * n for n in range(limit + 3)]
    ours = load_reward("soft_overlong", {"max_completion_len": limit, "soft_punish_cache": cache})
    theirs = get_soft_overlong_punishment(max_completion_len=limit, soft_punish_cache=cache)
    assert ours(["text"] * len(ids), completion_ids=ids) == theirs(completion_ids=ids)
    assert min(theirs(completion_ids=ids)) == -1.0


def test_soft_overlong_needs_the_completion_ids_column() -> None:
    reward = load_reward("soft_overlong", {"max_completion_len": 8, "soft_punish_cache": 2})
    head = r"reward 'soft_overlong' needs a 'completion_ids' column \(token ids per completion\): "
    with pytest.raises(RewardSetupError, match=head + "no$"):
        reward(["a", "b"], solution=["1", "2"])
    with pytest.raises(RewardSetupError, match=head + "1 values for 2$"):
        reward(["a", "b"], completion_ids=[[1, 2]])


# ------------------------------------------------------------------------------- dynamic sampling, pure parts


@pytest.mark.parametrize(
    ("varied", "flat", "need", "chosen", "dropped"),
    [
        (["a", "b", "c"], ["x"], 2, ["a", "b"], 1),  # enough signal: surplus and flat groups left out
        (["a"], ["x", "y"], 2, ["a", "x"], 1),  # round limit hit: one zero-variance group fills the gap
        ([], ["x", "y", "z"], 2, ["x", "y"], 1),
        (["a", "b"], [], 2, ["a", "b"], 0),
    ],
)
def test_fill_groups_table(varied, flat, need, chosen, dropped) -> None:
    assert fill_groups(varied, flat, need) == (chosen, dropped)


def test_fill_groups_refuses_too_few_groups() -> None:
    with pytest.raises(ValueError, match="1 \\+ 0 groups sampled for 2 places"):
        fill_groups(["a"], [], 2)


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([1, 1, 1, 1, 0, 1, 0, 1], [False, True]),
        ([0.5, 0.5, float("nan"), 0.5, float("nan")] + [float("nan")] * 2 + [3.0], [False, False]),
        ([0.2, 0.2000001, 0.2, 0.2, 1, 1, 1, 2], [True, True]),
    ],
)
def test_has_signal_table(rewards, expected) -> None:
    assert has_signal(torch.tensor(rewards, dtype=torch.float32), G).tolist() == expected


def _batch(widths: int, n_questions: int, images: list[int], base: float, with_logps: bool) -> RolloutBatch:
    n = n_questions * G
    ids = torch.arange(n * widths).view(n, widths) + int(base * 1000)
    mask = (torch.arange(widths)[None, :] < (torch.arange(n)[:, None] % widths) + 1).long()
    pixels = torch.full((sum(images), 3, 2, 2), base) + torch.arange(sum(images)).view(-1, 1, 1, 1)
    rollout = Rollout(ids, mask, mask.sum(1), mask.sum(1) == widths, mask * 0.5 if with_logps else None)
    b = RolloutBatch(
        [f"s{base}-{q}" for q in range(n_questions)],
        [[q] for q in range(n_questions)],
        pixels if sum(images) else None,
        images,
        [[(q, q)] * k for q, k in enumerate(images)],
        rollout,
    )
    b.texts = [f"t{base}-{i}" for i in range(n)]
    b.scores = [[float(i)] for i in range(n)]
    b.per_func = torch.arange(n, dtype=torch.float32).view(n, 1) + base
    b.rewards = b.per_func[:, 0].clone()
    b.mask = mask.clone()
    b.ref_logps = mask * -1.0
    return b


def test_split_then_merge_keeps_every_group_whole() -> None:
    """Groups of two draws with different widths (and an image-less question) packed into one micro-batch."""
    one, two = _batch(3, 2, [1, 0], 0.0, True), _batch(5, 2, [2, 1], 1.0, True)
    pieces = split_groups(one, G) + split_groups(two, G)
    assert [p.images_per_prompt for p in pieces] == [[1], [0], [2], [1]]
    assert pieces[1].pixels is None and torch.equal(pieces[2].pixels, two.pixels[:2])
    merged = merge_groups([pieces[1], pieces[2], pieces[0]], pad_token_id=-7)
    assert merged.samples == ["s0.0-1", "s1.0-0", "s0.0-0"] and merged.images_per_prompt == [0, 2, 1]
    assert torch.equal(merged.pixels, torch.cat([two.pixels[:2], one.pixels[:1]]))
    r = merged.rollout
    assert r.completion_ids.shape == (3 * G, 5) and r.logps.shape == (3 * G, 5)
    assert torch.equal(r.completion_ids[:G, :3], one.rollout.completion_ids[G:])
    assert (r.completion_ids[:G, 3:] == -7).all() and (r.completion_mask[:G, 3:] == 0).all()
    assert torch.equal(r.completion_ids[G : 2 * G], two.rollout.completion_ids[:G])
    assert torch.equal(merged.rewards, torch.cat([one.rewards[G:], two.rewards[:G], one.rewards[:G]]))
    assert merged.texts[:G] == one.texts[G:] and merged.scores[G:] == two.scores[:G] + one.scores[:G]
    assert torch.equal(merged.mask, r.completion_mask) and merged.mask.sum() == sum(
        p.mask.sum() for p in (pieces[1], pieces[2], pieces[0])
    )
    assert torch.equal(merged.ref_logps[2 * G :, :3], one.ref_logps[:G])
    assert merged.advantages is None


# ------------------------------------------------------------------------------------------------ stage runs


@pytest.fixture(scope="module")
def work(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic train questions beside base/, the shared assembled SigLIP + Qwen2 tiny Llava (read only)."""
    root = tmp_path_factory.mktemp("grpo_variants")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root / "synth"), "--train", "16", "--test", "2"]) == 0
    (root / "base").symlink_to(siglip_qwen2, target_is_directory=True)
    return root


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def grpo(
    work: Path, out: Path, *overrides: str, resume: bool = False, crash_at_step: int | None = None
) -> str:
    """``align grpo recipes/tiny/grpo.yaml`` in this process; stdout. ``crash_at_step`` simulates a kill."""
    argv = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={work / 'base'}",
        f"output_dir={out}",
        f"data.sources.0.path={work / 'synth/train/rl.jsonl'}",
        "run.tensorboard=false",
        f"grpo.num_generations={G}",
        "grpo.max_completion_length=8",
        "optim.lr=1e-2",
        *overrides,
        *(["--resume"] if resume else []),
    ]
    update = grpo_stage.Progress.update

    def crashing_update(self, step, row):
        update(self, step, row)
        if step + 1 == crash_at_step:
            raise KeyboardInterrupt(f"simulated kill after step {step + 1}")

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(grpo_stage.Progress, "update", crashing_update)
        if crash_at_step is None:
            assert main(argv) == 0, stdout.getvalue()[-3000:]
        else:
            with pytest.raises(KeyboardInterrupt):
                main(argv)
    return stdout.getvalue()


@pytest.mark.slow
def test_gspo_with_two_iterations_trains_with_sane_metrics(work: Path) -> None:
    out = work / "gspo"
    grpo(
        work,
        out,
        "grpo.importance_sampling_level=sequence",
        "grpo.num_iterations=2",
        "run.max_steps=4",
        f"grpo.reward_funcs=[{VOWELS}, soft_overlong]",
        "grpo.reward_params={soft_overlong: {soft_punish_cache: 4}}",
        "optim.schedule=constant",
    )
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["loss"] == pytest.approx(row["loss/policy"] + row["loss/kl"], abs=1e-6)
        assert 0 <= row["clip_ratio/low"] <= 1 and 0 <= row["clip_ratio/high"] <= 1
        assert row["clip_ratio/region"] == pytest.approx(row["clip_ratio/low"] + row["clip_ratio/high"])
        # every truncated completion gets -1, the others a penalty in [-1, 0]
        assert -1.0 <= row["reward/soft_overlong"] <= -row["truncated_share"] + 1e-9
    for first, second in (rows[0], rows[1]), (rows[2], rows[3]):
        assert first["ratio"] == pytest.approx(1.0, abs=1e-4), "the sampler's log-probs are the policy's"
        assert abs(second["ratio"] - 1.0) > 1e-4, "after one update the completions' ratios moved"
        assert second["reward"] == first["reward"], "both iterations train on the same completions"
    assert rows[-1]["kl"] > 0 and any(r["grad_norm"] > 0 for r in rows)


def _dynamic(*extra: str) -> tuple[str, ...]:
    return (
        "grpo.dynamic_sampling=true",
        "grpo.dynamic_sampling_max_rounds=3",
        f"grpo.reward_funcs=[{GATED}]",
        "grpo.beta=0",
        "run.max_steps=4",
        *extra,
    )


def _check_dynamic_run(rows: list[dict], record: list[dict], per_rank: int, world: int) -> None:
    """The logged counts agree with what the reward saw, and each update had only groups with signal unless the
    round limit (3) was reached."""
    families = [f for call in record for f in call["family"]]
    scores = torch.tensor([s for call in record for s in call["scores"]])
    assert len(families) == sum(r["dynamic_sampling/rounds"] for r in rows) * per_rank * world * G
    signal = has_signal(scores, G).tolist()
    assert not any(ok for f, ok in zip(families[::G], signal, strict=True) if f in FLAT_FAMILIES)
    flat_sampled = signal.count(False)
    flat_trained = sum(round(r["frac_reward_zero_std"] * per_rank * world) for r in rows)
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) + flat_trained == flat_sampled
    for r in rows:
        assert 1 <= r["dynamic_sampling/rounds"] <= 3
        if r["dynamic_sampling/rounds"] < 3:
            assert r["frac_reward_zero_std"] == 0.0, "below the round limit every group trained on varies"
    assert any(r["dynamic_sampling/dropped_groups"] > 0 and r["dynamic_sampling/rounds"] > 1 for r in rows), (
        "some step must have dropped groups and refilled them for this test to mean much"
    )


@pytest.mark.slow
def test_dynamic_sampling_drops_zero_variance_groups_and_refills(work: Path, monkeypatch) -> None:
    record = work / "dynamic.jsonl"
    monkeypatch.setenv("GRPO_VARIANT_RECORD", str(record))
    grpo(work, work / "dynamic", *_dynamic())
    rows = jsonl(work / "dynamic" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    _check_dynamic_run(rows, jsonl(record), per_rank=2, world=1)

    monkeypatch.setenv("GRPO_VARIANT_RECORD", str(work / "static.jsonl"))
    grpo(work, work / "static", f"grpo.reward_funcs=[{GATED}]", "grpo.beta=0", "run.max_steps=4")
    static = jsonl(work / "static" / "metrics.jsonl")
    assert "dynamic_sampling/rounds" not in static[0]
    assert len(jsonl(work / "static.jsonl")) == 4, "without dynamic sampling: one rollout round per step"
    assert any(r["frac_reward_zero_std"] > 0 for r in static), "the same data has zero-variance groups"


@pytest.mark.slow
def test_resume_with_dynamic_sampling_repeats_the_uninterrupted_run(work: Path) -> None:
    common = _dynamic("run.save_every=2")
    grpo(work, work / "dyn_whole", *common)
    whole = jsonl(work / "dyn_whole" / "metrics.jsonl")
    assert sum(r["dynamic_sampling/rounds"] for r in whole[:2]) > 2, "extra rounds before the checkpoint"
    grpo(work, work / "dyn_killed", *common, crash_at_step=3)
    stdout = grpo(work, work / "dyn_killed", *common, resume=True)
    assert "resumed from" in stdout and "step-0000002" in stdout
    resumed = jsonl(work / "dyn_killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed, strict=True):
        keep = {k for k in a if k not in TIMING_KEYS and not k.startswith("time/")}
        assert {k: b[k] for k in keep} == pytest.approx({k: a[k] for k in keep}, rel=1e-5, abs=1e-7), a[
            "step"
        ]
    w = load_file(work / "dyn_whole" / "model" / "model.safetensors")
    r = load_file(work / "dyn_killed" / "model" / "model.safetensors")
    assert all(torch.allclose(w[k], r[k], atol=1e-6) for k in w)


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("grpo.reward_params={length: {target: 10}}", "grpo.reward_params.length", "not one of reward_funcs"),
        (
            "grpo.reward_funcs=[format, soft_overlong]",
            "grpo.reward_params.soft_overlong",
            "soft_punish_cache",
        ),
        ("grpo.reward_params={format: {scale: 2}}", "grpo.reward_params.format", "has no parameter 'scale'"),
        ("grpo.dynamic_sampling_max_rounds=1", "grpo.dynamic_sampling_max_rounds", "could not refill"),
        ("grpo.importance_sampling_level=batch", "grpo.importance_sampling_level", "sequence"),
    ],
)
def test_recipe_mistakes_name_the_key(work: Path, override: str, key: str, message: str) -> None:
    argv = ["grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={work / 'base'}", override]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 2
    assert key in err.getvalue() and message in err.getvalue(), err.getvalue()


def test_soft_overlong_cache_beyond_the_budget_and_zero_weights_are_refused(work: Path) -> None:
    cases = [
        (
            ["grpo.reward_funcs=[format, soft_overlong]", "grpo.max_completion_length=8",
             "grpo.reward_params={soft_overlong: {soft_punish_cache: 9}}"],
            "[0, max_completion_len (8)]",
        ),
        (["grpo.dynamic_sampling=true", "grpo.reward_weights=[0, 0]"], "every reward weight is 0"),
    ]  # fmt: skip
    for overrides, message in cases:
        argv = ["grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={work / 'base'}", *overrides]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(argv) == 2
        assert message in err.getvalue(), err.getvalue()


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_dynamic_sampling_ranks_agree(work: Path) -> None:
    """Each rank finds groups with signal at its own pace; the summed shortfall keeps their rounds in step."""
    out, record = work / "dyn_ddp", work / "dyn_ddp.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "align.cli", "grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={work / 'base'}"]
    cmd += [f"output_dir={out}", f"data.sources.0.path={work / 'synth/train/rl.jsonl'}", "run.strategy=ddp"]
    cmd += ["run.micro_batch_size=1", "run.tensorboard=false", f"grpo.num_generations={G}"]
    cmd += ["grpo.max_completion_length=8", "optim.lr=1e-2", *_dynamic()]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["GRPO_VARIANT_RECORD"] = str(record)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail(f"2-process dynamic sampling timed out (ranks out of step?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    calls = jsonl(record)
    per_rank = [[c for c in calls if c["rank"] == rank] for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == sum(r["dynamic_sampling/rounds"] for r in rows), (
        "every rank rolled out the same rounds, as many as logged (one question per rank per round)"
    )
    _check_dynamic_run(rows, calls, per_rank=1, world=2)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["steps"]) == (2, "ddp", 4)
