"""Tests of ``align.engine``: fast single-process checks, then 2-process runs under torchrun (gloo, CPU).

The distributed tests launch ``tests/dist_scripts/engine_toy.py`` three times (single process, 2-process
training, 2-process resume) and compare what rank 0 wrote: per-step losses and grad norms, consolidated
weights, resumed losses, generation probes. Exit code 0 alone proves nothing on this machine (see
/work/shared/notes/distributed_on_cpu.md), so every check also reads the files each case must write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from align.engine import (
    Dist,
    ParamGroup,
    build_deepspeed_config,
    init_distributed,
    read_deepspeed_config,
    setup,
)
from align.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "dist_scripts" / "engine_toy.py"
SINGLE = Dist(0, 1, 0, torch.device("cpu"), distributed=False)
RECIPE_CONFIGS = sorted((ROOT / "recipes" / "deepspeed").glob("*.json"))


# ---------------------------------------------------------------- DeepSpeed config: pure function


def ds(zero: dict, **kw) -> dict:
    args = {"stage": 3, "micro_batch_size": 2, "grad_accum": 4, "world_size": 8, "max_grad_norm": 1.0}
    return build_deepspeed_config(zero, **{**args, "precision": "bf16", **kw}, source="z.json")


def test_deepspeed_config_fills_batch_clipping_precision_from_the_recipe() -> None:
    zero = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "overlap_comm": True}}
    cfg = ds(zero)
    assert cfg["train_batch_size"] == 2 * 4 * 8
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 4)
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert zero["bf16"] == {"enabled": "auto"}, "the caller's dict must not be modified"
    assert ds({}, stage=2, precision="fp32", max_grad_norm=None)["zero_optimization"] == {"stage": 2}
    assert ds({}, precision="fp32", max_grad_norm=None)["bf16"] == {"enabled": False}
    assert ds({}, max_grad_norm=None)["gradient_clipping"] == 0.0
    assert ds({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2})["train_batch_size"] == 64


@pytest.mark.parametrize(
    ("zero", "kw", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            {},
            "train_micro_batch_size_per_gpu is 4 but the recipe gives 2",
        ),
        ({"train_batch_size": 16}, {}, "train_batch_size is 16 but the recipe gives 64"),
        ({"gradient_accumulation_steps": 1}, {}, "gradient_accumulation_steps is 1 but the recipe gives 4"),
        ({"gradient_clipping": 0.5}, {}, "gradient_clipping is 0.5 but the recipe gives 1.0"),
        (
            {"zero_optimization": {"stage": 2}},
            {},
            "zero_optimization.stage is 2 but the recipe's strategy is zero3",
        ),
        ({"optimizer": {"type": "AdamW"}}, {}, "remove 'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, {}, "remove 'scheduler'"),
        ({"fp16": {"enabled": True}}, {}, "fp16 is not supported"),
        (
            {"bf16": {"enabled": True}},
            {"precision": "fp32"},
            "bf16.enabled is True but the recipe's precision is fp32",
        ),
    ],
)
def test_deepspeed_config_rejects_disagreements(zero: dict, kw: dict, message: str) -> None:
    with pytest.raises(AlignError, match=r"^z\.json: ") as err:
        ds(zero, **kw)
    assert message in str(err.value)


def test_recipe_configs_are_valid_for_deepspeed() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    names = {p.name for p in RECIPE_CONFIGS}
    assert names == {"zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"}
    for path in RECIPE_CONFIGS:
        stage = int(path.name[4])
        raw = read_deepspeed_config(path)
        assert raw["zero_optimization"]["stage"] == stage, path
        assert ("offload_optimizer" in raw["zero_optimization"]) == ("offload" in path.name), path
        # DeepSpeed's own parser, with its real checks (unknown keys, types, batch arithmetic), for one process.
        parsed = DeepSpeedConfig(ds(raw, stage=stage, world_size=1))
        assert (parsed.zero_optimization_stage, parsed.train_batch_size) == (stage, 8)
        assert parsed.bfloat16_config.enabled
        assert (parsed.zero_config.offload_optimizer is not None) == ("offload" in path.name), path


@pytest.mark.parametrize(
    ("text", "message"), [(None, "not found"), ("{oops", "not valid JSON"), ("[1]", "expected a JSON object")]
)
def test_read_deepspeed_config_names_the_file(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "z.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(AlignError, match=message) as err:
        read_deepspeed_config(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- single process


def test_init_distributed_without_a_launcher_is_one_cpu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = init_distributed()
    assert (dist.rank, dist.world_size, dist.distributed, dist.is_main) == (0, 1, False, True)
    assert dist.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dist.all_reduce_mean(2.5) == 2.5
    assert torch.equal(dist.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    dist.barrier()
    assert dist.shutdown(3) == 3  # returns instead of exiting when there is no process group


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(3, 4).requires_grad_(False)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.b(torch.tanh(self.a(self.frozen(x)))), y)


def single_engine(grad_accum: int = 1, **kw):
    model = Tiny()
    groups = [
        ParamGroup("a", list(model.a.parameters()), lr=0.1),
        ParamGroup("b", list(model.b.parameters()), lr=0.05),
    ]
    args = {"dist": SINGLE, "strategy": "single", "micro_batch_size": 1, "grad_accum": grad_accum, **kw}
    return setup(model, groups, **args)


DATA = [(torch.randn(n, 3, generator=torch.Generator().manual_seed(n)), torch.randn(n, 2)) for n in (4, 4, 4)]


def train(engine, micro: int) -> list[float | None]:
    """Three optimizer steps over DATA, each batch cut into micro-batches of ``micro`` rows."""
    norms = []
    for step, (x, y) in enumerate(DATA):
        engine.set_lrs({"a": 0.1 / (step + 1), "b": 0.05})
        for i in range(0, len(x), micro):
            engine.backward(engine.module(x[i : i + micro], y[i : i + micro]))
            norms.append(engine.step())
    return norms


def test_gradient_accumulation_equals_the_whole_batch() -> None:
    whole, accum = single_engine(grad_accum=1), single_engine(grad_accum=4)
    norms_whole, norms_accum = train(whole, micro=4), train(accum, micro=1)
    assert norms_accum[:3] == [None] * 3 and norms_accum[4:7] == [None] * 3
    assert norms_whole == pytest.approx([n for n in norms_accum if n is not None], abs=1e-6)
    assert (whole.optimizer_steps, accum.optimizer_steps, accum.micro_steps) == (3, 3, 12)
    for k, v in whole.full_state_dict().items():
        assert torch.allclose(v, accum.full_state_dict()[k], atol=1e-6), k


def test_clipping_limits_the_update_but_reports_the_raw_norm() -> None:
    clipped, free = single_engine(max_grad_norm=1e-3), single_engine(max_grad_norm=None)
    x, y = DATA[0]
    before = clipped.model.a.weight.detach().clone()
    for engine in (clipped, free):
        engine.backward(engine.module(x, y))
    assert clipped.step() == pytest.approx(free.step(), rel=1e-6)
    # AdamW normalises the step size, so compare the moments instead: clipped gradients are ~1000x smaller.
    ratio = (
        free.optimizer.state[free.model.a.weight]["exp_avg"].norm()
        / clipped.optimizer.state[clipped.model.a.weight]["exp_avg"].norm()
    )
    assert ratio > 100
    assert not torch.equal(before, clipped.model.a.weight)


def test_engine_misuse_is_reported() -> None:
    engine = single_engine(grad_accum=2)
    x, y = DATA[0]
    with pytest.raises(RuntimeError, match="without a backward"):
        engine.step()
    with pytest.raises(ValueError, match=r"exactly the groups \['a', 'b'\]"):
        engine.set_lrs({"a": 1.0})
    engine.backward(engine.module(x, y))
    assert engine.step() is None
    with pytest.raises(RuntimeError, match="middle of an accumulation"):
        engine.save_state("unused")
    with engine.gathered_for_generation() as model:
        assert model is engine.model
    assert engine.lrs() == {"a": 0.1, "b": 0.05}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "ddp"}, "strategy 'ddp' needs a process group"),
        ({"strategy": "zero3"}, "strategy 'zero3' needs a process group"),
        ({"strategy": "fsdp"}, "strategy must be one of single, ddp, zero2, zero3"),
        ({"dist": Dist(0, 2, 0, torch.device("cpu"), True)}, "would train 2 independent copies"),
        ({"grad_accum": 0}, "must be >= 1, got 1 and 0"),
        ({"deepspeed_config": {"zero_optimization": {"stage": 2}}}, "but the strategy is 'single'"),
    ],
)
def test_setup_rejects_impossible_runs(change: dict, message: str) -> None:
    model = Tiny()
    args = {"dist": SINGLE, "strategy": "single", "micro_batch_size": 1, **change}
    with pytest.raises(AlignError, match=message):
        setup(model, [ParamGroup("a", list(model.a.parameters()), lr=0.1)], **args)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (lambda m: [], "at least one group"),
        (lambda m: [ParamGroup("a", [], lr=1)], "'a' has no parameters"),
        (lambda m: [ParamGroup("a", [m.a.weight], 1), ParamGroup("a", [m.b.weight], 1)], "distinct names"),
        (lambda m: [ParamGroup("a", [m.frozen.weight], lr=1)], "'a' holds a frozen parameter"),
        (lambda m: [ParamGroup("a", [nn.Parameter(torch.ones(1))], lr=1)], "not in the model"),
        (
            lambda m: [ParamGroup("a", [m.a.weight], 1), ParamGroup("b", [m.a.weight], 1)],
            "both param groups 'a' and 'b'",
        ),
    ],
)
def test_setup_rejects_bad_param_groups(groups, message: str) -> None:
    model = Tiny()
    with pytest.raises(ValueError, match=message):
        setup(model, groups(model), dist=SINGLE, strategy="single", micro_batch_size=1)


def test_save_and_load_state_resume_exactly_and_atomically(tmp_path: Path) -> None:
    reference = single_engine()
    expected = train(reference, micro=4)
    first = single_engine()
    x, y = DATA[0]
    first.set_lrs({"a": 0.1, "b": 0.05})
    first.backward(first.module(x, y))
    first.step()
    state = tmp_path / "state"
    first.save_state(state, extra={"step": 0})
    first.save_state(
        state, extra={"next_step": 1}
    )  # overwriting an existing state goes through the same rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no .tmp / .old left behind
    assert sorted(p.name for p in state.iterdir()) == ["engine.json", "optimizer.pt", "trainable.pt"]
    second = single_engine()
    assert second.load_state(state) == {"next_step": 1}
    assert (second.optimizer_steps, second.micro_steps) == (1, 1)
    norms = []
    for step, (x, y) in list(enumerate(DATA))[1:]:
        second.set_lrs({"a": 0.1 / (step + 1), "b": 0.05})
        second.backward(second.module(x, y))
        norms.append(second.step())
    assert norms == pytest.approx(expected[1:], abs=1e-7)
    for k, v in reference.full_state_dict().items():
        assert torch.allclose(v, second.full_state_dict()[k], atol=1e-7), k


def test_load_state_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    engine = single_engine()
    with pytest.raises(AlignError, match="not a training state"):
        engine.load_state(tmp_path)
    meta = {"strategy": "zero3", "world_size": 8, "precision": "bf16", "grad_accum": 1}
    (tmp_path / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(
        AlignError, match="saved with strategy zero3 on 8 ranks in bf16; this run is single on 1"
    ):
        engine.load_state(tmp_path)
    meta.update(strategy="ddp", grad_accum=4)
    (tmp_path / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(AlignError, match="saved with grad_accum=4, this run has 1"):
        engine.load_state(tmp_path)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights() -> None:
    engine = single_engine(precision="bf16")
    with engine.autocast():
        out = engine.model.a(torch.ones(1, 4))
    assert out.dtype == torch.bfloat16 and engine.model.a.weight.dtype == torch.float32
    with single_engine().autocast():
        assert engine.model.a(torch.ones(1, 4)).dtype == torch.float32


# ---------------------------------------------------------------- 2 processes under torchrun

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 240
SINGLE_CASES = {
    "single_m4": "single,4,1,fp32",
    "single_m2a2": "single,2,2,fp32",
    "single_m1a4": "single,1,4,fp32",
}
TRAIN_CASES = {
    "ddp_m2": "ddp,2,1,fp32",
    "ddp_m1a2": "ddp,1,2,fp32",
    "zero2_m1a2": "zero2,1,2,fp32",
    "zero3_m2": "zero3,2,1,fp32",
    "zero3_m1a2": "zero3,1,2,fp32",
    "zero3_bf16": "zero3,1,2,bf16",
}
RESUME_CASES = {
    "ddp_resumed": "ddp,1,2,fp32,resume=ddp_m1a2",
    "zero2_resumed": "zero2,1,2,fp32,resume=zero2_m1a2",
    "zero3_resumed": "zero3,2,1,fp32,resume=zero3_m2",
    "zero3_bf16_resumed": "zero3,1,2,bf16,resume=zero3_bf16",
}
FP32_CASES = [
    n for n, spec in {**SINGLE_CASES, **TRAIN_CASES}.items() if spec.endswith("fp32") and n != "single_m4"
]


def launch(out: Path, cases: dict[str, str], nproc: int) -> float:
    """Run the toy script on ``nproc`` processes (plain python for 1); returns seconds taken."""
    script = [str(TOY), "--out", str(out), *(f"{n}={s}" for n, s in cases.items())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*torchrun, *script] if nproc > 1 else [sys.executable, *script]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.monotonic()
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
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail(f"{nproc}-process run timed out after {TIMEOUT_S} s (a hang?):\n{output[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-4000:]}"
    return time.monotonic() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("engine_runs")
    seconds = {
        "single": launch(out, SINGLE_CASES, nproc=1),
        "train": launch(out, TRAIN_CASES, nproc=2),
        "resume": launch(out, RESUME_CASES, nproc=2),
    }
    print(f"engine toy launches (s): {seconds}")
    results = {}
    for name in (*SINGLE_CASES, *TRAIN_CASES, *RESUME_CASES):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.pt").is_file(), (
            f"case {name} wrote nothing"
        )
        record = json.loads((out / f"{name}.json").read_text())
        results[name] = {**record, "weights": torch.load(out / f"{name}.pt")}
    return out, results


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", FP32_CASES)
def test_every_layout_of_the_global_batch_matches_one_process(runs, name: str) -> None:
    _, results = runs
    ref, got = results["single_m4"], results[name]
    assert len(got["losses"]) == 4 and got["optimizer_steps"] == 4
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-4)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], abs=1e-4)
    # The schedule changed the lrs every step and reached the optimizer groups DeepSpeed steps.
    assert got["lrs"] == ref["lrs"] and got["lrs"][0] != got["lrs"][-1]
    assert_weights_close(got["weights"], ref["weights"], atol=1e-4)


@pytest.mark.distributed
def test_training_moved_the_weights_and_kept_frozen_ones(runs) -> None:
    spec = importlib.util.spec_from_file_location("engine_toy", TOY)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    _, results = runs
    init, final = toy.Toy(seed=1).state_dict(), results["zero3_m2"]["weights"]  # rank 0's initial weights
    assert torch.equal(final["encoder.weight"], init["encoder.weight"]) and final["scale"].item() == 1.5
    for key in ("projector.0.weight", "projector.2.bias", "embed.weight", "head.weight"):
        assert (final[key] - init[key]).abs().max() > 1e-3, f"{key} did not train"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp_m2", "ddp_m1a2", "zero2_m1a2", "zero3_m2", "zero3_m1a2"])
def test_ranks_ran_different_branches_without_hanging(runs, name: str) -> None:
    # 0.5 = one rank's micro-batch had images and the other's had none, in the same step.
    assert 0.5 in runs[1][name]["image_fraction"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("resumed", "original"), [(r, spec.split("=")[1]) for r, spec in RESUME_CASES.items()]
)
def test_resume_continues_exactly(runs, resumed: str, original: str) -> None:
    _, results = runs
    got, ref = results[resumed], results[original]
    assert got["resumed_lrs"] == ref["lrs"][1]  # the lrs in force when the state was saved after step 2
    assert got["losses"] == pytest.approx(ref["losses"][2:], abs=1e-6)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"][2:], abs=1e-6)
    assert got["optimizer_steps"] == 4
    assert_weights_close(got["weights"], ref["weights"], atol=1e-6)


@pytest.mark.distributed
def test_bf16_zero3_stays_close_to_fp32(runs) -> None:
    _, results = runs
    bf16, fp32 = results["zero3_bf16"], results["single_m4"]
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=1e-2)
    assert bf16["losses"] != pytest.approx(fp32["losses"], abs=1e-6), "bf16 did not take effect"
    assert_weights_close(bf16["weights"], fp32["weights"], atol=2e-2)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp_m2", "zero2_m1a2", "zero3_m2", "zero3_bf16"])
def test_generation_block_sees_the_trained_weights(runs, name: str) -> None:
    _, results = runs
    got = results[name]
    atol = 5e-2 if name.endswith("bf16") else 1e-4
    assert torch.allclose(torch.tensor(got["probe"]), torch.tensor(results["single_m4"]["probe"]), atol=atol)
    assert got["probe_resident"], "ZeRO-3 released parameters between forwards of one generation block"
    if name.startswith("zero3"):
        assert got["released_after_probe"], "ZeRO-3 parameters stayed gathered after the generation block"


@pytest.mark.distributed
def test_only_rank0_writes_replicated_files_and_zero_shards_per_rank(runs) -> None:
    out, _ = runs
    cases = [*SINGLE_CASES, *TRAIN_CASES, *RESUME_CASES]
    expected = {f"{n}.{ext}" for n in cases for ext in ("json", "pt")}
    expected |= {f"state-{n}" for n in (*SINGLE_CASES, *TRAIN_CASES)}
    assert {p.name for p in out.iterdir()} == expected  # no .tmp / .old directories, no per-rank extras
    assert {p.name for p in (out / "state-ddp_m1a2").iterdir()} == {
        "engine.json",
        "optimizer.pt",
        "trainable.pt",
    }
    for name in ("zero2_m1a2", "zero3_m2"):
        state = out / f"state-{name}"
        assert {p.name for p in state.iterdir()} == {"engine.json", "deepspeed"}
        shards = {p.name for p in (state / "deepspeed" / "state").iterdir()}
        assert {s for s in shards if "rank_1" in s} and {s for s in shards if "rank_0" in s}, shards
