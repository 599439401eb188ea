"""Golden runs: short stage runs whose every logged number and final weights are recorded, to prove a refactor
changed nothing.

Each run in :data:`RUNS` is a few optimizer steps of a tiny recipe on the tiny zoo (the same assembled SigLIP +
Qwen2 Llava as the ``siglip_qwen2`` test fixture, ``align data synth`` questions). What is kept per run
(``tests/golden/<name>.json``): every metrics.jsonl row with the timing keys left out, and a fingerprint of the
final model folder (and adapter): a SHA-256 of all tensors' bytes plus each tensor's float64 sum and sum of
squares.

On one CPU thread a run is bitwise reproducible on the same machine, so :func:`compare` asks for exact
equality when the machine signature (torch version + CPU capability) equals the recording's. On another CPU
(other SIMD kernels round differently) it compares with ``rel 1e-4`` instead and skips the SHA-256; the vLLM
run always does, since vLLM's CPU server runs its own thread pool (reductions in a thread-count-dependent order).

The golden files change only through this deliberate command (never as a side effect of a test)::

    .venv/bin/python tests/golden_runs.py record            # every run
    .venv/bin/python tests/golden_runs.py record grpo sft_packed

``tests/test_golden.py`` reruns them and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
REWARDS = ROOT / "tests" / "dist_scripts" / "grpo_rewards.py"
TINY = ROOT / "recipes" / "tiny"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RUN_TIMEOUT_S = 300

# GRPO runs: a dense learnable reward (a random tiny model never scores on the real ones) plus format, fast steps
GRPO_BASE = (
    f"grpo.reward_funcs=[{REWARDS}:vowel_share, format]",
    "grpo.num_generations=4",
    "grpo.max_completion_length=12",
    "optim.lr=1e-2",
    "run.max_steps=3",
)
TWO_PROCESS_SFT = ("run.micro_batch_size=1", "run.grad_accum=2", "run.max_steps=2", "data.max_length=384")
TWO_PROCESS_GRPO = ("run.micro_batch_size=1", "run.max_steps=2")


@dataclass(frozen=True)
class GoldenRun:
    """One recorded run: ``align STAGE recipes/tiny/RECIPE`` plus overrides (``{work}`` is the inputs folder)."""

    stage: str
    recipe: str
    overrides: tuple[str, ...] = ()
    processes: int = 1
    vllm: bool = False  # against a vLLM CPU server serving the base model
    data: str = "rl.jsonl"


RUNS: dict[str, GoldenRun] = {
    "projector": GoldenRun(
        "projector", "projector.yaml", ("run.max_steps=3", "run.micro_batch_size=4"), data="captions.jsonl"
    ),
    "sft_padded": GoldenRun(
        "sft",
        "sft.yaml",
        ("run.max_steps=3", "run.micro_batch_size=2", "optim.warmup_ratio=0.34"),
        data="sft.jsonl",
    ),
    "sft_packed": GoldenRun(
        "sft",
        "sft.yaml",
        ("run.max_steps=3", "run.micro_batch_size=1", "data.packing=true"),
        data="sft.jsonl",
    ),
    "grpo": GoldenRun("grpo", "grpo.yaml", GRPO_BASE),
    "grpo_iterations2": GoldenRun(
        "grpo",
        "grpo.yaml",
        (*GRPO_BASE, "grpo.num_iterations=2", "run.max_steps=4", "grpo.scale_rewards=batch"),
    ),
    "grpo_dapo_dynamic": GoldenRun(
        "grpo",
        "grpo_dapo.yaml",
        (
            *GRPO_BASE,
            f"grpo.reward_funcs=[{REWARDS}:vowel_rich, format]",
            "grpo.dynamic_sampling=true",
            "grpo.dynamic_sampling_max_rounds=3",
            "grpo.mask_truncated_completions=false",  # the tiny model never ends a 12-token completion
        ),
    ),
    "grpo_gspo": GoldenRun(
        "grpo",
        "grpo.yaml",
        (
            *GRPO_BASE,
            "grpo.importance_sampling_level=sequence",
            "grpo.num_iterations=2",
            "grpo.temperature=0.7",
        ),
    ),
    "grpo_lora": GoldenRun("grpo", "grpo_lora.yaml", (*GRPO_BASE, "optim.lr=1e-2", "lora.dropout=0.1")),
    "sft_ddp": GoldenRun("sft", "sft.yaml", TWO_PROCESS_SFT, processes=2, data="sft.jsonl"),
    "sft_zero3": GoldenRun(
        "sft",
        "sft.yaml",
        (*TWO_PROCESS_SFT, "run.strategy=zero3", "run.deepspeed_config={work}/zero3_all.json"),
        processes=2,
        data="sft.jsonl",
    ),
    "grpo_ddp": GoldenRun("grpo", "grpo.yaml", (*GRPO_BASE, *TWO_PROCESS_GRPO), processes=2),
    "grpo_zero3": GoldenRun(
        "grpo",
        "grpo_zero3.yaml",
        (*GRPO_BASE, *TWO_PROCESS_GRPO, "run.deepspeed_config={work}/zero3_all.json"),
        processes=2,
    ),
    "grpo_vllm": GoldenRun("grpo", "grpo_vllm.yaml", GRPO_BASE, vllm=True),
}


# --- inputs ------------------------------------------------------------------------------------------------------


def assembled_spec(zoo: Path, out: Path) -> dict:
    """The assemble recipe of the ``siglip_qwen2`` fixture (tests/conftest.py): SigLIP (HF) + tiny Qwen2 R1."""
    return {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(out),
    }


def prepare_inputs(work: Path, base: Path) -> Path:
    """Synthetic data and the ZeRO-3 config under ``work``; ``base`` is the assembled model. Returns ``work``."""
    from align.data.synth import synthesize

    work.mkdir(parents=True, exist_ok=True)
    synthesize(work / "synth", train=16, test=1)
    # the shipped JSON keeps tensors under 100K elements whole; 0 partitions every tensor of the tiny model
    zero3 = json.loads((ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (work / "zero3_all.json").write_text(json.dumps(zero3))
    (work / "base").unlink(missing_ok=True)
    (work / "base").symlink_to(base)
    return work


def build_base(root: Path) -> Path:
    """Build the zoo's two parts and assemble the base model under ``root`` (the recording command's inputs)."""
    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict
    from align.zoo import build_part

    for part in ("siglip-hf", "qwen2-r1"):
        build_part(part, root / "zoo", False)
    with contextlib.redirect_stdout(io.StringIO()):
        return assemble(from_dict(AssembleRecipe, assembled_spec(root / "zoo", root / "base_model")))


# --- running -----------------------------------------------------------------------------------------------------


def argv(run: GoldenRun, work: Path, out: Path, vllm_port: int | None = None) -> list[str]:
    args = [
        run.stage,
        str(TINY / run.recipe),
        f"model={work / 'base'}",
        f"output_dir={out}",
        f"data.sources.0.path={work / 'synth' / 'train' / run.data}",
        "run.tensorboard=false",
        *(o.format(work=work) for o in run.overrides),
    ]
    if vllm_port is not None:
        args += [f"grpo.rollout.vllm_server_port={vllm_port}"]
    return args


def execute(name: str, work: Path, out: Path, vllm_port: int | None = None) -> dict:
    """Run ``name`` into ``out`` (one thread) and return what is recorded of it."""
    run = RUNS[name]
    args = argv(run, work, out, vllm_port)
    if run.processes == 1:
        from align.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                rc = main(args)
        finally:
            torch.set_num_threads(threads)
        if rc != 0:
            raise RuntimeError(f"golden run {name}: exit {rc}\n{log.getvalue()[-3000:]}")
    else:
        _torchrun(name, run.processes, args, out.parent / f"{name}.log")
    return record_of(out)


def _torchrun(name: str, processes: int, args: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*cmd, "-m", "align.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session holds torchrun and its workers
            proc.wait()
            raise RuntimeError(f"golden run {name} timed out (a hang?):\n{log.read_text()[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"golden run {name}: exit {proc.returncode}\n{log.read_text()[-3000:]}")


def is_timing(key: str) -> bool:
    """Wall-clock numbers differ run to run; everything else a run logs is recorded."""
    return key.startswith("time/") or key.endswith(("_s", "_per_s")) or key == "peak_memory_mb"


def record_of(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    weights = {"model": fingerprint(out / "model" / "model.safetensors")}
    if (out / "adapter" / "adapter_model.safetensors").exists():
        weights["adapter"] = fingerprint(out / "adapter" / "adapter_model.safetensors")
    return {
        "machine": machine(),
        "metrics": [{k: v for k, v in row.items() if not is_timing(k)} for row in rows],
        "weights": weights,
    }


def fingerprint(path: Path) -> dict:
    tensors = load_file(path)
    digest = hashlib.sha256()
    stats = {}
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(key.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        values = t.double().numpy()  # numpy's pairwise sum: the same on any thread count, unlike torch's
        stats[key] = [float(values.sum()), float((values * values).sum())]
    return {"sha256": digest.hexdigest(), "tensors": stats}


def machine() -> str:
    return f"torch {torch.__version__} / {torch.backends.cpu.get_cpu_capability()}"


# --- comparing ---------------------------------------------------------------------------------------------------


def compare(name: str, got: dict, want: dict) -> list[str]:
    """Differences between a rerun and its golden record (empty: the same)."""
    exact = got["machine"] == want["machine"] and not RUNS[name].vllm
    problems = []
    if len(got["metrics"]) != len(want["metrics"]):
        problems.append(f"{len(got['metrics'])} metric rows, golden has {len(want['metrics'])}")
    for g, w in zip(got["metrics"], want["metrics"], strict=False):
        if g.keys() != w.keys():
            problems.append(
                f"step {w.get('step')}: keys differ: +{sorted(g.keys() - w.keys())} -{sorted(w.keys() - g.keys())}"
            )
            continue
        for key in w:
            if not _same(g[key], w[key], exact):
                problems.append(f"step {w['step']}: {key} = {g[key]!r}, golden {w[key]!r}")
    for part, fp in want["weights"].items():
        mine = got["weights"].get(part)
        if mine is None:
            problems.append(f"{part}: missing")
            continue
        if exact and mine["sha256"] != fp["sha256"]:
            problems.append(f"{part}: SHA-256 of the weights differs")
        if mine["tensors"].keys() != fp["tensors"].keys():
            problems.append(f"{part}: tensor names differ")
            continue
        for key, (s, sq) in fp["tensors"].items():
            if not (_same(mine["tensors"][key][0], s, exact) and _same(mine["tensors"][key][1], sq, exact)):
                problems.append(f"{part}: {key} sum/sum of squares {mine['tensors'][key]}, golden {[s, sq]}")
    return problems


def _same(a, b, exact: bool) -> bool:
    if exact or not isinstance(b, float) or not isinstance(a, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-6


# --- the recording command ------------------------------------------------------------------------------------------


def vllm_env() -> dict[str, str]:
    """The environment vLLM's CPU build needs here: 1 GiB KV cache, the repository importable (worker extension)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(
        PYTHONPATH=str(ROOT),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_SERVER_DEV_MODE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@contextlib.contextmanager
def vllm_server(model: Path, log: Path):
    """A vLLM CPU server from ``.venv-vllm`` on a free loopback port, serving ``model``; yields the port."""
    from align.grpo.vllm_backend import VLLMServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
        "--enable-scale-out", "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", "align.grpo.vllm_worker.WeightSync",
    ]  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, env=vllm_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            VLLMServer("127.0.0.1", port, image_token_id=0, timeout=300)
        except Exception as err:
            raise RuntimeError(f"vLLM server did not start: {log.read_text()[-3000:]}") from err
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def reset_served_weights(model: Path, port: int) -> None:
    """Give the server ``model``'s own weights (an earlier run or test may have pushed others)."""
    from align.checkpoint import canonical_key, load_llava
    from align.grpo.vllm_backend import VLLMServer

    llava, _ = load_llava(model)
    backend = VLLMServer("127.0.0.1", port, image_token_id=llava.config.image_token_id)
    backend.load_weights([[(canonical_key(n), p.detach())] for n, p in llava.named_parameters()])


def record(names: list[str]) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        root = Path(tmp)
        work = prepare_inputs(root / "work", build_base(root))
        server = contextlib.nullcontext(None)
        if any(RUNS[n].vllm for n in names):
            server = vllm_server(work / "base", root / "vllm.log")
        with server as port:
            for name in names:
                if RUNS[name].vllm:
                    reset_served_weights(work / "base", port)
                result = execute(name, work, root / name, port if RUNS[name].vllm else None)
                (GOLDEN / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
                print(f"recorded {name}: {len(result['metrics'])} steps -> {GOLDEN / f'{name}.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["record"])
    parser.add_argument("names", nargs="*", help=f"runs to record (default: all of {', '.join(RUNS)})")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    record(args.names or list(RUNS))


if __name__ == "__main__":
    main()
