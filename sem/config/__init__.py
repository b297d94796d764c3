"""The config: ``groups`` (per config group: its schemas and its checks), ``schema`` (the root ``Config``),
``store`` (registration and resolvers), ``validate`` (the list of checks, every problem at once),
``components`` (checks by contract for classes sem has never seen) and ``job`` (what a job of a sweep is)."""
