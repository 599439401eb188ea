"""The GPU path end to end, measured: what ``scripts/gpu_check.sh`` runs (see it for how to start it).

On one GPU, in bf16, with random weights (nothing is downloaded):

1. parts of real shape: a SigLIP-so400m/14-384 tower and a Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (the
   configs shipped in ``recipes/models/``; a tokenizer trained locally with the real R1 chat template);
2. ``align assemble`` in bf16, synthetic data (``align data synth``);
3. 10 SFT steps with packing (sdpa attention, gradient checkpointing);
4. 5 GRPO steps with our sampler, then 5 with the vLLM backend when vLLM is installed;
5. 3 SFT steps under ZeRO-3 in one process (torchrun, DeepSpeed);
6. ``align export`` in bf16 and a reload in plain transformers: logits compared with our loader's.

Every stage runs through the real command line (``python -m align.cli``), so this is what a user runs. It prints
one table: wall time, tokens/s, GRPO's step split (generation / reference log-probs / update), peak GPU memory
and MFU (model FLOPs 6 N per trained token, 2 N per generated one, over the GPU's dense bf16 peak), and writes it
to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``.

``--tiny`` runs the same phases on the tiny zoo parts, on CPU when there is no GPU: CI runs it
(``tests/test_gpu_check.py``) so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "recipes" / "models"
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM (vendor datasheet)
QUESTION = (
    "{question} Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)


def build_real_parts(out: Path) -> tuple[Path, Path]:
    """SigLIP-so400m/14-384 and a 1.5B Qwen2 with random weights, saved in bf16 as standard HF folders."""
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from align.zoo_tokenizer import build_r1_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vision_dir, llm_dir = out / "siglip-so400m-random", out / "qwen2-1.5b-random"
    torch.manual_seed(0)
    if not (vision_dir / "config.json").is_file():
        config = SiglipVisionConfig.from_pretrained(MODELS / "google--siglip-so400m-patch14-384")
        with torch.device(device):
            SiglipVisionModel(config).to(torch.bfloat16).save_pretrained(vision_dir)
        SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(vision_dir)
    if not (llm_dir / "config.json").is_file():
        tokenizer = build_r1_tokenizer("qwen2")
        config = Qwen2Config.from_pretrained(MODELS / "deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B")
        # the real vocabulary size (embedding rows); the local tokenizer uses the first len(tokenizer) ids
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def build_tiny_parts(out: Path) -> tuple[Path, Path]:
    from align.zoo import build_zoo

    parts = build_zoo(out / "zoo")
    return parts["siglip-hf"], parts["qwen2-r1"]


def cli(args: list[str], log: Path, torchrun: bool = False) -> float:
    """Run ``align <args>`` as a user would; returns wall seconds; a failure shows the log's tail."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd = [*(launcher if torchrun else [sys.executable]), "-m", "align.cli", *args]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        sys.exit(
            f"gpu_check: `align {' '.join(args)}` failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
        )
    return time.perf_counter() - t0


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def llm_parameters(model_dir: Path) -> int:
    """The LLM's parameters without its embedding table (the 6 N of MFU), from the folder's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)
    return sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()


def mfu(flops_per_s: float, peak_tflops: float | None) -> str:
    return "n/a" if not peak_tflops else f"{100 * flops_per_s / (peak_tflops * 1e12):.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny zoo parts (runs on CPU): the script's own test"
    )
    parser.add_argument("--out", default="checkpoints/gpu_check", help="work folder (parts, runs, table)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="dense bf16 peak for MFU")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for stale in ("model", "sft", "grpo_align", "grpo_vllm", "sft_zero3", "export"):  # the parts stay cached
        shutil.rmtree(out / stale, ignore_errors=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("gpu_check: no CUDA device; run with --tiny for the CPU version")
    peak = args.peak_tflops if cuda else None
    rows: list[dict] = []
    wall: dict[str, float] = {}

    t0 = time.perf_counter()
    vision_dir, llm_dir = build_tiny_parts(out) if args.tiny else build_real_parts(out)
    wall["parts"] = time.perf_counter() - t0
    from align.data.synth import synthesize

    synthesize(out / "synth", train=32 if args.tiny else 64, test=4, image_size=64, force=True)
    train = out / "synth" / "train"

    model = out / "model"
    assemble = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(vision_dir)},
        "llm": {"name_or_path": str(llm_dir)},
        "output_dir": str(model),
        "dtype": "bfloat16",
    }
    wall["assemble"] = cli(
        ["assemble", str(write_recipe(out / "assemble.yaml", assemble))], logs / "assemble.log"
    )
    n_llm = llm_parameters(model)

    # --- SFT: packing, checkpointing, bf16 on GPU ------------------------------------------------------------
    max_length = 1024 if args.tiny else 4096
    sft = {
        "kind": "sft",
        "model": str(model),
        "output_dir": str(out / "sft"),
        "data": {
            "sources": [{"name": "cot", "path": str(train / "sft.jsonl"), "format": "messages"}],
            "max_length": max_length,
            "packing": True,
        },
        "run": {
            "micro_batch_size": 2,
            "max_steps": 10,
            "epochs": 100,
            "gradient_checkpointing": True,
            "save_every": 0,
            "tensorboard": False,
        },
        "optim": {"lr": 1.0e-5, "projector_lr": 1.0e-4},
    }
    sft_recipe = write_recipe(out / "sft.yaml", sft)
    wall["sft"] = cli(["sft", str(sft_recipe)], logs / "sft.log")
    summary = json.loads((out / "sft" / "summary.json").read_text())
    tokens_per_s = summary["tokens_per_s"]
    rows.append(
        {
            "phase": "sft (10 steps, packed)",
            "wall_s": wall["sft"],
            "tokens_per_s": tokens_per_s,
            "peak_mem_mb": summary["peak_memory_mb"],
            "mfu": mfu(6 * n_llm * tokens_per_s, peak),
        }
    )

    # --- GRPO: our sampler, then vLLM when installed --------------------------------------------------------
    grpo = {
        "kind": "grpo",
        "model": str(out / "sft"),
        "output_dir": str(out / "grpo"),
        "data": {
            "sources": [
                {
                    "name": "questions",
                    "path": str(train / "rl.jsonl"),
                    "format": "rl",
                    "question_template": QUESTION,
                }
            ],
            "max_length": max_length,
        },
        "grpo": {"num_generations": 8, "max_completion_length": 32 if args.tiny else 256, "beta": 0.04},
        "run": {
            "micro_batch_size": 2,
            "max_steps": 5,
            "gradient_checkpointing": True,
            "save_every": 0,
            "tensorboard": False,
        },
        "optim": {"lr": 1.0e-6},
    }
    backends = ["align"] + (["vllm"] if importlib.util.find_spec("vllm") and cuda else [])
    for backend in backends:
        name = f"grpo_{backend}"
        recipe = {**grpo, "output_dir": str(out / name)}
        overrides = [] if backend == "align" else ["grpo.rollout.backend=vllm"]
        wall[name] = cli(
            ["grpo", str(write_recipe(out / f"{name}.yaml", recipe)), *overrides], logs / f"{name}.log"
        )
        steps = jsonl(out / name / "metrics.jsonl")
        summary = json.loads((out / name / "summary.json").read_text())
        gen = sum(r["time/rollout_s"] for r in steps)
        ref = sum(r["time/reference_s"] for r in steps)
        upd = sum(r["time/update_s"] for r in steps)
        tokens = sum(r["completion_tokens"] for r in steps)
        rows.append(
            {
                "phase": f"grpo {backend} (5 steps, G=8)",
                "wall_s": wall[name],
                "tokens_per_s": tokens / gen,  # rollout tokens per second of generation
                "generation_s": gen,
                "logps_s": ref,
                "update_s": upd,
                "peak_mem_mb": summary["peak_memory_mb"],
                # the update's forward + backward over the completions (prompts once per group: shared prefix)
                "mfu": mfu(6 * n_llm * tokens / upd, peak),
            }
        )

    # --- ZeRO-3 in one process --------------------------------------------------------------------------------
    zero = {
        **sft,
        "output_dir": str(out / "sft_zero3"),
        "run": {
            **sft["run"],
            "max_steps": 3,
            "strategy": "zero3",
            "deepspeed_config": str(ROOT / "recipes/deepspeed/zero3.json"),
        },
    }
    wall["zero3"] = cli(
        ["sft", str(write_recipe(out / "sft_zero3.yaml", zero))], logs / "zero3.log", torchrun=True
    )
    summary = json.loads((out / "sft_zero3" / "summary.json").read_text())
    rows.append(
        {
            "phase": "sft zero3 (3 steps, 1 process)",
            "wall_s": wall["zero3"],
            "tokens_per_s": summary["tokens_per_s"],
            "peak_mem_mb": summary["peak_memory_mb"],
            "mfu": mfu(6 * n_llm * summary["tokens_per_s"], peak),
        }
    )

    # --- export + reload in plain transformers ---------------------------------------------------------------
    export_dir = out / "export"
    wall["export"] = cli(
        ["export", str(out / "grpo_align"), "--out", str(export_dir), "--dtype", "bf16"], logs / "export.log"
    )
    t0 = time.perf_counter()
    diff = reload_parity(out / "grpo_align", export_dir)
    wall["reload"] = time.perf_counter() - t0
    rows.append(
        {
            "phase": f"export + reload (max abs logit diff {diff:.3g})",
            "wall_s": wall["export"] + wall["reload"],
            "logit_diff": diff,
        }
    )

    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    table = format_table(rows, device, args.tiny, wall, n_llm)
    print(table)
    (out / "gpu_check.md").write_text(table + "\n")
    (out / "gpu_check.json").write_text(
        json.dumps({"device": device, "tiny": args.tiny, "rows": rows, "wall_s": wall}, indent=2)
    )
    return 0


def reload_parity(stage_dir: Path, export_dir: Path) -> float:
    """Max |logit difference| between our loader on the stage output and plain transformers on the export."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from align.checkpoint import load_llava

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, processor = load_llava(stage_dir, dtype=torch.bfloat16)
    theirs = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=torch.bfloat16)
    exported = AutoProcessor.from_pretrained(export_dir)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{processor.image_token}\nWhat colour is the square?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    a = processor(text=text, images=[image], return_tensors="pt").to(device)
    b = exported(text=text, images=[image], return_tensors="pt").to(device)
    for inputs in (a, b):
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    if not torch.equal(a["input_ids"], b["input_ids"]):
        sys.exit("gpu_check: the exported processor tokenises the prompt differently")
    with torch.no_grad():
        la = ours.to(device).eval()(**a).logits.float()
        lb = theirs.to(device).eval()(**b).logits.float()
    return float((la - lb).abs().max())


def format_table(rows: list[dict], device: str, tiny: bool, wall: dict, n_llm: int) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else ""

    lines = [
        f"gpu_check on {device} ({'tiny zoo parts' if tiny else 'SigLIP-so400m/14-384 + Qwen2-1.5B shape, random weights'}, "
        f"bf16 where CUDA; {n_llm / 1e9:.2f}B LLM parameters without embeddings for MFU)",
        "",
        "| phase | wall s | tokens/s | generation s | log-probs s | update s | peak memory MiB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['wall_s']:.1f} | {cell(r, 'tokens_per_s', '.0f')} | {cell(r, 'generation_s', '.1f')} | "
            f"{cell(r, 'logps_s', '.1f')} | {cell(r, 'update_s', '.1f')} | {cell(r, 'peak_mem_mb', '.0f')} | {r.get('mfu', '')} |"
        )
    lines += [
        "",
        "set-up: " + ", ".join(f"{k} {v:.1f}s" for k, v in wall.items() if k in ("parts", "assemble")),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
