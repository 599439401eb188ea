"""Tests of the GRPO stage program (``align/stages/grpo.py``) on the tiny zoo and ``align data synth`` questions.

A random tiny model never scores on the real rewards (no learning signal), so the learning test uses
``tests/dist_scripts/grpo_rewards.py:vowel_share``, a dense reward a few updates can raise, and ``recorder``, which
writes down exactly what the reward functions receive. Runs go through ``align.cli.main`` in this process (the
2-process runs through ``torchrun -m align.cli``) with ``load_llava``, the sampler and the policy forward
wrapped to count calls. Every run is a few steps on 2-16 questions; the module takes ~1-2 min on 2 cores.

    .venv/bin/pytest -q tests/test_grpo_stage.py            # everything
    .venv/bin/pytest -q tests/test_grpo_stage.py -m "not distributed"
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import align.grpo.rollout as rollout_module
import align.stages.common as common
import align.stages.grpo as grpo_stage
from align.checkpoint import load_llava
from align.cli import main
from align.grpo.logps import Completions, completion_logps
from align.grpo.sampler import SamplingSettings, generate
from align.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ROOT / "tests" / "dist_scripts" / "grpo_rewards.py"
VOWELS, RECORDER = f"{REWARDS}:vowel_share", f"{REWARDS}:recorder"
# What the issue asks every step to show (reward/<name> etc. are checked per function).
STEP_KEYS = {
    "loss",
    "loss/policy",
    "loss/kl",
    "kl",
    "ratio",
    "clip_ratio/low",
    "clip_ratio/high",
    "clip_ratio/region",
    "entropy",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completion_length",
    "completion_length_max",
    "truncated_share",
    "completion_tokens",
    "completion_tokens_per_s",
    "step_time_s",
    "time/rollout_s",
    "time/rewards_s",
    "time/reference_s",
    "time/update_s",
    "lr",
    "grad_norm",
}
TIMING_KEYS = {"step_time_s", "completion_tokens_per_s"}


@pytest.fixture(scope="module")
def work(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic questions (16 train scenes) and an assembled SigLIP + Qwen2 tiny Llava under one folder."""
    root = tmp_path_factory.mktemp("grpo")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root / "synth"), "--train", "16", "--test", "2"]) == 0
        assemble = [
            "assemble",
            str(ROOT / "recipes/tiny/assemble_siglip_qwen2.yaml"),
            f"vision.name_or_path={zoo / 'siglip-hf'}",
            f"llm.name_or_path={zoo / 'qwen2-r1'}",
            f"output_dir={root / 'base'}",
        ]
        assert main(assemble) == 0
    return root


@dataclass
class Run:
    out: Path
    stdout: str
    loads: int  # load_llava calls: 1 = policy only, 2 = policy + reference copy
    sampler_logps: list[bool]  # return_logps of every sampler call
    policy_forwards: int
    reference_forwards: int

    def metrics(self) -> list[dict]:
        return jsonl(self.out / "metrics.jsonl")

    def completions(self) -> list[dict]:
        return jsonl(self.out / "completions.jsonl")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def grpo(
    work: Path,
    out: Path,
    *overrides: str,
    recipe: str = "grpo.yaml",
    resume: bool = False,
    env: dict | None = None,
    crash_at_step: int | None = None,
) -> Run:
    """``align grpo recipes/tiny/<recipe>`` on ``work``'s data and model, in this process, counting calls."""
    argv = [
        "grpo",
        str(ROOT / "recipes" / "tiny" / recipe),
        f"model={work / 'base'}",
        f"output_dir={out}",
        f"data.sources.0.path={work / 'synth/train/rl.jsonl'}",
        "run.tensorboard=false",
        *overrides,
        *(["--resume"] if resume else []),
    ]
    counts = {"loads": 0, "sampler": [], "policy": 0, "reference": 0}
    load, sample = common.load_llava, grpo_stage.SharedPrefixSampler.generate
    policy_forward, ref_logps = grpo_stage.PolicyLogps.forward, rollout_module.completion_logps
    update = grpo_stage.Progress.update

    def counting_load(*args, **kwargs):
        counts["loads"] += 1
        return load(*args, **kwargs)

    def counting_sample(self, *args, **kwargs):
        counts["sampler"].append(args[3].return_logps)
        return sample(self, *args, **kwargs)

    def counting_forward(self, **kwargs):
        counts["policy"] += 1
        return policy_forward(self, **kwargs)

    def counting_ref(*args, **kwargs):
        counts["reference"] += 1
        return ref_logps(*args, **kwargs)

    def crashing_update(self, step, row):
        update(self, step, row)
        if step + 1 == crash_at_step:
            raise KeyboardInterrupt(f"simulated kill after step {step + 1}")

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(common, "load_llava", counting_load)
        mp.setattr(grpo_stage.SharedPrefixSampler, "generate", counting_sample)
        mp.setattr(grpo_stage.PolicyLogps, "forward", counting_forward)
        mp.setattr(rollout_module, "completion_logps", counting_ref)
        mp.setattr(grpo_stage.Progress, "update", crashing_update)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        if crash_at_step is None:
            assert main(argv) == 0, stdout.getvalue()[-3000:]
        else:
            with pytest.raises(KeyboardInterrupt):
                main(argv)
    return Run(
        out, stdout.getvalue(), counts["loads"], counts["sampler"], counts["policy"], counts["reference"]
    )


# ---------------------------------------------------------------- 1 + 2: a learning run through the CLI

LEARN_STEPS = 16


@pytest.fixture(scope="module")
def learned(work: Path) -> Run:
    """16 steps x 2 questions x G=8, vowel_share + format + recorder rewards, lr 1e-2 (a tiny model moves fast)."""
    return grpo(
        work,
        work / "learned",
        f"grpo.reward_funcs=[{VOWELS}, format, {RECORDER}]",
        "grpo.num_generations=8",
        "grpo.max_completion_length=16",
        f"run.max_steps={LEARN_STEPS}",
        "run.epochs=2",
        "optim.lr=1e-2",
        "optim.schedule=constant",
        env={"GRPO_REWARD_RECORD": str(work / "recorded.jsonl")},
    )


@pytest.mark.slow
def test_reward_rises_over_the_run(learned: Run) -> None:
    rewards = [row["reward/vowel_share"] for row in learned.metrics()]
    assert len(rewards) == LEARN_STEPS
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.02, f"vowel_share reward did not rise: {[round(r, 3) for r in rewards]}"
    assert all(row["frac_reward_zero_std"] < 1 for row in learned.metrics()), "no learning signal at all"


@pytest.mark.slow
def test_every_step_logs_the_required_metrics(learned: Run) -> None:
    for row in learned.metrics():
        missing = STEP_KEYS - set(row)
        assert not missing, f"step {row['step']} lacks {sorted(missing)}"
        for name in ("vowel_share", "format", "recorder"):
            assert {f"reward/{name}", f"reward_std/{name}", f"reward_errors/{name}"} <= set(row)
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["ratio"] == pytest.approx(1.0), "num_iterations 1: the ratio is exactly 1"
        assert row["loss"] == pytest.approx(row["loss/policy"] + row["loss/kl"], abs=1e-6)
        assert 0 < row["completion_length"] <= row["completion_length_max"] <= 16
        assert row["completion_tokens"] == pytest.approx(row["completion_length"] * 2 * 8)
    rows = learned.metrics()
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0, "KL starts at 0 (policy = reference), then grows"
    assert [row["step"] for row in rows] == list(range(1, LEARN_STEPS + 1))


@pytest.mark.slow
def test_trainable_weights_change_and_the_frozen_tower_does_not(work: Path, learned: Run) -> None:
    before = load_file(work / "base" / "model.safetensors")
    after = load_file(learned.out / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in before if k.startswith("vision_tower.")}
    assert vision and not changed & vision, f"frozen tower changed: {sorted(changed & vision)[:3]}"
    assert {k for k in before if k.startswith("multi_modal_projector.")} <= changed
    assert any(k.startswith("language_model.") for k in changed)


@pytest.mark.slow
def test_output_folder_loads_in_transformers_and_runs(work: Path, learned: Run) -> None:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(learned.out / "model")
    processor = AutoProcessor.from_pretrained(learned.out / "model")
    image = Image.open(next((work / "synth" / "train" / "images").iterdir()))
    inputs = processor(text="<image>How many objects?", images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    summary = json.loads((learned.out / "summary.json").read_text())
    assert summary["steps"] == LEARN_STEPS and summary["world_size"] == 1
    assert {"reward.png", "loss.png", "kl.png"} <= {p.name for p in (learned.out / "plots").iterdir()}


@pytest.mark.slow
def test_completions_file_holds_texts_and_their_rewards(learned: Run) -> None:
    records = learned.completions()
    assert len(records) == LEARN_STEPS * 4  # log_completions: 4 per step
    assert [r["step"] for r in records] == [s for s in range(1, LEARN_STEPS + 1) for _ in range(4)]
    for r in records:
        assert set(r["rewards"]) == {"vowel_share", "format", "recorder"}
        assert r["rewards"]["vowel_share"] == pytest.approx(
            grpo_stage.load_reward(VOWELS)([r["completion"]])[0]
        ), "the logged reward belongs to the logged text"
        assert r["gold"] is not None and r["origin"].endswith(tuple("0123456789"))


@pytest.mark.slow
def test_rewards_see_the_prefilled_think_tag(work: Path, learned: Run) -> None:
    recorded = jsonl(work / "recorded.jsonl")
    assert len(recorded) == LEARN_STEPS * 2 * 8
    assert all(r["completion"].startswith("<think>\n") for r in recorded), "R1 template prefills <think>\\n"
    assert not any(r["completion"].startswith("<think>\n<think>") for r in recorded)
    golds = {row["solution"] for row in jsonl(work / "synth/train/rl.jsonl")}
    assert {r["solution"] for r in recorded} <= golds
    logged = {r["completion"] for r in learned.completions()}
    assert logged <= {r["completion"] for r in recorded}, "completions.jsonl shows what the rewards scored"


# ---------------------------------------------------------------- 3: the reference model


@pytest.mark.slow
def test_beta_0_loads_no_reference_model(work: Path, learned: Run) -> None:
    run = grpo(work, work / "beta0", "grpo.beta=0", "run.max_steps=1", "grpo.max_completion_length=8")
    assert (run.loads, learned.loads) == (1, 2), "beta 0: policy only; beta > 0: policy + frozen copy"
    assert "reference model: none (beta 0)" in run.stdout
    assert "reference model: frozen copy" in learned.stdout
    assert (run.reference_forwards, learned.reference_forwards) == (0, LEARN_STEPS)
    row = run.metrics()[0]
    assert "kl" not in row and row["loss/kl"] == 0.0


@pytest.mark.slow
def test_lora_reference_is_the_same_model_with_adapters_disabled(work: Path, learned: Run) -> None:
    # model= a stage's output folder (its model/ is used): the LoRA run continues the learned run
    run = grpo(
        work,
        work / "lora",
        f"model={learned.out}",
        "run.max_steps=3",
        "grpo.max_completion_length=8",
        f"grpo.reward_funcs=[{VOWELS}]",
        recipe="grpo_lora.yaml",
    )
    assert run.loads == 1 and "reference model: adapters disabled" in run.stdout
    rows = run.metrics()
    # adapters start at 0, then move away from the base; step 1's KL is 0 up to float32 rounding (-1.9e-9 with
    # peft 0.21 and transformers 5.24), the last one is far above that
    assert abs(rows[0]["kl"]) < 1e-7 and rows[-1]["kl"] > 1e-6, [r["kl"] for r in rows]
    assert (run.out / "adapter" / "adapter_config.json").is_file()
    merged = load_file(run.out / "model" / "model.safetensors")
    assert not any("lora" in k for k in merged), "model/ holds plain Llava weights with LoRA merged"


def _rollout_batch(work: Path, model) -> rollout_module.RolloutBatch:
    """2 questions with their images, 3 sampled completions each, from ``model``."""
    _, processor = load_llava(work / "base")
    images = sorted((work / "synth" / "train" / "images").iterdir())[:2]
    from PIL import Image

    pixels = processor.image_processor(images=[Image.open(p) for p in images], return_tensors="pt")
    ids = [
        processor(text=f"<image>{q}", images=[Image.open(p)])["input_ids"][0]
        for q, p in zip(["How many?", "Which colour is the big one?"], images, strict=True)
    ]
    rollout = generate(
        model,
        ids,
        pixels["pixel_values"],
        [1, 1],
        SamplingSettings(
            num_generations=3,
            max_new_tokens=6,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_token_ids=[processor.tokenizer.eos_token_id],
            pad_token_id=processor.tokenizer.pad_token_id,
        ),
        torch.Generator().manual_seed(0),
    )
    batch = rollout_module.RolloutBatch([None, None], ids, pixels["pixel_values"], [1, 1], [[], []], rollout)
    batch.mask = rollout.completion_mask
    return batch


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_lora_reference_logps_equal_the_base_models(work: Path, shared_prefix: bool) -> None:
    base, _ = load_llava(work / "base")
    policy, _ = load_llava(work / "base")
    policy = apply_lora(policy, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B = 0 at init would make adapters-on equal adapters-off
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    b = _rollout_batch(work, base)
    batch = Completions(b.prompt_ids, b.pixels, b.images_per_prompt, b.rollout.completion_ids, b.mask, 3)
    kwargs = dict(temperature=1.0, shared_prefix=shared_prefix)
    with torch.no_grad():
        expected = completion_logps(base, batch, **kwargs)
        adapted = completion_logps(policy.get_base_model(), batch, **kwargs)
    reference = rollout_module.reference_logps(None, policy, b, 1.0, shared_prefix)
    m = b.mask.bool()
    assert torch.allclose(reference[m], expected[m], atol=1e-5)
    assert (adapted[m] - expected[m]).abs().max() > 1e-3, (
        "the adapters must matter for this check to mean much"
    )
    assert torch.equal(rollout_module.reference_logps(base, policy, b, 1.0, shared_prefix)[m], expected[m])
    with pytest.raises(ValueError, match="LoRA"):
        rollout_module.reference_logps(None, base, b, 1.0, shared_prefix)


# ---------------------------------------------------------------- 4: num_iterations, loss types


@pytest.mark.slow
def test_two_iterations_reuse_the_sampled_logps_as_old_logps(work: Path, learned: Run) -> None:
    run = grpo(
        work,
        work / "mu2",
        "grpo.num_iterations=2",
        "run.max_steps=4",
        "grpo.max_completion_length=12",
        f"grpo.reward_funcs=[{VOWELS}]",
        "optim.lr=1e-2",
        "optim.schedule=constant",
    )
    # 2 rounds: one sampler call each (returning log-probs), one reference pass each, 2 training forwards each
    assert run.sampler_logps == [True, True]
    assert (run.reference_forwards, run.policy_forwards) == (2, 4)
    assert learned.sampler_logps == [False] * LEARN_STEPS, "num_iterations 1: no old log-probs at all"
    assert learned.policy_forwards == LEARN_STEPS
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for first, second in (rows[0], rows[1]), (rows[2], rows[3]):
        # first iteration: the sampler's log-probs are the current policy's, so pi/pi_old = 1
        assert first["ratio"] == pytest.approx(1.0, abs=1e-4)
        assert abs(second["ratio"] - 1.0) > 1e-4, "after an update the same completions have a new ratio"
        assert second["reward"] == first["reward"], "both iterations train on the same completions"
        assert second["time/rollout_s"] == first["time/rollout_s"], "one rollout phase per round"
    assert rows[2]["reward"] != rows[0]["reward"], "a new round samples new completions"
    assert max(r["clip_ratio/region"] for r in rows) > 0, "lr 1e-2 moves the ratio outside 1 +- 0.2"


LOSS_CASES = [
    ("grpo", "group", "grpo.beta=0.04"),
    ("bnpo", "batch", "grpo.beta=0"),
    ("dr_grpo", "none", "grpo.beta=0.04"),
    ("dapo", "group", "grpo.beta=0"),
    ("dapo", "batch", "grpo.epsilon_high=0.28"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "scale", "extra"), LOSS_CASES)
def test_smoke_every_loss_type_and_reward_scaling_runs(
    work: Path, loss_type: str, scale: str, extra: str
) -> None:
    """Smoke test: each combination runs a step through the CLI and logs a finite loss and a gradient. It cannot
    tell loss types or reward scalings apart; tests/test_grpo_wiring.py pins their numbers."""
    run = grpo(
        work,
        work / f"loss_{loss_type}_{scale}",
        f"grpo.loss_type={loss_type}",
        f"grpo.scale_rewards={scale}",
        extra,
        "grpo.num_generations=4",
        "grpo.max_completion_length=8",
        "run.max_steps=1",
        f"grpo.reward_funcs=[{VOWELS}]",
    )
    (row,) = run.metrics()
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert row["frac_reward_zero_std"] < 1


@pytest.mark.slow
def test_masking_truncated_completions_leaves_nothing_to_learn(work: Path) -> None:
    # 4 new tokens from a random 1025-token model: every completion is cut off before its end-of-turn token
    run = grpo(
        work,
        work / "dapo",
        "grpo.max_completion_length=4",
        "run.max_steps=1",
        f"grpo.reward_funcs=[{VOWELS}]",
        recipe="grpo_dapo.yaml",
    )
    (row,) = run.metrics()
    assert row["truncated_share"] == 1.0
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0
    assert run.loads == 1, "grpo_dapo.yaml has beta 0"


# ---------------------------------------------------------------- 5: resume


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_after_a_kill_repeats_the_uninterrupted_run(work: Path, iterations: int) -> None:
    common = (
        "run.max_steps=4",
        "run.save_every=2",
        f"grpo.num_iterations={iterations}",
        "grpo.num_generations=4",
        "grpo.max_completion_length=8",
        f"grpo.reward_funcs=[{VOWELS}]",
        "optim.lr=1e-2",
    )
    whole = grpo(work, work / f"whole{iterations}", *common)
    grpo(work, work / f"killed{iterations}", *common, crash_at_step=3)
    assert [r["step"] for r in jsonl(work / f"killed{iterations}" / "metrics.jsonl")] == [1, 2, 3]
    resumed = grpo(work, work / f"killed{iterations}", *common, resume=True)
    assert "resumed from" in resumed.stdout and "step-0000002" in resumed.stdout
    assert [r["step"] for r in resumed.metrics()] == [1, 2, 3, 4], "the killed run's step 3 is logged once"
    for a, b in zip(whole.metrics(), resumed.metrics(), strict=True):
        keep = {k for k in a if k not in TIMING_KEYS and not k.startswith("time/")}
        assert {k: a[k] for k in keep} == pytest.approx({k: b[k] for k in keep}, rel=1e-5, abs=1e-7), a[
            "step"
        ]
    assert sorted({r["step"] for r in resumed.completions()}) == sorted(
        {r["step"] for r in whole.completions()}
    )
    assert len(resumed.completions()) == len(whole.completions())
    w = load_file(whole.out / "model" / "model.safetensors")
    r = load_file(resumed.out / "model" / "model.safetensors")
    assert all(torch.allclose(w[k], r[k], atol=1e-6) for k in w)


def test_fresh_run_into_old_checkpoints_is_refused(work: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-0000002" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / "state" / "engine.json").write_text("{}")
    argv = ["grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={work / 'base'}", f"output_dir={tmp_path}"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 2
    assert "--resume" in err.getvalue()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grpo.num_generations=1", "num_generations"),
        ("grpo.reward_weights=[1.0]", "reward_weights"),
        ("grpo.reward_funcs=[format, format]", "reward_funcs"),
        ("grpo.top_p=0", "top_p"),
    ],
)
def test_recipe_mistakes_name_the_key(work: Path, override: str, key: str) -> None:
    argv = ["grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={work / 'base'}", override]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 2
    assert key in err.getvalue()


NAN = float("nan")


@pytest.mark.parametrize(
    ("rewards", "g", "expected"),
    [
        ([1, 0, 1, 0, 2, 2, 2, 2], 4, [0.57735, 0.0]),
        ([1, NAN, 3, 5, 5, 5], 3, [1.41421, 0.0]),  # an unscorable completion is left out of its group
        ([NAN, NAN, 7, NAN], 2, [0.0, 0.0]),  # fewer than 2 values: no spread
    ],
)
def test_reward_std_is_the_mean_spread_within_groups(rewards: list, g: int, expected: list) -> None:
    got = rollout_module.group_std(torch.tensor(rewards, dtype=torch.float32), g)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_metric_names_are_the_function_names() -> None:
    assert rollout_module.reward_names(["accuracy", "pkg.mod:fn", "a.py:g"]) == ["accuracy", "fn", "g"]
    assert rollout_module.reward_names(["a.py:fn", "b.py:fn"]) == ["a.py:fn", "b.py:fn"]


# ---------------------------------------------------------------- 6: 2 processes

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ZERO2 = ["run.strategy=zero2", f"run.deepspeed_config={ROOT / 'recipes/deepspeed/zero2.json'}"]
STRATEGIES = {  # name: (strategy, overrides); zero3 runs come from recipes/tiny/grpo_zero3.yaml
    "ddp": ("ddp", []),
    "zero2": ("zero2", ZERO2),
    "zero3": ("zero3", []),
    "zero3_lora": ("zero3", ["lora.r=4", "lora.dropout=0.1"]),  # reference = the sharded model, adapters off
    # every step one rank draws the text-only question and the other the image question
    "ddp_mixed": ("ddp", ["data.sources.0.path={work}/synth/train/mixed.jsonl", "run.epochs=2"]),
    "zero3_mixed": ("zero3", ["data.sources.0.path={work}/synth/train/mixed.jsonl", "run.epochs=2"]),
    # the real recipes' setting: checkpointed layers with the shared-prefix training forward
    "zero3_mixed_checkpointed": (
        "zero3",
        [
            "data.sources.0.path={work}/synth/train/mixed.jsonl",
            "run.epochs=2",
            "run.gradient_checkpointing=true",
        ],
    ),
}
DIST_STEPS = 2


def torchrun(work: Path, name: str) -> tuple[Path, str]:
    strategy, overrides = STRATEGIES[name]
    out = work / f"dist_{name}"
    recipe = ROOT / "recipes/tiny" / ("grpo_zero3.yaml" if strategy == "zero3" else "grpo.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "align.cli", "grpo", str(recipe), f"model={work / 'base'}", f"output_dir={out}"]
    cmd += [
        f"data.sources.0.path={work / 'synth/train/rl.jsonl'}",
        "run.micro_batch_size=1",
        "run.save_every=1",
    ]
    cmd += [f"run.max_steps={DIST_STEPS}", "grpo.max_completion_length=8", "run.tensorboard=false"]
    cmd += [f"grpo.reward_funcs=[{VOWELS}, format]", "optim.lr=1e-2"]
    if strategy == "zero3" and not name.endswith("lora"):  # the LoRA run keeps the shipped zero3.json
        cmd += [f"run.deepspeed_config={work / 'zero3_partitioned.json'}"]
    cmd += [o.format(work=work) for o in overrides]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
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
        pytest.fail(f"{name}: 2-process GRPO timed out (a hang?):\n{output[-4000:]}")
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}:\n{output[-4000:]}"
    return out, output


def _distributed_inputs(work: Path) -> None:
    """A ZeRO-3 config that partitions even the tiny model's tensors, and a text-only + image question file."""
    zero3 = json.loads((ROOT / "recipes/deepspeed/zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (work / "zero3_partitioned.json").write_text(json.dumps(zero3))
    image_row = (work / "synth/train/rl.jsonl").read_text().splitlines()[0]
    text_row = json.dumps({"id": "text-0", "problem": "What is 2 + 3?", "solution": "5"})
    (work / "synth/train/mixed.jsonl").write_text(f"{image_row}\n{text_row}\n")  # beside the images


@pytest.fixture(scope="module")
def dist_runs(work: Path) -> dict[str, tuple[Path, str]]:
    _distributed_inputs(work)
    return {name: torchrun(work, name) for name in STRATEGIES}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_process_run_completes(work: Path, dist_runs: dict[str, tuple[Path, str]], name: str) -> None:
    (out, output), strategy = dist_runs[name], STRATEGIES[name][0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["steps"]) == (2, strategy, DIST_STEPS)
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, DIST_STEPS + 1))
    assert all(r["completion_tokens"] == pytest.approx(r["completion_length"] * 2 * 4) for r in rows)
    held = re.search(r"reference model: this rank holds ([\d,]+) of its ([\d,]+) parameters", output)
    if name.endswith("lora"):
        assert held is None  # the policy itself, adapters disabled: no second model
    else:  # ZeRO-3 partitions the frozen reference across the 2 ranks instead of a full copy on each
        held, total = (int(x.replace(",", "")) for x in held.groups())
        assert (held <= total // 2 + 1000) if strategy == "zero3" else (held == total), (held, total)
    assert (out / "checkpoints" / "step-0000001" / "state" / "engine.json").is_file()
    before = load_file(work / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys() and all(after[k].shape == before[k].shape for k in before)
    assert not torch.equal(
        before["multi_modal_projector.linear_1.weight"], after["multi_modal_projector.linear_1.weight"]
    )
    vision = [k for k in before if k.startswith("vision_tower.")]
    assert all(torch.equal(before[k], after[k]) for k in vision)
    if name.endswith("lora"):
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.numel() > 0 for v in adapter.values()), "ZeRO-3 partitions saved, not weights"
        assert any(v.abs().sum() > 0 for v in lora_b), "the adapters trained"


@pytest.mark.distributed
def test_strategies_agree_step_by_step(dist_runs: dict[str, tuple[Path, str]]) -> None:
    """Same weights, same per-rank sampling seeds: DDP, ZeRO-2 and ZeRO-3 see the same rollouts and losses,
    also when one rank's question has no image (the tower runs on a blank there, adding exactly 0), and with
    ZeRO-3 training checkpointed layers (the shared prefix then runs each layer as one checkpointed pair)."""
    runs = {name: jsonl(out / "metrics.jsonl") for name, (out, _) in dist_runs.items()}
    keys = ("reward", "completion_length", "loss", "kl", "grad_norm")
    pairs = [
        ("ddp", "zero2"),
        ("ddp", "zero3"),
        ("ddp_mixed", "zero3_mixed"),
        ("ddp_mixed", "zero3_mixed_checkpointed"),
    ]
    for ddp, other in pairs:
        for a, b in zip(runs[ddp], runs[other], strict=True):
            assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-4, abs=1e-6), (
                other,
                a["step"],
            )
