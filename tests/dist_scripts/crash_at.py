"""Run ``align`` in this process and ``kill -9`` it at a chosen point: the victim of tests/test_crash_safety.py.

    python tests/dist_scripts/crash_at.py POINT N align-args...

POINT says where the process dies, N which occurrence:

* ``step``: in optimizer step N, after its backward and before the weights move (metrics of step N unwritten);
* ``weights``: inside the N-th model-weights write (a checkpoint's model/, or the final model), with half of the
  safetensors file on disk;
* ``state``: inside the N-th ``torch.save`` of a training state (``state.tmp/``), with half of the file on disk;
* ``pause``: at optimizer step N, touch ``$CRASH_AT_PAUSED`` and sleep until killed (a run that holds its folder).

SIGKILL leaves no chance to clean up: no ``finally`` runs, no file is closed, exactly like an OOM kill.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

import align.checkpoint
import align.engine
from align.cli import main


def _die_with_half_written(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    seen = {"count": 0}

    def nth() -> bool:
        seen["count"] += 1
        return seen["count"] == n

    if point in ("step", "pause"):
        step = align.engine.Engine.step

        def dying_step(self):
            if self.at_boundary and self.optimizer_steps == n - 1:
                if point == "pause":
                    Path(os.environ["CRASH_AT_PAUSED"]).touch()
                    time.sleep(600)
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self)

        align.engine.Engine.step = dying_step
    elif point == "weights":
        write = align.checkpoint.write_weights

        def dying_write(state_dict, folder, *args, **kwargs):
            out = write(state_dict, folder, *args, **kwargs)
            if nth():
                _die_with_half_written(
                    max(Path(folder).glob("*.safetensors"), key=lambda p: p.stat().st_size)
                )
            return out

        align.checkpoint.write_weights = dying_write
    elif point == "state":
        save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if isinstance(f, (str, Path)) and Path(f).parent.name == "state.tmp" and nth():
                _die_with_half_written(Path(f))

        torch.save = dying_save
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
