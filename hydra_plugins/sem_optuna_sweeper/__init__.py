"""sem's Optuna sweeper for Hydra (``hydra/sweeper=optuna``, Optuna >= 4): ``n_jobs`` trials in flight
with no batch barrier, pruning through the jobs' intermediate reports, the study kept in a journal file
in the sweep dir. ``config`` registers the configs, ``optuna_sweeper`` is the plugin class, ``storage``
opens a study's storage string (the sweeper's and its jobs')."""
