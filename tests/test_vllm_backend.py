"""The vLLM rollout backend (``align/grpo/vllm_backend.py``) against our sampler, on the tiny zoo Llava in fp32.

vLLM lives in its own venv (``scripts/setup_vllm.sh`` -> ``.venv-vllm``, torch 2.13 CPU build): the colocated
backend runs there in ``tests/vllm_scripts/colocated.py`` (one process that imports only the backend module);
the server backend talks to one vLLM server per test session, started from ``.venv-vllm`` on a free loopback
port and killed at the end. Without ``.venv-vllm`` those tests skip and say why; the pure-function tests always
run. vLLM's start costs ~15-40 s per process on 2 cores.

    .venv/bin/pytest -q tests/test_vllm_backend.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden_runs import vllm_env
from PIL import Image
from safetensors.torch import load_file, save_file

from align.checkpoint import canonical_key, eos_token_ids, image_seq_len, load_llava
from align.cli import main
from align.data.encode import encode_prompt
from align.data.images import pixel_values
from align.data.sample import Sample
from align.engine import Dist, ParamGroup, setup
from align.grpo.sampler import SamplingSettings, generate
from align.grpo.vllm_backend import (
    VLLMServer,
    changing_parameters,
    check_expansion,
    collapse_image_tokens,
    sync_weights,
    to_rollout,
    weight_chunks,
)
from align.lora import apply_lora, merge_lora_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm (run scripts/setup_vllm.sh to test the vLLM backend)"
)
MAX_NEW = 16


def _greedy(tokenizer, model) -> SamplingSettings:
    """One greedy completion of at most MAX_NEW tokens per prompt, ended by the model's end-of-turn tokens."""
    eos = eos_token_ids(tokenizer, model.generation_config)
    return SamplingSettings(1, MAX_NEW, 0.0, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)


REWARDS = ROOT / "tests" / "dist_scripts" / "grpo_rewards.py"


# --- pure functions: no vLLM needed ----------------------------------------------------------------------------


def test_collapse_image_tokens_keeps_one_per_run() -> None:
    assert collapse_image_tokens([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_image_tokens([1, 2], 9) == [1, 2]


def test_check_expansion_names_both_lengths() -> None:
    check_expansion([1, 2, 3], [1, 2, 3], 0)
    check_expansion([1, 2, 3], None, 0)
    with pytest.raises(Exception, match="prompt 4: vLLM expanded it to 5 token ids, ours has 3"):
        check_expansion([1, 2, 3], [1, 2, 3, 3, 3], 4)


def test_to_rollout_pads_masks_and_marks_truncation() -> None:
    r = to_rollout(
        [([5, 6, 2], [-0.1, -0.2, -0.3], True), ([7], [-1.0], False)], pad_token_id=0, max_new_tokens=3
    )
    assert r.completion_ids.tolist() == [[5, 6, 2], [7, 0, 0]]
    assert r.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert r.lengths.tolist() == [3, 1]
    assert r.is_truncated.tolist() == [False, True]
    assert torch.allclose(r.logps, torch.tensor([[-0.1, -0.2, -0.3], [-1.0, 0.0, 0.0]]))


def _single_engine(model: torch.nn.Module):
    dist = Dist(0, 1, 0, torch.device("cpu"), distributed=False)
    params = [p for p in model.parameters() if p.requires_grad]
    return setup(
        model, [ParamGroup("all", params, lr=1e-3)], dist=dist, strategy="single", micro_batch_size=1
    )


def test_weight_chunks_are_canonical_and_merge_lora(siglip_qwen2: Path) -> None:
    """Chunks from the engine, LoRA merged per layer, equal the merged consolidated state dict, name for name."""
    model, _ = load_llava(siglip_qwen2)
    model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0: make the merge visible
            p.data.normal_(0, 0.5)
    engine = _single_engine(model)
    keep = lambda n, p: p.requires_grad or n.endswith("base_layer.weight")  # noqa: E731
    chunks = list(weight_chunks(engine.gathered_parameters_in_chunks(keep), lora_scaling=2.0))
    sent = {name: t for chunk in chunks for name, t in chunk}
    merged = merge_lora_state_dict(model.state_dict(), 2.0)
    adapted = {
        k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        for k in model.state_dict()
        if k.endswith("base_layer.weight")
    }
    assert {canonical_key(k) for k in adapted} == set(sent)  # only what LoRA changes; nothing else trains
    for key in adapted:
        assert torch.equal(sent[canonical_key(key)], merged[key]), key
    assert all(len(chunk) == 1 for chunk in chunks)  # one layer per chunk
    # full fine-tuning: every trainable parameter, plain names
    plain, _ = load_llava(siglip_qwen2)
    plain.model.vision_tower.requires_grad_(False)
    engine = _single_engine(plain)
    names = [
        n for chunk in engine.gathered_parameters_in_chunks(lambda n, p: p.requires_grad) for n, _ in chunk
    ]
    sent = [
        n
        for c in weight_chunks(engine.gathered_parameters_in_chunks(lambda n, p: p.requires_grad), None)
        for n, _ in c
    ]
    assert sent == [canonical_key(n) for n in names] and not any(n.startswith("vision_tower") for n in sent)
    assert sync_weights(None, lambda: engine.gathered_parameters_in_chunks(), None) == 0


# --- against vLLM ------------------------------------------------------------------------------------------------


def _questions(siglip_qwen2: Path, tmp: Path):
    """Two questions with an image each and one without, tokenised as the GRPO stage does."""
    _, processor = load_llava(siglip_qwen2)
    tok = processor.tokenizer
    colours = [(200, 30, 30), (20, 180, 60)]
    images = [Image.new("RGB", (40 + 8 * i, 32), c) for i, c in enumerate(colours)]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp / f"image{i}.png"))
        im.save(paths[-1])
    rows = [
        Sample("t", "t:0", [{"role": "user", "content": "<image>\nHow many red squares?"}], [images[0]]),
        Sample("t", "t:1", [{"role": "user", "content": "<image>\nWhat colour is it?"}], [images[1]]),
        Sample("t", "t:2", [{"role": "user", "content": "What is 2 + 3?"}]),
    ]
    n = image_seq_len(processor)
    prompts = [encode_prompt(s, tok, processor.image_token_id, n).input_ids for s in rows]
    return prompts, images, paths, [1, 1, 0], processor


def _ours(model, prompts, images, images_per_prompt, processor) -> list[list[int]]:
    pixels, _ = pixel_values(images, processor.image_processor, 10**7)
    tok = processor.tokenizer
    with torch.no_grad():
        r = generate(
            model.eval(),
            prompts,
            pixels,
            images_per_prompt,
            _greedy(tok, model),
            None,
        )
    return [ids[:n].tolist() for ids, n in zip(r.completion_ids, r.lengths, strict=True)]


def _perturbed(siglip_qwen2: Path):
    """The model with its projector and first decoder layer changed, as a training step would (seeded)."""
    model, _ = load_llava(siglip_qwen2)
    g = torch.Generator().manual_seed(1)
    changed = {}
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name or ".layers.0.mlp." in name:
            p.data += torch.randn(p.shape, generator=g) * p.data.std() * 3
            changed[canonical_key(name)] = p.detach().clone()
    return model, changed


@needs_vllm
def test_colocated_greedy_equals_ours_before_and_after_a_weight_sync(
    siglip_qwen2: Path, tmp_path: Path
) -> None:
    prompts, images, paths, per_prompt, processor = _questions(siglip_qwen2, tmp_path)
    model, _ = load_llava(siglip_qwen2)
    before = _ours(model, prompts, images, per_prompt, processor)
    trained, changed = _perturbed(siglip_qwen2)
    after = _ours(trained, prompts, images, per_prompt, processor)
    assert after != before  # the update changes greedy output, so the comparison below can fail
    save_file(changed, str(tmp_path / "updated.safetensors"))
    job = {
        "model_dir": str(siglip_qwen2),
        "image_token_id": model.config.image_token_id,
        "prompts": prompts,
        "images": paths,
        "images_per_prompt": per_prompt,
        "max_new_tokens": MAX_NEW,
        "eos_token_ids": eos_token_ids(processor.tokenizer, model.generation_config),
        "pad_token_id": processor.tokenizer.pad_token_id,
        "updated": str(tmp_path / "updated.safetensors"),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests/vllm_scripts/colocated.py"), str(tmp_path / "job.json")],
        env=vllm_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] == before
    assert result["loaded"] == len(changed)
    assert result["after"] == after


@pytest.fixture
def served(siglip_qwen2: Path, vllm_server: int):
    """The server with the folder's own weights (a test before may have pushed others)."""
    model, _ = load_llava(siglip_qwen2)
    backend = VLLMServer("127.0.0.1", vllm_server, image_token_id=model.config.image_token_id)
    backend.load_weights([[(canonical_key(n), p.detach())] for n, p in model.named_parameters()])
    return backend


@needs_vllm
def test_server_greedy_equals_ours_and_follows_a_weight_sync(
    siglip_qwen2: Path, served, tmp_path: Path
) -> None:
    prompts, images, _, per_prompt, processor = _questions(siglip_qwen2, tmp_path)
    model, _ = load_llava(siglip_qwen2)
    tok = processor.tokenizer

    def theirs(sampling: dict | None = None):
        return served.generate(
            prompts,
            None,
            per_prompt,
            _greedy(tok, model),
            None,
            images=images,
        )

    def tokens(r) -> list[list[int]]:
        return [ids[:n].tolist() for ids, n in zip(r.completion_ids, r.lengths, strict=True)]

    before = _ours(model, prompts, images, per_prompt, processor)
    rollout = theirs()  # also checks that vLLM's expanded prompt ids equal ours (check_expansion)
    assert tokens(rollout) == before
    assert rollout.logps.shape == rollout.completion_ids.shape and (rollout.logps <= 0).all()
    trained, changed = _perturbed(siglip_qwen2)
    after = _ours(trained, prompts, images, per_prompt, processor)
    assert after != before
    engine = _single_engine(trained)
    keep = lambda n, p: canonical_key(n) in changed  # noqa: E731
    assert sync_weights(served, lambda: engine.gathered_parameters_in_chunks(keep), None) == len(changed)
    assert tokens(theirs()) == after


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``align data synth`` RL questions (8 train scenes)."""
    root = tmp_path_factory.mktemp("vllm_synth")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(root), "--train", "8", "--test", "2"]) == 0
    return root / "train" / "rl.jsonl"


def _grpo_args(model: Path, out: Path, questions: Path, port: int) -> list[str]:
    """``align grpo recipes/tiny/grpo_vllm.yaml`` against the test server: 3 steps of a dense reward at lr 1e-2
    (every step moves the weights a lot, so a stale vLLM would show in the log-probs)."""
    return [
        "grpo",
        str(ROOT / "recipes/tiny/grpo_vllm.yaml"),
        f"model={model}",
        f"output_dir={out}",
        f"data.sources.0.path={questions}",
        f"grpo.rollout.vllm_server_port={port}",
        f"grpo.reward_funcs=[{REWARDS}:vowel_share, format]",
        "optim.lr=1e-2",
        "optim.schedule=constant",
        "run.max_steps=3",
        "run.tensorboard=false",
    ]


def _check_run(out: Path, start_model: Path) -> list[dict]:
    """Sane metrics: rewards in range, IS ratio within 1e-3 of 1, logp gap < 1e-3 (fp32 both sides), weights moved."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["grad_norm"] > 0 and r["completion_length"] > 0
        assert 0.0 <= r["reward/vowel_share"] <= 1.0 and 0.0 <= r["reward/format"] <= 1.0
        ratio = [r[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max")]
        assert 0.999 < ratio[0] <= ratio[1] <= ratio[2] < 1.001, r
        gap = [r[f"sampling/sampling_logp_difference/{k}"] for k in ("mean", "max")]
        assert 0 <= gap[0] <= gap[1] < 1e-3, r
    assert rows[-1]["kl"] > 1e-3  # the policy moved away from the input model, and vLLM followed it
    trained = load_file(str(out / "model" / "model.safetensors"))
    start = load_file(str(start_model / "model.safetensors"))
    key = "multi_modal_projector.linear_2.weight"
    assert (trained[key] - start[key]).abs().max() > 1e-3
    return rows


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["lora.r=8", "lora.alpha=16", "lora.dropout=0.0"],  # vLLM gets the merged weights
        ["grpo.dynamic_sampling=true", "grpo.num_iterations=2"],  # old log-probs: the trainer's
    ],
    ids=["full", "lora", "dynamic_sampling+2_iterations"],
)
def test_grpo_three_steps_through_the_cli_with_vllm_server(
    siglip_qwen2: Path, served, vllm_server: int, questions: Path, tmp_path: Path, variant: list[str]
) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*_grpo_args(siglip_qwen2, tmp_path / "run", questions, vllm_server), *variant]) == 0
    rows = _check_run(tmp_path / "run", siglip_qwen2)
    assert "vllm: synced" in stdout.getvalue()
    if "grpo.dynamic_sampling=true" in variant:
        assert all("dynamic_sampling/rounds" in r for r in rows)


@needs_vllm
@pytest.mark.slow
def test_without_weight_syncs_the_mismatch_shows(
    siglip_qwen2: Path, served, vllm_server: int, questions: Path, tmp_path: Path, monkeypatch
) -> None:
    """The control for the test above: vLLM kept on the input weights, the metrics it checks fail."""
    import align.grpo.vllm_backend as vllm_backend

    monkeypatch.setattr(vllm_backend, "sync_weights", lambda *args, **kwargs: 0)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(_grpo_args(siglip_qwen2, tmp_path / "run", questions, vllm_server)) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["sampling/sampling_logp_difference/max"] < 1e-3  # step 1: nothing trained yet
    for r in rows[1:]:  # measured: mean gap 0.25 / 0.39, IS ratio mean 0.51 / 0.08
        assert r["sampling/sampling_logp_difference/mean"] > 0.01
        assert abs(r["sampling/importance_sampling_ratio/mean"] - 1) > 0.05


@needs_vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_zero3_on_two_processes_with_vllm_server(
    siglip_qwen2: Path, served, vllm_server: int, questions: Path, tmp_path: Path
) -> None:
    """ZeRO-3 on 2 ranks: both roll out through the server, rank 0 pushes the weights the ranks gather together."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = _grpo_args(siglip_qwen2, tmp_path / "run", questions, vllm_server)
    args += ["run.strategy=zero3", f"run.deepspeed_config={ROOT / 'recipes/deepspeed/zero3.json'}"]
    args += ["run.micro_batch_size=1"]  # 2 ranks x 1 question = the single-process run's 2 per step
    proc = subprocess.run(
        [*torchrun, "-m", "align.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(tmp_path / "run", siglip_qwen2)
    assert proc.stdout.count("vllm: synced") == 1  # printed by rank 0 only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grpo.rollout.vllm_mode=server"], "grpo.rollout.vllm_mode: applies to backend vllm only"),
        (
            [
                "grpo.rollout.backend=vllm",
                "grpo.rollout.vllm_mode=server",
                "grpo.rollout.vllm_enable_sleep_mode=true",
            ],
            "grpo.rollout.vllm_enable_sleep_mode: applies to vllm_mode colocate",
        ),
        (
            ["grpo.rollout.backend=vllm", "grpo.rollout.vllm_importance_sampling_clip_min=3"],
            r"clip_min: must be below vllm_importance_sampling_clip_max \(3\), got 3",
        ),
        (
            [
                "grpo.rollout.backend=vllm",
                "grpo.rollout.vllm_importance_sampling_mode=token_truncate",
                "grpo.rollout.vllm_importance_sampling_clip_max=null",
            ],
            "token_truncate clamps to",
        ),
        (
            ["grpo.rollout.backend=vllm", "grpo.rollout.vllm_max_model_length=512"],
            r"vllm_max_model_length: 512 is below data.max_length \(600\)",
        ),
    ],
)
def test_rollout_recipe_refuses_impossible_combinations(overrides: list[str], message: str) -> None:
    from align.config import RecipeError, load_any

    with pytest.raises(RecipeError, match=message):
        load_any(str(ROOT / "recipes/tiny/grpo.yaml"), overrides, expect="grpo")
    assert (
        load_any(str(ROOT / "recipes/tiny/grpo_vllm.yaml"), [], expect="grpo").grpo.rollout.backend == "vllm"
    )


def test_changing_parameters_keeps_whole_components(siglip_qwen2: Path) -> None:
    """Only the projector trains: its tensors go, the tower and the LLM (unchanged) do not."""
    model, _ = load_llava(siglip_qwen2)
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    keep = changing_parameters(model.named_parameters())
    sent = [n for n, p in model.named_parameters() if keep(n, p)]
    assert sent and all("multi_modal_projector" in n for n in sent)
    model.lm_head.weight.requires_grad_(True)  # any LLM tensor training sends the whole LLM (fused layers)
    keep = changing_parameters(model.named_parameters())
    assert all(keep(n, p) for n, p in model.named_parameters() if ".language_model." in f".{n}")
    assert not any(keep(n, p) for n, p in model.named_parameters() if "vision_tower" in n)


@pytest.mark.distributed
def test_zero3_chunks_are_gathered_one_module_at_a_time(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = ROOT / "tests" / "dist_scripts" / "vllm_chunks.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(script), str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and (tmp_path / "chunks.json").exists(), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    result = json.loads((tmp_path / "chunks.json").read_text())
    chunks = result["chunks"]
    assert [c["names"] for c in chunks] == [["2.weight", "2.bias"], ["3.weight"]]  # frozen layer 0 skipped
    assert all(c["equal"] for c in chunks)  # the full tensors, not shards
    assert all(c["held_whole"] == c["numel"] for c in chunks)  # only this chunk's module is whole
    assert result["after"] < result["total"]  # released again after the walk


def test_vllm_is_imported_only_by_the_backend_lazily() -> None:
    """vLLM is an optional extra: no module imports it at import time (the CPU install has none)."""
    import ast

    for path in sorted((ROOT / "align").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                where = path.relative_to(ROOT)
                assert path.name in ("vllm_backend.py", "vllm_worker.py"), f"{where} imports vLLM"
                assert node not in top_level, f"{where} imports vLLM at import time"
