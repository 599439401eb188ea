"""The one error type for user-facing problems that are not recipe problems (data rows, model folders).

Raise :class:`AlignError` with a message that names the file, row or key and the numbers involved;
the CLI prints it as one line and exits 2.
"""


class AlignError(Exception):
    """A problem the user can fix, reported without a traceback."""


class StageInterrupted(Exception):
    """SIGINT/SIGTERM stopped a stage at a step boundary, after it saved a checkpoint: the CLI prints the one
    line (where it stopped, the checkpoint) with the command that continues, and exits 130."""
