"""A stop signal in every phase of a run, through launch.py as a user (Ctrl-C) or a scheduler (SIGTERM)
sends it: imports, Hydra's set-up, the token cache build, the DDP rendezvous, Lightning's sanity check,
training (one process and two), the final validation, sampling and a sweep between two jobs.

Each ends every process of the run (found by a marker in their environment, so a rank in a session of
its own counts) with exit 75, leaves no partial file (no temporary, torn JSON line or checkpoint that
does not verify) and a ``summary.json`` saying what happened; a second Ctrl-C exits at once (130).
The trials are ``bench.signals``'s (``python -m bench.signals`` prints the table with timings); the
bound on the time to exit is generous here (the machine is shared), the 10 s target is the bench's.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bench.signals import PHASES, Outcome, run_trial
from sem.data.cache import _remove_stale_tmp

EXIT_S = 20  # signal -> every process of the run gone (bench.signals measures against 10 s)

# summary.json statuses a stop leaves, per phase: none before the run's guard (Hydra's set-up, imports:
# nothing written but Hydra's own files); preempted from then on; completed when only the samples were
# left to write (summary.json was final already). A sweep stopped after job 0: job 0's summary.
STATUS = {"imports": "none", "setup": "none", "token_cache": "preempted", "ddp_rendezvous": "preempted",
          "sanity_check": "preempted", "training": "preempted", "ddp_training": "preempted",
          "final_validation": "preempted", "sampling": "completed", "sweep_between_jobs": "completed"}
FAST = {("imports", "SIGTERM"), ("imports", "SIGINT")}  # about 2 s each
TWICE = ("token_cache", "ddp_rendezvous", "training", "final_validation")  # a second Ctrl-C


def _cases() -> list:
    cases = [(p, s) for p in PHASES for s in ("SIGTERM", "SIGINT")] + [(p, "SIGINTx2") for p in TWICE]
    return [pytest.param(p, s, id=f"{p}-{s}", marks=() if (p, s) in FAST else pytest.mark.slow) for p, s in cases]


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder for the trials and the token cache they share (built by the first that needs it)."""
    return tmp_path_factory.mktemp("signals"), tmp_path_factory.mktemp("signals_cache")


@pytest.mark.parametrize(("phase", "sig"), _cases())
def test_a_stop_signal_ends_the_run_cleanly(phase: str, sig: str, trials: tuple[Path, Path]) -> None:
    root, cache = trials
    o: Outcome = run_trial(PHASES[phase], sig, root, cache, timeout=60)
    print(o)
    assert not o.phase_missed, f"the run was past {phase} when the signal landed: {o}"
    assert o.all_gone_s is not None and o.all_gone_s < EXIT_S, o
    assert o.survivors == 0, o
    assert not o.traceback, o
    if sig == "SIGINTx2":
        # 130 (or death by SIGINT in the last milliseconds of exiting: 130 to a shell), or 75 when the
        # first stop ended the run before the second arrived
        assert o.returncode in ((130, -signal.SIGINT, 75) if o.second_sent else (75,)), o
        # exiting at once may leave a temporary (never under a final name): the next build removes it
        assert all(p.startswith("partial: ") for p in o.left), o
        for leftover in Path(root).glob("token_cache-SIGINTx2-*/cache"):
            _remove_stale_tmp(leftover)
            assert not list(leftover.glob(".tmp-tokens-*")), "the next build removes a dead builder's dir"
        return
    assert o.returncode == 75, o
    assert o.left == [], o
    assert o.status == STATUS[phase], o
    if phase == "sampling":
        assert "samples.txt" not in o.files, o
    if phase == "sweep_between_jobs":
        assert "ledger completed,not_started,not_started" in o.files, o
