"""Multirun sweeps: ``job`` (thread budget per job, a guard that lets a sweep outlive a failing job),
``ledger`` (``sweep.json``, ``ledger.jsonl``), ``report`` and ``curves`` (what a sweep tells), ``callback``
(the Hydra callback that ends every sweep with its answer).

What a sweep leaves in ``multirun_outputs/<date>/<time>/`` besides one folder per job:

- ``sweep.json``: this invocation's command, the swept keys, launcher and sweeper (rewritten by each
  invocation into the same dir);
- ``ledger.jsonl``: one line per job and attempt (``sem.sweeps.report.job_record``); the latest line of a job wins;
- ``summary.md``, ``summary.csv``, ``curves.png``, ``best.yaml``: written by ``sem.sweeps.report`` at the end
  (``summary.md``/``.csv`` also after every job, so a killed sweep still has one). ``sem-report <dir>``
  regenerates them.

A job's identity is its task overrides minus execution settings (``resume``, ``threads``,
``dry_run``): re-running the same sweep command with ``hydra.sweep.dir=<dir> resume=auto`` maps every
job to its old folder, finished jobs return their recorded result and the rest resume from their
checkpoints. A folder that held a job with another identity is never resumed into.
"""
