"""The plan of a run before it runs (``dry_run=true``): ``calendar`` (what happens at every step, a
timing probe), ``schedule`` (the plot) and ``dry_run`` (the job that prints it)."""
