"""Run by .venv-vllm's python (tests/test_assembly_options.py): assembled folders served by vLLM as they are.

Reads a JSON job (``folders``: a list of ``{"model_dir", "prompt", "image"}``; ``max_new_tokens``), loads each
folder with ``vllm.LLM`` (no align code: vLLM picks the class from ``architectures``), generates greedily for the
prompt text and its image, and prints one JSON line ``{model_dir: {"prompt_ids", "ids", "logprobs"}}`` (the
log-probability of each generated token), or ``{"error": ...}`` for a folder vLLM does not load.
"""

import json
import sys

from PIL import Image
from vllm import LLM, SamplingParams


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    out = {}
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True, logprobs=0)
    for item in job["folders"]:
        try:
            llm = LLM(
                model=item["model_dir"],
                dtype="float32",
                max_model_len=1024,
                seed=0,
                limit_mm_per_prompt={"image": 1},
            )
        except Exception as err:  # reported to the test, which knows which folders vLLM refuses
            out[item["model_dir"]] = {"error": f"{type(err).__name__}: {err}"}
            continue
        request = {"prompt": item["prompt"], "multi_modal_data": {"image": Image.open(item["image"])}}
        request_output = llm.generate([request], params, use_tqdm=False)[0]
        result = request_output.outputs[0]
        out[item["model_dir"]] = {
            "prompt_ids": request_output.prompt_token_ids,
            "ids": list(result.token_ids),
            "logprobs": [
                step[token].logprob for step, token in zip(result.logprobs, result.token_ids, strict=True)
            ],
        }
        del llm
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
