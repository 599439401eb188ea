"""Benchmark: the GRPO training forward + backward, naive vs shared prefix, with and without gradient checkpointing.

One log-prob pass of :func:`align.grpo.logps.completion_logps` and the backward of a token-mean loss, on a
random Llava built from configs (SigLIP tower: hidden 256, 4 layers, 64 image tokens; Qwen2: hidden 512,
8 layers, 8 heads / 2 K/V heads, MLP 1376, vocab 8192; fp32, training mode): B = 2 questions with an image
and ~100-token prompts, G = 8 completions of 128 tokens each. Each configuration runs in its own process:
the peak RSS growth over the pass (``ru_maxrss`` after it minus the RSS before it) is what the pass itself
needed; time is the best of ``--repeat`` passes, ``torch.set_num_threads(--threads)``.

    .venv/bin/python benchmarks/bench_prefix_checkpointing.py [--threads 1] [--repeat 3]

Results: the docstring of ``align/grpo/logps.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = ("naive", "shared", "naive_ckpt", "shared_ckpt")
B, G, NEW_TOKENS = 2, 8, 128


def build():
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        image_size=112,
        patch_size=14,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    text = Qwen2Config(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=8191,
        image_seq_length=64,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config).train()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(config: str, threads: int, repeat: int) -> dict:
    import torch

    from align.grpo.logps import Completions, completion_logps

    torch.set_num_threads(threads)
    model = build()
    if config.endswith("_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    image = [8191] * 64
    prompts = [
        [*torch.randint(0, 8000, (20,), generator=g).tolist(), *image, *range(5, 5 + 14 + 6 * q)]
        for q in range(B)
    ]
    pixels = torch.randn(B, 3, 112, 112, generator=g)
    ids = torch.randint(0, 8000, (B * G, NEW_TOKENS), generator=g)
    mask = torch.ones_like(ids)
    shared = config.startswith("shared")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        batch = Completions(prompts, pixels, [1] * B, ids, mask, G)
        logps = completion_logps(model, batch, temperature=1.0, shared_prefix=shared)
        ((logps * mask).sum() / mask.sum()).backward()

    model.zero_grad(set_to_none=True)
    before = rss_mb()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"best_s": min(times), "peak_growth_mb": peak - before, "prompt_tokens": [len(p) for p in prompts]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.threads, args.repeat)))
        return
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--child", config, "--threads", str(args.threads)]
        proc = subprocess.run([*cmd, "--repeat", str(args.repeat)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{config:12s} {result['best_s']:.3f} s  peak +{result['peak_growth_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
