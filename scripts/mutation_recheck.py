"""Run every mutant a mutation shard left alive against the shard's whole test selection.

mutmut 3 tries each mutant only against the tests that called the mutated function in its stats run, and it
credits the calls a module-scoped fixture makes while it is set up to one test only: a mutant of a function the
other tests of that module reach through the fixture is then tried against that one test, and survives though
the module's other tests kill it (docs/testing.md shows such cases). This script takes each mutant the shard
did not kill (survived, "no tests", timeout) and runs the shard's test selection (its files and ``-m``) against
it, in the shard's ``mutants/`` folder with ``MUTANT_UNDER_TEST`` naming it, as mutmut itself switches mutants.
The environment variable reaches subprocesses too, so tests that run the CLI in a child process count.

    .venv/bin/python scripts/mutation_recheck.py .mutation/rewards_init [--jobs 2] [--timeout 900]
    cp tests/test_mutation_gaps.py .mutation/rewards_init/mutants/tests/    # after writing tests for the rest
    .venv/bin/python scripts/mutation_recheck.py .mutation/rewards_init --from recheck.txt --out recheck2.txt \
        --only tests/test_mutation_gaps.py                                   # the one file that changed

First the selection runs once with no mutant (it must pass); then each mutant, ``-x`` so a killed one stops at
its first failing test. Writes ``<shard>/recheck.txt`` ("mutant: killed | survived | timeout", in result.txt's
order) and prints the counts. Environment: ALIGN_TEST_ZOO as for scripts/mutation.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NOT_KILLED = ("survived", "no tests", "timeout", "suspicious", "not checked")


def selection(shard: Path) -> list[str]:
    """The pytest arguments mutmut used to choose tests: the shard's test files and its ``-m`` expression."""
    key = "pytest_add_cli_args_test_selection = "
    # scripts/mutation.sh writes it as one line, a list of double-quoted strings: JSON as well as TOML
    line = next(x for x in (shard / "pyproject.toml").read_text().splitlines() if x.startswith(key))
    return list(json.loads(line.removeprefix(key)))


def alive(results: Path) -> list[str]:
    """The mutants of a results file ("name: status" lines) that were not killed, in its order."""
    names = []
    for line in results.read_text().splitlines():
        name, _, status = line.strip().rpartition(": ")
        if status in NOT_KILLED:
            names.append(name)
    return names


def run_tests(shard: Path, args: list[str], mutant: str, timeout: float) -> str:
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(
            command, cwd=shard / "mutants", env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "shard", type=Path, help="a shard folder of scripts/mutation.sh, e.g. .mutation/export"
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested side by side (default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    parser.add_argument(
        "--from",
        dest="source",
        default="result.txt",
        help="the shard's file of mutants to retry: result.txt (mutmut's, the default) or an earlier recheck's "
        "output, after tests were added to the shard's mutants/tests/",
    )
    parser.add_argument("--out", default="recheck.txt", help="output file in the shard (default recheck.txt)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="TEST_FILE",
        help="run these of the selection's test files only (with its -m): for a --from recheck, whose mutants the "
        "other files already failed to kill, when only these files gained tests",
    )
    args = parser.parse_args()
    shard = args.shard.resolve()
    tests = selection(shard)
    if args.only:
        marks = tests[tests.index("-m") :] if "-m" in tests else []
        tests = [*args.only, *marks]
    start = time.monotonic()
    if run_tests(shard, tests, "", args.timeout) != "survived":
        print(f"the test selection fails without a mutant in {shard / 'mutants'}: fix that first")
        return 1
    baseline = time.monotonic() - start
    names = alive(shard / args.source)
    print(
        f"{len(names)} mutants not killed; the selection takes {baseline:.0f} s without a mutant", flush=True
    )

    def one(name: str) -> str:
        result = run_tests(shard, tests, name, args.timeout)
        print(f"{name}: {result}", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, names))
    (shard / args.out).write_text("".join(f"{n}: {r}\n" for n, r in zip(names, results, strict=True)))
    counts = {r: results.count(r) for r in ("killed", "survived", "timeout")}
    print(f"recheck of {len(names)} in {time.monotonic() - start:.0f} s: {counts} -> {shard / args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
