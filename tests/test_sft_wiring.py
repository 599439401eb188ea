"""The SFT and projector stages' wiring: every optimiser option that changes a number reaches the weights.

``tests/test_stages.py`` checks what trains and what is written; here a few 1-4 step runs through
``align.cli.main`` on the tiny zoo are replayed by this module with its own optimiser, so that the logged loss,
grad norm, learning rates and the saved weights are compared with numbers computed independently:

* the replay recomputes each step from the micro-batches the stage formed (observed by wrapping
  ``align.stages.sft.forward_loss_sum``, then calling it on its own copy of the input model): the token
  cross-entropies summed over the *whole step* (all accumulation micro-batches) divided by the step's
  supervised tokens, one backward, ``clip_grad_norm_(max_grad_norm)``, and a plain ``torch.optim.AdamW`` with
  parameter groups made here from the weight names (``lr`` for the LLM, ``projector_lr``, ``vision_lr``;
  ``weight_decay`` on matrices only; the recipe's ``betas``) at the learning rate of
  :func:`align.stages.common.lr_at`;
* gradient accumulation in ONE process: 2 micro-batches of 1 row give the loss, grad norm and weights of 1
  micro-batch of 2 rows; packing the same 2 rows into one gives them too;
* every schedule and warm-up: ``lr`` and ``lr_<component>`` of every step are ``lr_at``'s, whose values are
  also pinned by hand; the first warm-up step really trains at its small rate (Adam's first step moves each
  weight by about its learning rate, so the step-1 checkpoint shows each component's rate).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import align.stages.sft as sft_stage
from align.checkpoint import canonical_key
from align.cli import main
from align.stages.common import lr_at
from align.stages.sft import forward_loss_sum  # the original, for the replay

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="module")
def work(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic rows (8 and 2 long-CoT rows, 8 captions) beside the shared tiny Llava (read only)."""
    root = tmp_path_factory.mktemp("sft_wiring")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root / "synth"), "--train", "8", "--test", "1"]) == 0
    train = root / "synth" / "train"
    rows = train.joinpath("sft.jsonl").read_text().splitlines()
    train.joinpath("sft2.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return root


@dataclass
class Run:
    out: Path
    micro_batches: list[list[dict]] = field(default_factory=list)  # per step: the batches of its micro-steps
    sums: list[list[tuple[float, int]]] = field(default_factory=list)  # per step: (loss sum, tokens) each

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    def weights(self, sub: str = "model") -> dict[str, torch.Tensor]:
        return load_file(self.out / sub / "model.safetensors")


def run_stage(work: Path, name: str, *overrides: str, command: str = "sft", data: str = "sft.jsonl") -> Run:
    """``align sft|projector recipes/tiny/<command>.yaml`` in this process, recording each micro-batch."""
    run = Run(work / name)
    argv = [
        command,
        str(TINY / ("sft.yaml" if command == "sft" else "projector.yaml")),
        f"output_dir={run.out}",
        f"data.sources.0.path={work / 'synth/train' / data}",
        "data.max_length=1024",
        "run.tensorboard=false",
        "run.save_every=0",
        *overrides,
    ]
    original = sft_stage.forward_loss_sum
    steps = {"micro": 0}

    def observed(module, model, batch, *args, **kwargs):
        loss_sum, n = original(module, model, batch, *args, **kwargs)
        if steps["micro"] % steps["accum"] == 0:
            run.micro_batches.append([])
            run.sums.append([])
        steps["micro"] += 1
        run.micro_batches[-1].append(batch)
        run.sums[-1].append((float(loss_sum.detach()), n))
        return loss_sum, n

    accum = [o for o in overrides if o.startswith("run.grad_accum=")]
    steps["accum"] = int(accum[-1].split("=")[1]) if accum else 1
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setattr(sft_stage, "forward_loss_sum", observed)
        assert main(argv) == 0, stdout.getvalue()[-3000:]
    return run


def component(key: str) -> str:
    """The component of a canonical weight name."""
    for comp, prefix in (
        ("vision", "vision_tower."),
        ("projector", "multi_modal_projector."),
        ("llm", "language_model."),
    ):
        if key.startswith(prefix):
            return comp
    raise AssertionError(key)


@dataclass
class Optim:
    """The recipe's optimiser options, as overrides and as the replay reads them."""

    lrs: dict[str, float]  # per trainable component
    steps: int
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def overrides(self) -> list[str]:
        # projector only: projector_lr left out, so that it defaults to lr
        out = [
            f"optim.lr={self.lrs.get('llm', self.lrs['projector'])}",
            f"optim.schedule={self.schedule}",
            f"optim.warmup_ratio={self.warmup_ratio}",
            f"optim.betas=[{self.betas[0]}, {self.betas[1]}]",
            f"optim.weight_decay={self.weight_decay}",
            f"optim.max_grad_norm={self.max_grad_norm}",
            f"run.max_steps={self.steps}",
            f"trainable.vision={str('vision' in self.lrs).lower()}",
            f"trainable.llm={str('llm' in self.lrs).lower()}",
        ]
        if "projector" in self.lrs and "llm" in self.lrs:
            out.append(f"optim.projector_lr={self.lrs['projector']}")
        if "vision" in self.lrs:
            out.append(f"optim.vision_lr={self.lrs['vision']}")
        return out

    def lr(self, comp: str, step: int) -> float:
        return lr_at(step, self.steps, self.lrs[comp], self.schedule, int(self.warmup_ratio * self.steps))


def replay(
    model_dir: Path, run: Run, optim: Optim
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """The run recomputed here: (final weights in canonical names, loss per step, grad norm per step)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.train()
    named = {canonical_key(n): p for n, p in model.named_parameters()}
    for n, p in named.items():
        p.requires_grad_(component(n) in optim.lrs)
    groups = []
    for comp in optim.lrs:
        for decay in (True, False):
            params = [
                p
                for n, p in named.items()
                if component(n) == comp
                and p.requires_grad
                and (p.ndim >= 2 or not optim.weight_decay) == decay
            ]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": 0.0,
                        "weight_decay": optim.weight_decay if decay else 0.0,
                        "c": comp,
                    }
                )
    adam = torch.optim.AdamW(groups, betas=optim.betas, eps=1e-8)
    losses, norms = [], []
    for step, batches in enumerate(run.micro_batches):
        cpu = torch.device("cpu")
        results = [forward_loss_sum(model, model, b, processor, None, 10**8, cpu) for b in batches]
        tokens = sum(n for _, n in results)
        loss = sum(s for s, _ in results) / tokens
        loss.backward()
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)))
        for g in groups:
            g["lr"] = optim.lr(g["c"], step)
        adam.step()
        adam.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {k: p.detach() for k, p in named.items()}, losses, norms


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, worst


# ------------------------------------------------------------------------------ gradient accumulation, packing

ACCUM = Optim(
    lrs={"llm": 5e-4, "projector": 2e-3},
    steps=4,
    schedule="linear",
    warmup_ratio=0.5,  # 2 warm-up steps
    betas=(0.8, 0.95),
    weight_decay=0.05,
    max_grad_norm=0.5,
)


@pytest.fixture(scope="module")
def accumulated(work: Path, siglip_qwen2: Path) -> Run:
    """4 steps of 2 rows as 2 accumulated micro-batches of 1 row, a checkpoint after every step."""
    return run_stage(
        work,
        "accum",
        f"model={siglip_qwen2}",
        "run.micro_batch_size=1",
        "run.grad_accum=2",
        "run.save_every=1",
        "run.keep_last=10",
        *ACCUM.overrides(),
    )


@pytest.fixture(scope="module")
def together(work: Path, siglip_qwen2: Path) -> Run:
    """The same 4 steps as 1 micro-batch of 2 rows."""
    return run_stage(
        work,
        "together",
        f"model={siglip_qwen2}",
        "run.micro_batch_size=2",
        "run.grad_accum=1",
        *ACCUM.overrides(),
    )


@pytest.mark.slow
def test_accumulated_micro_batches_replay_as_one_token_mean_step(
    accumulated: Run, siglip_qwen2: Path
) -> None:
    """Loss, grad norm (before clipping at 0.5) and weights after 4 steps are those of the replay: the step's
    summed token cross-entropy over its supervised tokens, clipped, AdamW with the recipe's betas, decay and
    per-component linear warm-up/decay rates."""
    rows = accumulated.metrics()
    assert [len(b) for b in accumulated.micro_batches] == [2, 2, 2, 2]
    state, losses, norms = replay(siglip_qwen2, accumulated, ACCUM)
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-4)
    assert min(norms) > ACCUM.max_grad_norm, "clipping must be active for this test to mean much"
    for r, sums in zip(rows, accumulated.sums, strict=True):
        assert r["loss"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-6)
        assert r["supervised_tokens"] == sum(n for _, n in sums)
        means = [s / n for s, n in sums]
        assert abs(r["loss"] - sum(means) / len(means)) > 1e-6, "a mean of micro-batch means differs"
    assert_weights_close(accumulated.weights(), state, atol=2e-5)


@pytest.mark.slow
def test_two_accumulated_rows_equal_one_micro_batch_of_two(accumulated: Run, together: Run) -> None:
    """grad_accum 2 x micro 1 == micro 2 x accum 1 in one process: same loss, grad norm and weights."""
    a, b = accumulated.metrics(), together.metrics()
    assert [r["supervised_tokens"] for r in a] == [r["supervised_tokens"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    assert_weights_close(accumulated.weights(), together.weights(), atol=2e-5)


@pytest.mark.slow
def test_first_warm_up_step_moves_each_component_by_its_rate(accumulated: Run, siglip_qwen2: Path) -> None:
    """Adam's first step moves every weight by about its learning rate (|m / sqrt(v)| = 1): the step-1 checkpoint
    shows lr_at(0) = lr / 2 for the LLM and projector_lr / 2 for the projector (2 warm-up steps), not 0 (a
    warm-up starting a step late) nor the full rate; the frozen tower does not move."""
    before = load_file(siglip_qwen2 / "model.safetensors")
    after = load_file(accumulated.out / "checkpoints/step-0000001/model/model.safetensors")
    moved: dict[str, float] = {}
    for k in before:
        comp = component(k)
        moved[comp] = max(moved.get(comp, 0.0), float((after[k] - before[k]).abs().max()))
    assert moved["vision"] == 0.0
    for comp in ("llm", "projector"):
        want = ACCUM.lr(comp, 0)
        assert want == pytest.approx(ACCUM.lrs[comp] / 2)
        assert moved[comp] == pytest.approx(want, rel=0.02), comp
    rows = accumulated.metrics()
    assert rows[0]["lr_projector"] == pytest.approx(1e-3) and rows[0]["lr_llm"] == pytest.approx(2.5e-4)


@pytest.mark.slow
def test_packed_rows_give_the_loss_and_update_of_padded_rows(work: Path, siglip_qwen2: Path) -> None:
    """The same 2 rows packed into one sequence or padded as a micro-batch of 2: same loss, grad norm, weights."""
    common = (f"model={siglip_qwen2}", *Optim(lrs={"llm": 1e-3, "projector": 1e-3}, steps=1).overrides())
    padded = run_stage(
        work, "padded", *common, "run.micro_batch_size=2", "run.grad_accum=1", data="sft2.jsonl"
    )
    packed = run_stage(
        work,
        "packed",
        *common,
        "data.packing=true",
        "run.micro_batch_size=1",
        "run.grad_accum=1",
        data="sft2.jsonl",
    )
    assert packed.micro_batches[0][0]["input_ids"].shape[0] == 1, "one packed row"
    assert padded.micro_batches[0][0]["input_ids"].shape[0] == 2
    (a,), (b,) = padded.metrics(), packed.metrics()
    assert a["supervised_tokens"] == b["supervised_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_weights_close(padded.weights(), packed.weights(), atol=2e-5)


# ------------------------------------------------------------------------------ schedules, per-component rates

# by hand, base 1: 4 steps with 2 warm-up steps (ratio 0.5) or 3 (0.75)
BY_HAND = [
    ("linear", 4, 2, [0.5, 1.0, 1.0, 0.5]),
    ("cosine", 4, 2, [0.5, 1.0, 1.0, 0.5]),
    (
        "cosine",
        5,
        1,
        [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))],
    ),
    ("constant", 4, 3, [1 / 3, 2 / 3, 1.0, 1.0]),
    ("linear", 3, 0, [1.0, 2 / 3, 1 / 3]),
]


@pytest.mark.parametrize(("schedule", "total", "warmup", "expected"), BY_HAND)
def test_lr_at_by_hand(schedule: str, total: int, warmup: int, expected: list[float]) -> None:
    assert [lr_at(s, total, 1.0, schedule, warmup) for s in range(total)] == pytest.approx(expected)


SCHEDULES = {
    "projector": ("projector", Optim(lrs={"projector": 1e-3}, steps=4, schedule="cosine", warmup_ratio=0.5)),
    "constant": ("sft", Optim(lrs={"llm": 2e-4, "projector": 1e-3}, steps=4, warmup_ratio=0.75)),
    "vision": (
        "sft",
        Optim(
            lrs={"llm": 1e-4, "projector": 1e-3, "vision": 3e-4}, steps=1, weight_decay=0.1, betas=(0.5, 0.9)
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_step_trains_at_the_scheduled_rate_of_each_component(
    work: Path, siglip_qwen2: Path, name
) -> None:
    """``lr`` and ``lr_<component>`` of every step are lr_at's for the recipe's schedule and warm-up (the
    projector stage's cosine, SFT's constant, a trainable tower's ``vision_lr``), and the replay at those rates
    ends at the run's weights."""
    command, optim = SCHEDULES[name]
    extra = ["run.micro_batch_size=2", "run.grad_accum=1"]  # the projector stage keeps its feature cache
    data = "captions.jsonl" if command == "projector" else "sft.jsonl"
    run = run_stage(
        work, name, f"model={siglip_qwen2}", *extra, *optim.overrides(), command=command, data=data
    )
    rows = run.metrics()
    assert [r["step"] for r in rows] == list(range(1, optim.steps + 1))
    for step, row in enumerate(rows):
        for comp in optim.lrs:
            assert row[f"lr_{comp}"] == pytest.approx(optim.lr(comp, step), rel=1e-9), (step + 1, comp)
        assert row["lr"] == pytest.approx(
            optim.lr("llm" if "llm" in optim.lrs else "projector", step), rel=1e-9
        )
        for key in (k for k in row if k.startswith("lr_")):  # with weight decay: lr_<component>_no_decay too
            assert row[key] == row[key.removesuffix("_no_decay")], key
    state, losses, norms = replay(siglip_qwen2, run, optim)
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-4)
    assert_weights_close(run.weights(), state, atol=2e-5)
    if name == "vision":  # one step: every trained component moved by about its own rate
        before, after = load_file(siglip_qwen2 / "model.safetensors"), run.weights()
        for comp, lr in optim.lrs.items():
            keys = [k for k in before if component(k) == comp]
            moved = max(float((after[k] - before[k]).abs().max()) for k in keys)
            assert moved == pytest.approx(lr, rel=0.1), comp
