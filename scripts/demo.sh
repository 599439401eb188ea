#!/usr/bin/env bash
# The embedded demo, on CPU with no network: set up (if needed), then `align run recipes/demo/pipeline.yaml`:
# prepare tiny pre-trained parts and synthetic tasks (cached in checkpoints/demo-cache after the first run),
# assemble -> projector -> SFT -> GRPO -> export, held-out accuracy after every stage, report.
# Re-running continues where it stopped; `rm -rf checkpoints/demo` starts the stages over.
# Extra arguments are pipeline overrides, e.g. `scripts/demo.sh output_dir=checkpoints/demo2`.
# recipes/tiny/pipeline.yaml is the seconds-long smoke run of the same machinery on untrained parts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
.venv/bin/align run recipes/demo/pipeline.yaml "$@"
run=$(.venv/bin/python -c 'import sys; from align.config import apply_overrides, read_yaml
print(apply_overrides(read_yaml("recipes/demo/pipeline.yaml"), sys.argv[1:])["output_dir"])' "$@")
test_dir=checkpoints/demo-cache/synth/test
question=$(head -n 1 "$test_dir/rl.jsonl" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["problem"])')
echo
echo "demo finished in $((SECONDS - start))s"
echo "report:  $run/report.md"
echo "plots:   $run/{projector,sft,grpo}/plots/*.png"
echo "model:   $run/export (a standard Hugging Face Llava folder; its README.md says how it was made)"
echo "try it:  .venv/bin/align chat $run/export --image $test_dir/images/000000.png --temperature 0 \\"
echo "           \"$question Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.\""
