#!/usr/bin/env bash
# Set up (if needed) and run the embedded demo on CPU with no network: build the tiny offline zoo and the
# synthetic verifiable tasks, then `align run recipes/tiny/pipeline.yaml`: assemble -> projector -> SFT -> GRPO
# -> export, with held-out evaluation after every stage and a report. The zoo's parts are randomly initialised,
# so this shows the whole machinery end to end in about a minute, not learning (accuracy stays at 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
.venv/bin/align zoo --out checkpoints/zoo
[ -f checkpoints/synth/test/rl.jsonl ] || .venv/bin/align data synth --out checkpoints/synth --train 200 --test 50
.venv/bin/align run recipes/tiny/pipeline.yaml "$@"
run=checkpoints/tiny/pipeline
echo
echo "demo finished in $((SECONDS - start))s"
echo "report:  $run/report.md"
echo "plots:   $run/{projector,sft,grpo}/plots/*.png"
echo "model:   $run/export (a standard Hugging Face Llava folder; its README.md says how it was made)"
echo "try it:  .venv/bin/align chat $run/export --image checkpoints/synth/test/images/000000.png --temperature 0 \\"
echo "           \"How many circles are there in the image?\""
