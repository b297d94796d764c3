"""Exit codes and the exceptions a run ends with. A leaf: every layer may import it.

0 success; 1 training failure (``summary.json`` says why); 2 bad config or usage (one line per problem
on stderr, no traceback); 75 stopped by a signal (SIGTERM, SIGINT, SIGUSR1): during training after saving
the step in flight, in any other phase at once, with nothing to save (``sem.training.preemption``);
``resume=auto`` continues either way; 128 + the signal (130 for Ctrl-C) when a second one exits at once."""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later": resume=auto continues the run


class BadConfig(SystemExit):
    """Exit code 2 with the config's problems (already printed, one per line); a sweep job records
    them in its summary.json instead of ending the sweep (``sem.sweeps.job.sweep_job``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(EXIT_BAD_CONFIG)
        self.problems = problems


class RunFailed(RuntimeError):
    """A failure sem has put in its own words: the message is the whole line (no exception name)."""


class TrainingFailed(RuntimeError):
    """Raised in multirun so Hydra records the job as failed; a single run exits 1 instead."""


class SweepExit(SystemExit):
    """The sweep finished with failed (exit 1) or preempted (exit 75) jobs, named in the log and in
    ``summary.md``. Raised after the summary is written; ``sem.app.cli`` passes it through."""


def exit_if_invalid(problems: list[str]) -> None:
    """Print each problem as one ``config error:`` line on stderr and raise ``BadConfig`` (exit 2)."""
    if problems:
        for line in problems:
            print(f"config error: {line}", file=sys.stderr)
        raise BadConfig(problems)
