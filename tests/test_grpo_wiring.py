"""The GRPO stage's wiring: every recipe option that changes a number reaches that number.

``tests/test_grpo_loss.py`` pins the pure functions (advantages, loss, TRL parity). This module pins the way
``align grpo`` feeds them: a few 2-3 step runs through ``align.cli.main`` on the tiny zoo, each with options off
their defaults, whose logged metrics (metrics.jsonl) and observed inputs are compared with numbers this module
computes on its own:

* rewards are deterministic functions of the completion (``tests/dist_scripts/wiring_rewards.py``), recorded
  as the stage scored them; the per-function scores, their weighted sum (``reward_weights``), the group or
  batch normalisation (``scale_rewards``) and the reward metrics are computed here by hand;
* log-probs and entropies of the sampled completions come from a plain transformers forward of the input
  model at the recipe's ``temperature`` (the policy before its first update, and the frozen reference);
* the loss, KL, ratio and clip metrics are :func:`align.grpo.loss.grpo_loss` on those inputs with the
  recipe's ``loss_type``, ``beta``, ``epsilon``/``epsilon_high``, ``importance_sampling_level``, truncation
  masking and accumulation, and every test also shows that a neighbouring option value gives another number
  (so a stage that dropped the option could not pass);
* the learning rate of every step is :func:`align.stages.common.lr_at` of the recipe's schedule;
* the optimiser: one run's two steps are replayed here (plain forward with gradients, the loss over
  ``grad_accum``, ``max_grad_norm`` clipping, ``torch.optim.AdamW`` with ``lr``/``projector_lr``, ``betas`` and
  ``weight_decay``) and its logged grad norms and saved weights compared with the replay's;
* sampling: ``top_k``/``top_p`` that leave one token give the greedy decode of the input model;
  ``shared_prefix: false`` scores the same log-probs as the plain forward.

The input model is the shared tiny SigLIP + Qwen2 Llava with one change: its generation config names every 8th
token id an end-of-turn token, so about a third of the 8-token completions are cut off and the rest end early
(the loss types only differ on completions of different lengths).

Observed, by wrapping and then calling the originals (the names a refactor keeps): ``grpo_loss``,
``SharedPrefixSampler.generate`` and ``PolicyLogps.forward`` as looked up on ``align.stages.grpo``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import align.stages.grpo as grpo_stage
from align.checkpoint import canonical_key
from align.cli import main
from align.grpo.loss import grpo_loss
from align.stages.common import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
WIRING = SCRIPTS / "wiring_rewards.py"
VOWELS, EVEN, GATE, FLAKY, RECORD = (
    f"{WIRING}:{name}" for name in ("vowels", "even_ids", "gate", "flaky", "record")
)
GATED = f"{SCRIPTS / 'grpo_variant_rewards.py'}:gated_vowels"
G = 4
MAX_LEN = 8
STD_EPS = 1e-4  # TRL's: a zero-variance group divides 0 by 1e-4


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REWARDS = _module(WIRING)


@dataclass(frozen=True)
class Case:
    """One run's options, written into the recipe as overrides and read back by the expectations."""

    reward_funcs: tuple[str, ...] = (VOWELS, EVEN, RECORD)
    reward_weights: tuple[float, ...] | None = None
    soft_punish_cache: int | None = None  # reward_params of soft_overlong
    scale_rewards: str = "group"
    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    num_iterations: int = 1
    importance_sampling_level: str = "token"
    mask_truncated: bool = False
    dynamic: bool = False
    steps: int = 2
    micro: int = 2  # questions per micro-batch
    accum: int = 1
    lr: float = 1e-3
    projector_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    shared_prefix: bool = True

    def overrides(self) -> list[str]:
        out = [
            f"optim.projector_lr={self.projector_lr}",
            f"optim.betas=[{self.betas[0]}, {self.betas[1]}]",
            f"optim.weight_decay={self.weight_decay}",
            f"optim.max_grad_norm={self.max_grad_norm}",
            f"grpo.shared_prefix={str(self.shared_prefix).lower()}",
            f"grpo.reward_funcs=[{', '.join(self.reward_funcs)}]",
            f"grpo.num_generations={G}",
            f"grpo.max_completion_length={MAX_LEN}",
            f"grpo.scale_rewards={self.scale_rewards}",
            f"grpo.loss_type={self.loss_type}",
            f"grpo.beta={self.beta}",
            f"grpo.epsilon={self.epsilon}",
            f"grpo.temperature={self.temperature}",
            f"grpo.top_p={self.top_p}",
            f"grpo.num_iterations={self.num_iterations}",
            f"grpo.importance_sampling_level={self.importance_sampling_level}",
            f"grpo.mask_truncated_completions={str(self.mask_truncated).lower()}",
            f"run.max_steps={self.steps}",
            f"run.micro_batch_size={self.micro}",
            f"run.grad_accum={self.accum}",
            "run.epochs=4",
            f"optim.lr={self.lr}",
            f"optim.schedule={self.schedule}",
            f"optim.warmup_ratio={self.warmup_ratio}",
        ]
        if self.reward_weights is not None:
            out.append(f"grpo.reward_weights=[{', '.join(map(str, self.reward_weights))}]")
        if self.soft_punish_cache is not None:
            out.append(
                f"grpo.reward_params={{soft_overlong: {{soft_punish_cache: {self.soft_punish_cache}}}}}"
            )
        if self.epsilon_high is not None:
            out.append(f"grpo.epsilon_high={self.epsilon_high}")
        if self.top_k is not None:
            out.append(f"grpo.top_k={self.top_k}")
        if self.dynamic:
            out += ["grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_rounds=3"]
        return out

    @property
    def weights(self) -> tuple[float, ...]:
        return self.reward_weights or (1.0,) * len(self.reward_funcs)


# ------------------------------------------------------------------------------------------- runs and traces


@pytest.fixture(scope="module")
def work(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic questions and a copy of the shared tiny Llava whose every 8th token id ends a turn."""
    root = tmp_path_factory.mktemp("grpo_wiring")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root / "synth"), "--train", "16", "--test", "2"]) == 0
    base = shutil.copytree(siglip_qwen2, root / "base")
    generation = json.loads((base / "generation_config.json").read_text())
    generation["eos_token_id"] = [*range(3, 1000, 8), generation["eos_token_id"]]
    (base / "generation_config.json").write_text(json.dumps(generation))
    return root


@dataclass
class Trace:
    """What one run logged and what its stage handed to the wrapped functions, in call order."""

    case: Case
    out: Path
    sampler: list[dict] = field(default_factory=list)  # per call: its arguments, settings and the Rollout
    losses: list[dict] = field(default_factory=list)  # per grpo_loss call: its arguments and results
    forwards: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (logps, entropy)
    records: list[dict] = field(default_factory=list)  # per reward call: completions and completion_ids

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]


def _arguments(fn, *args, **kwargs) -> dict:
    """``fn``'s arguments by name (a ``**kwargs`` catch-all flattened in), defaults applied."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    out = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _setting(arguments: dict, name: str):
    """A sampling setting passed as a keyword, or as an attribute of a ``sampling`` settings object."""
    if name in arguments:
        return arguments[name]
    return getattr(arguments["sampling"], name)


def _detached(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def run_grpo(work: Path, name: str, case: Case) -> Trace:
    out = work / name
    trace = Trace(case, out)
    record = work / f"{name}.record.jsonl"
    argv = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={work / 'base'}",
        f"output_dir={out}",
        f"data.sources.0.path={work / 'synth/train/rl.jsonl'}",
        "run.tensorboard=false",
        *case.overrides(),
    ]
    loss_fn, sample, forward = (
        grpo_stage.grpo_loss,
        grpo_stage.SharedPrefixSampler.generate,
        grpo_stage.PolicyLogps.forward,
    )

    def observed_loss(*args, **kwargs):
        loss, parts = loss_fn(*args, **kwargs)
        arguments = {k: _detached(v) for k, v in _arguments(grpo_loss, *args, **kwargs).items()}
        trace.losses.append({**arguments, "result": float(loss.detach()), "parts": parts})
        return loss, parts

    def observed_sample(self, *args, **kwargs):
        rollout = sample(self, *args, **kwargs)
        arguments = _arguments(sample, self, *args, **kwargs)
        settings = {k: _setting(arguments, k) for k in ("temperature", "top_k", "top_p")}
        trace.sampler.append(
            {
                "prompt_ids": [list(map(int, ids)) for ids in arguments["prompt_ids"]],
                "pixel_values": _detached(arguments["pixel_values"]),
                "images_per_prompt": list(arguments["images_per_prompt"]),
                **settings,
                "completion_ids": rollout.completion_ids.clone(),
                "completion_mask": rollout.completion_mask.clone(),
                "lengths": rollout.lengths.clone(),
                "is_truncated": rollout.is_truncated.clone(),
                "logps": _detached(rollout.logps),
            }
        )
        return rollout

    def observed_forward(self, *args, **kwargs):
        logps, entropy = forward(self, *args, **kwargs)
        trace.forwards.append((logps.detach().clone(), entropy.detach().clone()))
        return logps, entropy

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setattr(grpo_stage, "grpo_loss", observed_loss)
        mp.setattr(grpo_stage.SharedPrefixSampler, "generate", observed_sample)
        mp.setattr(grpo_stage.PolicyLogps, "forward", observed_forward)
        mp.setenv("WIRING_RECORD", str(record))
        mp.setenv("GRPO_VARIANT_RECORD", str(record))
        assert main(argv) == 0, stdout.getvalue()[-3000:]
    trace.records = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return trace


# The runs, each 2-3 steps of 2 questions x G=4 completions of at most 8 tokens (about a second each).
CASES = {
    # weighted rewards (one abstaining now and then), group scaling, KL at beta 0.1, temperature 0.7,
    # 2 accumulation micro-batches of one question each; optimiser options off their defaults (replayed)
    "weighted": Case(
        reward_funcs=(VOWELS, EVEN, GATE, RECORD),
        reward_weights=(2.0, -0.5, 1.5, 3.0),
        beta=0.1,
        temperature=0.7,
        micro=1,
        accum=2,
        projector_lr=4e-3,
        betas=(0.7, 0.9),
        weight_decay=0.1,
        max_grad_norm=0.05,
    ),
    # whole-batch std, token-mean loss per micro-batch (2 of one question: not DAPO's step-wide mean), clip-higher,
    # two iterations (clipping), temperature 1.3, no reference, the training forward without the shared prefix
    "batch": Case(
        scale_rewards="batch",
        loss_type="bnpo",
        beta=0.0,
        epsilon=0.1,
        epsilon_high=0.3,
        temperature=1.3,
        num_iterations=2,
        shared_prefix=False,
        lr=3e-2,
        micro=1,
        accum=2,
    ),
    # unscaled advantages, Dr. GRPO's constant normaliser, truncated completions masked, GSPO's sequence ratio
    # (whose ratios move far in one step: a wide clip range keeps some inside)
    "none": Case(
        scale_rewards="none",
        loss_type="dr_grpo",
        beta=0.04,
        epsilon=0.5,
        mask_truncated=True,
        importance_sampling_level="sequence",
        num_iterations=2,
        lr=5e-3,
    ),
    # DAPO's step-wide token normaliser over 2 accumulation micro-batches, soft overlong punishment, a reward
    # that fails on some completions (reward_errors: skip), 2 warm-up steps then cosine decay
    "dapo": Case(
        reward_funcs=(VOWELS, "soft_overlong", FLAKY, RECORD),
        soft_punish_cache=4,
        loss_type="dapo",
        beta=0.0,
        micro=1,
        accum=2,
        steps=4,
        schedule="cosine",
        warmup_ratio=0.5,
    ),
    # dynamic sampling on a reward that gives count/colour questions zero variance
    "dynamic": Case(reward_funcs=(GATED, RECORD), dynamic=True, beta=0.0, steps=3),
}


@pytest.fixture(scope="module")
def traces(work: Path):
    """Runs on first use, each once per module: ``traces(name) -> Trace``."""
    done: dict[str, Trace] = {}

    def get(name: str) -> Trace:
        if name not in done:
            done[name] = run_grpo(work, name, CASES[name])
        return done[name]

    return get


@pytest.fixture(scope="module")
def reference_model(work: Path):
    """The input model as transformers loads it: the policy before its first update, and the reference."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(work / "base", dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------- independent numbers


def hf_logps(model, call: dict, temperature: float, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of one sampler call's completions, ``[N, W]``, from a plain forward of
    each prompt + completion through ``model`` with the logits divided by ``temperature`` (0 on padding)."""
    ids, mask = call["completion_ids"], call["completion_mask"]
    width = ids.shape[1]
    logps, entropy = [None] * len(call["prompt_ids"]), [None] * len(call["prompt_ids"])
    image_at = 0
    for q, prompt in enumerate(call["prompt_ids"]):
        k = call["images_per_prompt"][q]
        pixels = call["pixel_values"][image_at : image_at + k]
        image_at += k
        rows = slice(q * G, (q + 1) * G)
        inputs = torch.cat([torch.tensor([prompt] * G), ids[rows]], dim=1)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=inputs, pixel_values=pixels.repeat(G, 1, 1, 1)).logits
        scaled = (logits[:, len(prompt) - 1 : len(prompt) - 1 + width].float() / temperature).log_softmax(-1)
        logps[q] = scaled.gather(-1, ids[rows, :, None]).squeeze(-1)
        entropy[q] = -(scaled.exp() * scaled).sum(-1).detach()
    return torch.cat(logps) * mask, torch.cat(entropy) * mask


def soft_overlong_by_hand(n: int, limit: int, cache: int) -> float:
    if n <= limit - cache:
        return 0.0
    return ((limit - cache) - n) / cache if n <= limit else -1.0


def scores_by_hand(case: Case, record: dict) -> list[list[float | None]]:
    """Every reward function's score of every completion of one reward call, ``[completion][function]``."""
    texts, ids = record["completions"], record["completion_ids"]
    columns = []
    for spec in case.reward_funcs:
        if spec == "soft_overlong":
            columns.append([soft_overlong_by_hand(len(i), MAX_LEN, case.soft_punish_cache) for i in ids])
        elif spec == RECORD:
            columns.append([0.0] * len(texts))
        elif spec == FLAKY:  # reward_errors: skip scores the others one by one; the failures get no score
            columns.append([None if not i or i[0] % 5 == 0 else (i[0] % 4) / 4 for i in ids])
        elif spec == GATED:
            columns.append(None)  # the dynamic-sampling test reads its scores from its own record
        else:
            fn = getattr(REWARDS, spec.rpartition(":")[2])
            columns.append(fn(texts, completion_ids=ids))
    return [[c[i] if c is not None else None for c in columns] for i in range(len(texts))]


def combined(row: list[float | None], weights) -> float:
    terms = [w * v for w, v in zip(weights, row, strict=True) if v is not None]
    return sum(terms) if terms else math.nan


def std(values: list[float]) -> float:
    """Bessel-corrected std of the non-NaN values; NaN below 2 of them."""
    kept = [v for v in values if not math.isnan(v)]
    if len(kept) < 2:
        return math.nan
    mean = sum(kept) / len(kept)
    return math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def advantages_by_hand(rewards: list[float], scale: str) -> list[float]:
    """Group-relative advantages of one step's rewards (all micro-batches, question-major)."""
    batch = std(rewards)
    out = []
    for at in range(0, len(rewards), G):
        group = rewards[at : at + G]
        kept = [v for v in group if not math.isnan(v)]
        mean = sum(kept) / len(kept) if kept else math.nan
        for r in group:
            a = r - mean
            if scale == "group":
                a /= std(group) + STD_EPS
            elif scale == "batch":
                a /= batch + STD_EPS
            out.append(0.0 if math.isnan(a) else a)
    return out


@dataclass
class Step:
    """What one optimizer step must have trained on, derived from the recorded rollouts and rewards."""

    calls: list[dict]  # this step's sampler calls (micro-batches)
    scores: list[list[float | None]]  # per completion, per function (all micro-batches)
    rewards: list[float]  # combined
    advantages: list[float]
    masks: list[torch.Tensor]  # per micro-batch: the loss mask


def expected_step(trace: Trace, step: int) -> Step:
    case, m = trace.case, trace.case.accum
    rnd = step // case.num_iterations
    calls = trace.sampler[rnd * m : (rnd + 1) * m]
    records = trace.records[rnd * m : (rnd + 1) * m]
    assert len(calls) == len(records) == m
    scores = []
    for call, record in zip(calls, records, strict=True):
        lengths = call["lengths"].tolist()
        ids = [row[:n] for row, n in zip(call["completion_ids"].tolist(), lengths, strict=True)]
        assert record["completion_ids"] == ids, "the rewards scored the sampled completions"
        scores += scores_by_hand(case, record)
    rewards = [combined(row, case.weights) for row in scores]
    masks = [
        c["completion_mask"] * (~c["is_truncated"]).long()[:, None]
        if case.mask_truncated
        else c["completion_mask"]
        for c in calls
    ]
    return Step(calls, scores, rewards, advantages_by_hand(rewards, case.scale_rewards), masks)


def recomputed(trace: Trace, step: int, ref: list | None = None, **change) -> dict[str, float]:
    """The step's logged loss metrics from :func:`grpo_loss` on the recorded policy log-probs and the expected
    advantages, masks, old log-probs (the sampler's) and reference log-probs, with the recipe's options
    (``change`` swaps some, to show that the logged numbers tell them apart)."""
    case, m = trace.case, trace.case.accum
    exp = expected_step(trace, step)
    options = {
        "beta": case.beta,
        "epsilon": case.epsilon,
        "epsilon_high": case.epsilon_high if case.epsilon_high is not None else case.epsilon,
        "loss_type": case.loss_type,
        "importance_sampling_level": case.importance_sampling_level,
        "max_completion_length": MAX_LEN,
        **change,
    }
    masks = change.pop("masks", None) or exp.masks
    options.pop("masks", None)
    n_items = sum(float(mk.sum()) for mk in masks)
    sums: dict[str, float] = {}
    for i in range(m):
        seen = trace.losses[step * m + i]
        call = exp.calls[i]
        adv = torch.tensor(exp.advantages[i * case.micro * G : (i + 1) * case.micro * G])
        old = call["logps"] if case.num_iterations > 1 else None
        reference = None if options["beta"] == 0 else (ref[i] if ref is not None else seen["ref_logps"])
        if reference is None and options["beta"] != 0:
            raise AssertionError("no reference log-probs to recompute the KL term with")
        loss, parts = grpo_loss(
            seen["logps"],
            old,
            reference,
            adv,
            masks[i],
            num_items_in_batch=n_items,
            num_processes=1,
            accumulation_steps=m,
            **options,
        )
        values = {
            "loss": loss,
            "loss/policy": parts.policy,
            "loss/kl": parts.kl_penalty,
            "kl": parts.kl,
            "ratio": parts.ratio_mean,
            "clip_ratio/low": parts.clip_ratio_low,
            "clip_ratio/high": parts.clip_ratio_high,
            "clip_ratio/region": parts.clip_ratio_region,
        }
        for key, value in values.items():
            if value is not None:
                sums[key] = sums.get(key, 0.0) + float(value) / m
    return sums


def approx(value: float, rel: float = 1e-4, abs_: float = 1e-7):
    return pytest.approx(value, rel=rel, abs=abs_)


def differs(a: float, b: float) -> bool:
    return abs(a - b) > 1e-4 * max(abs(a), abs(b)) + 1e-6


# ------------------------------------------------------------------------------------------------ rewards


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weighted", "dapo"])
def test_reward_metrics_are_the_weighted_scores_of_the_recorded_completions(traces, name: str) -> None:
    """``reward`` is the mean of ``sum_f w_f R_f`` (abstentions and failures skipped), ``reward/<f>`` each
    function's mean, ``reward_errors/<f>`` its failed completions, ``reward_std`` the mean within-group std,
    ``frac_reward_zero_std`` the share of flat groups; the weighted sum is not the plain one, so a stage that
    dropped ``reward_weights`` would log another ``reward``."""
    trace = traces(name)
    case = trace.case
    names = [spec.rpartition(":")[2] for spec in case.reward_funcs]
    for row in trace.metrics():
        exp = expected_step(trace, row["step"] - 1)
        kept = [r for r in exp.rewards if not math.isnan(r)]
        assert row["reward"] == approx(sum(kept) / len(kept))
        for j, fn in enumerate(names):
            values = [s[j] for s in exp.scores if s[j] is not None]
            assert row[f"reward/{fn}"] == approx(sum(values) / len(values) if values else 0.0)
            assert row[f"reward_errors/{fn}"] == (
                sum(s[j] is None for s in exp.scores) if case.reward_funcs[j] == FLAKY else 0
            )
        groups = [exp.rewards[i : i + G] for i in range(0, len(exp.rewards), G)]
        stds = [0.0 if math.isnan(std(g)) else std(g) for g in groups]
        assert row["reward_std"] == approx(sum(stds) / len(stds))
        assert row["frac_reward_zero_std"] == approx(sum(s < 1e-6 for s in stds) / len(stds))
        if case.reward_weights is not None:
            plain = [combined(s, [1.0] * len(names)) for s in exp.scores]
            plain = [r for r in plain if not math.isnan(r)]
            assert differs(row["reward"], sum(plain) / len(plain)), "weights must change the reward here"
    if name == "dapo":
        errors = sum(r["reward_errors/flaky"] for r in trace.metrics())
        assert 0 < errors < 8 * case.steps, "some completions, not all, must fail for this test to mean much"
    if name == "weighted":
        abstained = [
            s for step in range(case.steps) for s in expected_step(trace, step).scores if s[2] is None
        ]
        assert abstained, "the gate reward must abstain somewhere for this test to mean much"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "scale"), [("weighted", "group"), ("batch", "batch"), ("none", "none")])
def test_advantages_are_scaled_as_the_recipe_says(traces, name: str, scale: str) -> None:
    """The advantages handed to the loss are the hand-made group-relative ones of the weighted rewards, divided
    by the group's std, the whole step's std, or nothing; and the three scalings give different advantages."""
    trace = traces(name)
    case = trace.case
    assert case.scale_rewards == scale
    for step in range(case.steps):
        exp = expected_step(trace, step)
        seen = torch.cat([trace.losses[step * case.accum + i]["advantages"] for i in range(case.accum)])
        assert seen.tolist() == pytest.approx(exp.advantages, rel=1e-4, abs=1e-5)
        for other in {"group", "batch", "none"} - {scale}:
            wrong = advantages_by_hand(exp.rewards, other)
            assert max(abs(a - b) for a, b in zip(wrong, exp.advantages, strict=True)) > 1e-3, other


# --------------------------------------------------------------------------------- temperature, reference


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weighted", "batch"])
def test_temperature_reaches_the_sampler_and_the_training_forward(traces, reference_model, name: str) -> None:
    """The sampler gets the recipe's temperature (and its log-probs, the old ones of a second iteration, are
    ``log_softmax(logits / T)``); the training forward of step 1 scores ``logits / T`` as well (log-probs and
    the logged entropy); so does the reference, which makes the first step's KL exactly 0."""
    trace = traces(name)
    case = trace.case
    assert case.temperature != 1.0
    assert {c["temperature"] for c in trace.sampler} == {case.temperature}
    first = trace.sampler[: case.accum]  # step 1: the policy is still the input model
    entropies = []
    for i, call in enumerate(first):
        mask = call["completion_mask"].bool()
        logps, entropy = hf_logps(reference_model, call, case.temperature)
        at_one, _ = hf_logps(reference_model, call, 1.0)
        assert (at_one[mask] - logps[mask]).abs().max() > 1e-2, "temperature 1 must give other log-probs"
        trained = trace.losses[i]["logps"]
        assert torch.allclose(trained[mask], logps[mask], atol=2e-5), "training forward at the temperature"
        assert torch.allclose(trace.forwards[i][1][mask], entropy[mask], atol=2e-5)
        if case.num_iterations > 1:
            assert torch.allclose(call["logps"][mask], logps[mask], atol=2e-5), "sampler's log-probs at T"
        entropies.append(float((entropy * mask).sum() / mask.sum()))
    row = trace.metrics()[0]
    assert row["entropy"] == approx(sum(entropies) / len(entropies), rel=1e-4)
    if case.beta > 0:
        assert abs(row["kl"]) < 1e-7 and row["loss/kl"] == approx(0.0, abs_=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weighted", "none"])
def test_kl_term_uses_the_frozen_reference_and_beta(traces, reference_model, name: str) -> None:
    """After an update the KL is the k3 estimate against the *input* model (a plain forward here), aggregated
    like the loss and multiplied by the recipe's ``beta`` (not the default 0.04 where it differs)."""
    trace = traces(name)
    case = trace.case
    last = case.steps - 1
    exp = expected_step(trace, last)
    refs = [hf_logps(reference_model, call, case.temperature)[0] for call in exp.calls]
    for i, ref in enumerate(refs):
        mask = exp.calls[i]["completion_mask"].bool()
        assert torch.allclose(trace.losses[last * case.accum + i]["ref_logps"][mask], ref[mask], atol=2e-5)
    row = trace.metrics()[last]
    want = recomputed(trace, last, ref=refs)
    assert row["kl"] > 1e-6, "the policy must have moved for this test to mean much"
    for key in ("kl", "loss/kl", "loss"):
        assert row[key] == approx(want[key], rel=2e-3, abs_=1e-8), key
    if case.beta != 0.04:
        default = recomputed(trace, last, ref=refs, beta=0.04)
        assert differs(row["loss/kl"], default["loss/kl"])


# ---------------------------------------------------------------------------------- loss types and clipping


LOSS_CASES = [("weighted", "grpo"), ("batch", "bnpo"), ("none", "dr_grpo"), ("dapo", "dapo")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "loss_type"), LOSS_CASES)
def test_every_loss_type_gives_its_own_loss_on_partly_truncated_batches(traces, name, loss_type) -> None:
    """Every logged loss metric is :func:`grpo_loss` of the recipe's options on the observed inputs, and no other
    loss type gives the logged loss (the completions have different lengths: some were cut off)."""
    trace = traces(name)
    case = trace.case
    assert case.loss_type == loss_type
    rows = trace.metrics()
    assert [r["step"] for r in rows] == list(range(1, case.steps + 1))
    assert any(0 < r["truncated_share"] < 1 for r in rows), "a partly truncated batch is the point"
    others = {t: [] for t in ("grpo", "bnpo", "dr_grpo", "dapo") if t != loss_type}
    for step, row in enumerate(rows):
        want = recomputed(trace, step)
        for key, value in want.items():
            assert row[key] == approx(value, rel=1e-4, abs_=1e-7), (step + 1, key)
        for other in others:
            others[other].append(differs(row["loss"], recomputed(trace, step, loss_type=other)["loss"]))
    assert all(any(flags) for flags in others.values()), f"some step must tell {loss_type} apart: {others}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["batch", "none"])
def test_second_iteration_clips_with_epsilon_and_epsilon_high(traces, name: str) -> None:
    """With two iterations the second step's ratio moves; its clip fractions are those of the recipe's
    ``epsilon`` (and ``epsilon_high``), token-wise or per sequence (GSPO), and differ from the defaults'."""
    trace = traces(name)
    case = trace.case
    row = trace.metrics()[1]
    want = recomputed(trace, 1)
    assert row["ratio"] != approx(1.0, abs_=1e-4), "the second iteration sees a moved policy"
    assert row["clip_ratio/region"] > 0, "the update must move some ratios out of the clip range"
    for key in ("ratio", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "loss/policy"):
        assert row[key] == approx(want[key], rel=1e-4, abs_=1e-7), key
    default = recomputed(trace, 1, epsilon=0.2, epsilon_high=0.2)
    assert any(differs(row[k], default[k]) for k in ("clip_ratio/low", "clip_ratio/high")), "eps must matter"
    other_level = "token" if case.importance_sampling_level == "sequence" else "sequence"
    level = recomputed(trace, 1, importance_sampling_level=other_level)
    assert differs(row["ratio"], level["ratio"]) or differs(
        row["clip_ratio/region"], level["clip_ratio/region"]
    )
    # the first iteration's old log-probs are the sampler's: the ratio is 1 (the sampler scored at T too)
    assert trace.metrics()[0]["ratio"] == approx(1.0, abs_=1e-5)


@pytest.mark.slow
def test_truncated_completions_are_masked_out_of_the_loss(traces) -> None:
    """``mask_truncated_completions``: the loss mask drops every row the sampler cut off; the logged loss and
    entropy are over the others, and differ from what the unmasked completions give."""
    trace = traces("none")
    for step, row in enumerate(trace.metrics()):
        exp = expected_step(trace, step)
        for i in range(len(exp.calls)):
            seen = trace.losses[step * trace.case.accum + i]["completion_mask"]
            assert torch.equal(seen.long(), exp.masks[i].long())
        if step == 1:
            plain = recomputed(trace, step, masks=[c["completion_mask"] for c in exp.calls])
            assert differs(row["loss"], plain["loss"])
        mask, entropy = exp.masks[0], trace.forwards[step][1]
        assert row["entropy"] == approx(float((entropy * mask).sum() / mask.sum()), rel=1e-4)
    assert any(0 < r["truncated_share"] < 1 for r in trace.metrics())


@pytest.mark.slow
def test_soft_overlong_scores_each_completion_by_its_token_count(traces) -> None:
    """soft_overlong with ``soft_punish_cache: 4`` and the stage's ``max_completion_length`` 8 as its budget:
    0 up to 4 tokens, then -1/4 per token, -1 for a cut-off completion (EOS counted); completions.jsonl shows
    the same score beside each logged text."""
    trace = traces("dapo")
    for row in trace.metrics():
        calls = expected_step(trace, row["step"] - 1).calls
        lengths = [n for c in calls for n in c["lengths"].tolist()]
        hand = [soft_overlong_by_hand(n, MAX_LEN, 4) for n in lengths]
        assert row["reward/soft_overlong"] == approx(sum(hand) / len(hand))
        assert len(set(hand)) > 1, "lengths must spread over the punished window for this test to mean much"
    logged = [json.loads(line) for line in (trace.out / "completions.jsonl").read_text().splitlines()]
    for record in logged:
        assert record["rewards"]["soft_overlong"] in {0.0, -0.25, -0.5, -0.75, -1.0}


# ------------------------------------------------------------------------------------------- schedules, misc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weighted", "dapo"])
def test_every_step_logs_the_learning_rate_of_the_schedule(traces, name: str) -> None:
    """``lr`` at step s is ``lr_at(s - 1, ...)`` of the recipe's schedule and warm-up: the first warm-up step
    already trains, at lr / warmup_steps (by hand: 1e-3 / 2), then cosine decay."""
    trace = traces(name)
    case = trace.case
    warmup = int(case.warmup_ratio * case.steps)
    rows = trace.metrics()
    want = [lr_at(s, case.steps, case.lr, case.schedule, warmup) for s in range(case.steps)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-9)
    if name == "dapo":  # by hand: warm-up 2 steps of 4, then cosine from 1e-3 over the 2 remaining steps
        assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-9)


@pytest.mark.slow
def test_dynamic_sampling_trains_on_the_groups_with_signal(traces) -> None:
    """Each step's advantages and reward metrics are those of the first ``micro`` question groups whose rewards
    vary, in sampling order (refilled with flat ones only at the round limit), not of the first draw."""
    trace = traces("dynamic")
    gated = _module(SCRIPTS / "grpo_variant_rewards.py")
    calls = [r for r in trace.records if "scores" in r]
    assert len(calls) == len(trace.sampler)
    at = 0
    need = trace.case.micro * trace.case.accum
    for step, row in enumerate(trace.metrics()):
        rounds = int(row["dynamic_sampling/rounds"])
        groups = []
        for call in calls[at : at + rounds]:
            assert call["family"] and len(call["scores"]) % G == 0
            groups += [call["scores"][i : i + G] for i in range(0, len(call["scores"]), G)]
        at += rounds
        varied = [g for g in groups if std(g) > 1e-6]
        flat = [g for g in groups if not std(g) > 1e-6]
        chosen = varied[:need] + flat[: max(0, need - len(varied))]
        rewards = [r for g in chosen for r in g]
        assert row["reward"] == approx(sum(rewards) / len(rewards))
        assert row["dynamic_sampling/dropped_groups"] == len(flat) - max(0, need - len(varied))
        seen = torch.cat(
            [trace.losses[step * trace.case.accum + i]["advantages"] for i in range(trace.case.accum)]
        )
        assert seen.tolist() == pytest.approx(advantages_by_hand(rewards, "group"), rel=1e-4, abs=1e-5)
    assert gated.FLAT_FAMILIES
    assert any(r["dynamic_sampling/rounds"] > 1 for r in trace.metrics()), "some step must have drawn again"


@pytest.mark.slow
def test_optimizer_steps_replay_with_the_recipes_rates_betas_decay_and_clipping(
    traces, reference_model, work: Path
) -> None:
    """Both steps of the weighted run replayed here: a plain forward of the input model with gradients, the loss
    of each accumulation micro-batch over ``grad_accum``, ``clip_grad_norm_(max_grad_norm)``, then
    ``torch.optim.AdamW`` with ``lr`` for the LLM and ``projector_lr`` for the projector, the recipe's betas and
    decay (matrices only): the logged grad norms and the saved weights are the replay's."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    trace = traces("weighted")
    case = trace.case
    model = LlavaForConditionalGeneration.from_pretrained(work / "base", dtype=torch.float32)
    named = {canonical_key(n): p for n, p in model.named_parameters()}
    groups = []
    for prefix, lr in (("multi_modal_projector.", case.projector_lr), ("language_model.", case.lr)):
        for decay in (True, False):
            params = [p for n, p in named.items() if n.startswith(prefix) and (p.ndim >= 2) == decay]
            groups.append({"params": params, "lr": lr, "weight_decay": case.weight_decay if decay else 0.0})
    for n, p in named.items():
        p.requires_grad_(not n.startswith("vision_tower."))
    adam = torch.optim.AdamW(groups, betas=case.betas, eps=1e-8)
    norms = []
    for step in range(case.steps):
        exp = expected_step(trace, step)
        n_items = sum(float(mk.sum()) for mk in exp.masks)
        for i, call in enumerate(exp.calls):
            logps, _ = hf_logps(model, call, case.temperature, grad=True)
            ref = hf_logps(reference_model, call, case.temperature)[0] if case.beta else None
            adv = torch.tensor(exp.advantages[i * case.micro * G : (i + 1) * case.micro * G])
            loss, _ = grpo_loss(
                logps,
                None,
                ref,
                adv,
                exp.masks[i],
                beta=case.beta,
                epsilon=case.epsilon,
                epsilon_high=case.epsilon,
                loss_type=case.loss_type,
                max_completion_length=MAX_LEN,
                num_items_in_batch=n_items,
                accumulation_steps=case.accum,
            )
            (loss / case.accum).backward()
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, case.max_grad_norm)))
        adam.step()
        adam.zero_grad(set_to_none=True)
    assert [r["grad_norm"] for r in trace.metrics()] == pytest.approx(norms, rel=1e-3)
    assert min(norms) > case.max_grad_norm, "clipping must be active for this test to mean much"
    saved = load_file(trace.out / "model" / "model.safetensors")
    assert saved.keys() == named.keys()
    worst = max((float((saved[k] - p.detach()).abs().max()), k) for k, p in named.items())
    assert worst[0] < 0.02 * case.lr, worst
    base = load_file(work / "base" / "model.safetensors")
    moved = {
        prefix: max(float((saved[k] - base[k]).abs().max()) for k in saved if k.startswith(prefix))
        for prefix in ("multi_modal_projector.", "language_model.", "vision_tower.")
    }
    assert moved["vision_tower."] == 0.0
    assert moved["multi_modal_projector."] > 2 * case.lr, "projector_lr, not lr, moved the projector"


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["grpo.top_k=1", "grpo.top_p=0.001"])
def test_top_k_and_top_p_reach_the_sampler(work: Path, reference_model, setting: str) -> None:
    """``top_k: 1`` or a tiny ``top_p`` leaves one token to sample: the G completions of a question are the
    greedy decode of the input model (a plain forward here), and every group has zero variance."""
    key, value = setting.removeprefix("grpo.").split("=")
    case = Case(steps=1, beta=0.0, **{key: int(value) if key == "top_k" else float(value)})
    trace = run_grpo(work, f"sample_{key}", case)
    call = trace.sampler[0]
    assert call[key] == getattr(case, key), "the sampler gets the recipe's setting"
    eos = set(json.loads((work / "base" / "generation_config.json").read_text())["eos_token_id"])
    image_token = reference_model.config.image_token_id
    for q, prompt in enumerate(call["prompt_ids"]):
        ids = list(prompt)
        pixels = call["pixel_values"][q : q + 1]
        greedy = []
        for _ in range(MAX_LEN):
            with torch.no_grad():
                logits = reference_model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
            logits[image_token] = -math.inf
            token = int(logits.argmax())
            greedy.append(token)
            ids.append(token)
            if token in eos:
                break
        for row in range(q * G, (q + 1) * G):
            n = int(call["lengths"][row])
            assert call["completion_ids"][row, :n].tolist() == greedy, (q, row)
    assert trace.metrics()[0]["frac_reward_zero_std"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weighted", "batch", "none", "dapo"])
def test_the_runs_resolved_recipe_holds_the_case(traces, name: str) -> None:
    """The expectations read :class:`Case`; the run's ``recipe.resolved.yaml`` shows the same values reached the
    recipe (a mistyped override would otherwise test a default against itself)."""
    import yaml

    trace = traces(name)
    case = trace.case
    recipe = yaml.safe_load((trace.out / "recipe.resolved.yaml").read_text())
    grpo, optim, run = recipe["grpo"], recipe["optim"], recipe["run"]
    assert grpo["reward_weights"] == (list(case.reward_weights) if case.reward_weights else None)
    assert grpo["num_generations"] == G and grpo["max_completion_length"] == MAX_LEN
    assert grpo["epsilon_high"] == case.epsilon_high
    for key in ("scale_rewards", "loss_type", "beta", "epsilon", "temperature", "top_p", "num_iterations"):
        assert grpo[key] == getattr(case, key), key
    assert grpo["importance_sampling_level"] == case.importance_sampling_level
    assert grpo["mask_truncated_completions"] == case.mask_truncated
    assert grpo["shared_prefix"] == case.shared_prefix
    assert (run["max_steps"], run["micro_batch_size"], run["grad_accum"]) == (
        case.steps,
        case.micro,
        case.accum,
    )
    for key in ("lr", "projector_lr", "weight_decay", "max_grad_norm", "schedule", "warmup_ratio"):
        assert optim[key] == getattr(case, key), key
    assert optim["betas"] == list(case.betas)
