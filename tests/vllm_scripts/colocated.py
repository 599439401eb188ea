"""Run by .venv-vllm's python (tests/test_vllm_backend.py): the colocated backend on one job file.

Reads a JSON job (model folder, prompts, image files, sampling options, a safetensors file of updated weights),
generates greedily with :class:`align.grpo.vllm_backend.VLLMColocated`, loads the updated weights through
``load_weights`` and generates again; prints one JSON line ``{"before": ..., "after": ..., "loaded": n}``.
Imports only the backend module (and what it imports), not the training stack.
"""

import json
import sys

from PIL import Image
from safetensors.torch import load_file

from align.grpo.sampler import SamplingSettings
from align.grpo.vllm_backend import VLLMColocated


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    backend = VLLMColocated(
        job["model_dir"], image_token_id=job["image_token_id"], dtype="float32", max_model_len=1024, seed=0
    )
    images = [Image.open(p) for p in job["images"]]

    def greedy() -> list[list[int]]:
        rollout = backend.generate(
            job["prompts"],
            None,
            job["images_per_prompt"],
            SamplingSettings(
                num_generations=1,
                max_new_tokens=job["max_new_tokens"],
                temperature=0.0,
                top_p=None,
                top_k=None,
                eos_token_ids=job["eos_token_ids"],
                pad_token_id=job["pad_token_id"],
            ),
            None,
            images=images,
        )
        return [ids[:n].tolist() for ids, n in zip(rollout.completion_ids, rollout.lengths, strict=True)]

    before = greedy()
    weights = load_file(job["updated"])
    loaded = backend.load_weights([[(name, t)] for name, t in weights.items()])
    print(json.dumps({"before": before, "after": greedy(), "loaded": loaded}))


if __name__ == "__main__":
    main(sys.argv[1])
