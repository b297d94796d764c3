"""The job's side of an Optuna trial: the sweeper (``hydra_plugins.sem_optuna_sweeper``) launches each
trial with ``SEM_OPTUNA_TRIAL`` (the trial's id), ``SEM_OPTUNA_STUDY`` and ``SEM_OPTUNA_STORAGE`` in the
job's environment (``hydra.job.env_set``); the job reports val/bpb at each of its validations to that
trial and asks the study's pruner whether to stop (``sem.training.pruning``). Only the sweeper tells the
study how a trial ended."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sem.training.pruning import Reports

log = logging.getLogger("sem.sweep")

# what the sweeper sets in each job's environment (hydra.job.env_set) and the job reads
ENV_TRIAL, ENV_STUDY, ENV_STORAGE = "SEM_OPTUNA_TRIAL", "SEM_OPTUNA_STUDY", "SEM_OPTUNA_STORAGE"
JOURNAL = "journal:"
JOURNAL_FILE = "optuna.journal"  # the default storage, in the sweep dir: a file, no server, safe for parallel jobs


def storage_spec(storage: str | None, sweep_dir: str | Path) -> str:
    """The sweeper's ``storage`` as the sweeper and its jobs open it: null -> ``journal:<sweep dir>/
    optuna.journal``; a ``journal:`` path made absolute; an Optuna storage URL as it is."""
    if storage is None or str(storage).strip() == "":
        return JOURNAL + str((Path(sweep_dir) / JOURNAL_FILE).resolve())
    storage = str(storage)
    if storage.startswith(JOURNAL):
        return JOURNAL + str(Path(storage[len(JOURNAL):]).expanduser().resolve())
    return storage


def open_storage(spec: str) -> Any:
    """An Optuna storage for ``spec``: ``journal:<path>`` (a ``JournalStorage`` on one append-only, locked
    file: safe for jobs in other processes or on other nodes of a shared file system) or a storage URL
    (``sqlite:///...``, ``postgresql://...``: needs SQLAlchemy)."""
    import optuna

    if spec.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(spec[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.get_storage(spec)


class OptunaJudge:
    """``sem.training.pruning.Judge`` for the trial this job runs: ``report`` records the value at the step
    in the study and returns the pruner's verdict."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    @classmethod
    def from_env(cls, pruner_cfg: Any = None) -> OptunaJudge | None:
        """The judge of the trial named in this process's environment, with the pruner the sweep's config
        describes (``hydra.sweeper.pruner``); None outside an Optuna sweep."""
        trial_id = os.environ.get(ENV_TRIAL)
        if trial_id is None:
            return None
        import optuna
        from hydra.utils import instantiate

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = instantiate(pruner_cfg) if pruner_cfg is not None else optuna.pruners.NopPruner()
        study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=open_storage(os.environ[ENV_STORAGE]),
                                  pruner=pruner)
        log.info("Optuna trial %s of study %r: val/bpb reported at each validation (pruner %s)", trial_id,
                 study.study_name, type(pruner).__name__)
        return cls(optuna.trial.Trial(study, int(trial_id)))

    def report(self, step: int, value: float) -> bool:
        self.trial.report(value, step)
        return bool(self.trial.should_prune())


def trial_reports(hc: Any) -> Reports | None:
    """The reports of the Optuna trial this process runs (``SEM_OPTUNA_TRIAL`` set by the sweeper), or None.
    Every rank of a trial gets one (the stop is decided together: a rank without would leave the others in
    the verdict's broadcast); only global rank 0's reports to the study. ``hc``: the job's HydraConfig."""
    if os.environ.get(ENV_TRIAL) is None:
        return None
    from omegaconf import OmegaConf

    from sem.record.summary import is_global_zero

    pruner = OmegaConf.select(hc, "sweeper.pruner")
    return Reports(OptunaJudge.from_env(pruner) if is_global_zero() else None)
