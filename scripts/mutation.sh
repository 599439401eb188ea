#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the modules that decide numbers. Not part of CI: a full pass takes hours.
#
#   bash scripts/mutation.sh [MODULE ...]     # e.g. grpo/loss rewards/extract stages/sft; no argument: ORDER below
#
# Each MODULE is one shard: a folder under .mutation/<shard>/ holding a copy of align/ and tests/ and a
# pyproject.toml with a [tool.mutmut] section that mutates only that module's files and runs only the test
# files that exercise it. mutmut records which of those tests call each function (its stats run) and runs,
# for each mutant, only the tests that reached the mutated function. Results: .mutation/<shard>/result.txt
# (one "mutant: status" line each), survivors.diff (the diff of each mutant not killed) and summary.txt (the
# counts and the wall time).
# Environment: PYTHON (default .venv/bin/python, which needs the dev extra: mutmut), MUTMUT_CHILDREN
# (parallel mutants, default 2), MUTATION_DIR (default .mutation), MUTATION_RESUME=1 (a shard stopped before
# the end goes on from where it stopped instead of starting over).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PYTHON=${PYTHON:-$repo/.venv/bin/python}
CHILDREN=${MUTMUT_CHILDREN:-2}
OUTDIR=${MUTATION_DIR:-$repo/.mutation}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one torch thread per mutant process: the mutants run side by side on few cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# MODULE -> the files mutated (globs under align/) | the test files that exercise them.
# Left out: align/grpo/vllm_backend.py, vllm_worker.py (run only inside the vLLM server process, whose tests
# need .venv-vllm and take minutes) and align/grpo/decoder.py (its tests are the vLLM parity runs).
declare -A FILES TESTS MARKS
FILES[grpo/loss]="align/grpo/loss.py"
TESTS[grpo/loss]="tests/test_mutation_gaps.py tests/test_grpo_loss.py tests/test_grpo_variants.py tests/test_vllm_importance_sampling.py"
FILES[rewards]="align/rewards/*"
TESTS[rewards]="tests/test_mutation_gaps.py tests/test_rewards.py tests/test_rewards_published.py tests/test_gold_self_check.py tests/test_bad_rows.py tests/test_data_check.py"
# rewards/ is ~1600 mutants: its files are also shards of their own (rewards/init is rewards/__init__.py)
for f in extract mathcheck answers init boxes overlong reasoning detection; do
  FILES[rewards/$f]="align/rewards/${f/#init/__init__}.py"
  TESTS[rewards/$f]="${TESTS[rewards]}"
done
# the soft overlong penalty's tables and its parity with TRL live beside the other DAPO pieces
TESTS[rewards/overlong]+=" tests/test_grpo_variants.py"
TESTS[rewards]+=" tests/test_grpo_variants.py"
FILES[data/batching]="align/data/batching.py"
TESTS[data/batching]="tests/test_mutation_gaps.py tests/test_batching.py tests/test_encode.py"
FILES[data/encode]="align/data/encode.py"
TESTS[data/encode]="tests/test_mutation_gaps.py tests/test_encode.py tests/test_batching.py"
FILES[grpo/rollout]="align/grpo/rollout.py"
TESTS[grpo/rollout]="tests/test_mutation_gaps.py tests/test_grpo_wiring.py tests/test_grpo_stage.py tests/test_grpo_variants.py"
FILES[checkpoint]="align/checkpoint.py"
TESTS[checkpoint]="tests/test_mutation_gaps.py tests/test_model_folders.py tests/test_stage_resume.py"
FILES[export]="align/export.py"
TESTS[export]="tests/test_mutation_gaps.py tests/test_export.py tests/test_export_options.py"
FILES[grpo/sampler]="align/grpo/sampler.py"
TESTS[grpo/sampler]="tests/test_mutation_gaps.py tests/test_sampler.py tests/test_grpo_prefix_checkpointing.py"
FILES[grpo/logps]="align/grpo/logps.py"
TESTS[grpo/logps]="tests/test_mutation_gaps.py tests/test_sampler.py tests/test_grpo_prefix_checkpointing.py tests/test_grpo_loss.py"
FILES[stages]="align/stages/*"
TESTS[stages]="tests/test_mutation_gaps.py tests/test_stage_gaps.py tests/test_run_control.py tests/test_grpo_wiring.py tests/test_sft_wiring.py tests/test_stages.py tests/test_grpo_stage.py tests/test_grpo_variants.py"
# stages/ is ~2000 mutants: its files are also shards of their own, each with the tests that run it
FILES[stages/grpo]="align/stages/grpo.py"
TESTS[stages/grpo]="tests/test_mutation_gaps.py tests/test_stage_gaps.py tests/test_grpo_wiring.py tests/test_grpo_stage.py tests/test_grpo_variants.py"
FILES[stages/sft]="align/stages/sft.py align/stages/projector.py"
TESTS[stages/sft]="tests/test_mutation_gaps.py tests/test_stage_gaps.py tests/test_run_control.py tests/test_sft_wiring.py tests/test_stages.py"
FILES[stages/common]="align/stages/common.py"
TESTS[stages/common]="${TESTS[stages]}"
# -m per module (default "not distributed"): the pure-arithmetic modules leave out the "slow" end-to-end CLI
# runs too. Their mutants must die in unit tests; one stage run costs seconds per mutant, hundreds of times.
for m in grpo/loss rewards rewards/extract rewards/mathcheck rewards/answers rewards/init rewards/boxes \
  rewards/overlong rewards/reasoning rewards/detection data/batching data/encode; do MARKS[$m]="not distributed and not slow"; done
ORDER="grpo/loss rewards data/batching data/encode grpo/rollout checkpoint export grpo/sampler grpo/logps stages"

"$PYTHON" -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: pip install -e '.[dev]'"; exit 1; }
modules=("$@")
[ ${#modules[@]} -gt 0 ] || read -ra modules <<< "$ORDER"
for m in "${modules[@]}"; do
  [ -n "${FILES[$m]:-}" ] || { echo "unknown module $m (one of: $ORDER, rewards/FILE or stages/{grpo,sft,common})"; exit 2; }
done

# one tiny zoo for every mutant of every shard (tests/conftest.py reads ALIGN_TEST_ZOO): building it costs
# seconds, which each of thousands of mutants would pay again
mkdir -p "$OUTDIR"
if [ ! -f "$OUTDIR/zoo/.complete" ]; then
  rm -rf "$OUTDIR/zoo"
  "$PYTHON" -c "import sys; from align.zoo import build_zoo; build_zoo(sys.argv[1])" "$OUTDIR/zoo" > /dev/null
  touch "$OUTDIR/zoo/.complete"
fi
export ALIGN_TEST_ZOO="$OUTDIR/zoo"

toml_list() { local out="" x; for x in "$@"; do out+="\"$x\", "; done; echo "[${out%, }]"; }

# a fresh shard for module $1 in folder $2: copies of the code and tests, and the [tool.mutmut] section
new_shard() {
  local m=$1 shard=$2
  rm -rf "$shard" && mkdir -p "$shard"
  cp -r align tests recipes scripts "$shard/"
  {
    cat pyproject.toml
    echo
    echo "[tool.mutmut]"
    echo "source_paths = [\"align\"]"
    # the tests read the recipes (recipes/tiny/*.yaml) and a few scripts from the repository root
    echo "also_copy = [\"recipes\", \"scripts\"]"
    echo "only_mutate = $(toml_list "${files[@]}")"
    # never the vLLM, golden or 2-process tests: minutes each
    echo "pytest_add_cli_args_test_selection = $(toml_list "${tests[@]}" -m "${MARKS[$m]:-not distributed}")"
    echo "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\", \"-x\", \"-q\"]"
    # torch is not fork-safe once it has run: fork each mutant from a server that only imported the tests
    echo "process_isolation = \"forkserver\""
    echo "use_git_change_detection = false"
  } > "$shard/pyproject.toml"
  echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- align tests || echo ' (with uncommitted changes)')" \
    > "$shard/commit.txt"
}

failed=()
for m in "${modules[@]}"; do
  shard="$OUTDIR/${m//\//_}"
  read -ra files <<< "${FILES[$m]}"
  read -ra tests <<< "${TESTS[$m]}"
  if [ "${MUTATION_RESUME:-0}" = 1 ] && [ -f "$shard/mutants/mutmut-stats.json" ]; then
    # mutmut keeps each checked mutant's result in the shard and goes on with the rest, on the shard's own
    # copy of the code and tests (a run stopped, e.g. at the end of a working session, is not started over)
    echo "== $m: resuming $shard"
    commit="$(cat "$shard/commit.txt") (resumed $(date -u +%Y-%m-%dT%H:%MZ))"
  else
    new_shard "$m" "$shard"
    commit="$(cat "$shard/commit.txt")"
  fi
  started=$(date -u +%Y-%m-%dT%H:%MZ)
  # the shard's own selection (a resumed shard keeps the one it started with)
  selection=$(sed -n 's/^pytest_add_cli_args_test_selection = //p' "$shard/pyproject.toml")
  echo "== $m: mutating ${files[*]} with $selection"
  start=$(date +%s)
  (cd "$shard" && nice -n 19 "$PYTHON" -m mutmut run --max-children "$CHILDREN") > "$shard/run.log" 2>&1 \
    || { echo "mutmut failed on $m (log: $shard/run.log); going on with the next module"; failed+=("$m"); continue; }
  wall=$(( $(date +%s) - start ))
  (cd "$shard" && "$PYTHON" -m mutmut results --all true) > "$shard/result.txt"
  # the diff of every mutant that was not killed, for docs/testing.md's list of survivors
  for k in $(grep -v ': killed$' "$shard/result.txt" | sed 's/^ *//; s/: .*//'); do
    (cd "$shard" && "$PYTHON" -m mutmut show "$k")
  done > "$shard/survivors.diff" 2>&1
  {
    echo "module: $m"
    echo "tests: $selection"
    echo "commit: $commit"
    echo "started: $started"
    echo "wall_s: $wall"
    for s in killed survived timeout suspicious "no tests" skipped segfault "not checked" "caught by type check" "check was interrupted by user"; do
      echo "$s: $(grep -c ": $s\$" "$shard/result.txt" || true)"
    done
  } > "$shard/summary.txt"
  cat "$shard/summary.txt"
done
[ ${#failed[@]} -eq 0 ] || { echo "mutmut failed on: ${failed[*]}"; exit 1; }
