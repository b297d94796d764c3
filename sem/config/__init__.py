"""The config: ``schema`` (a dataclass per group option), ``store`` (registration and resolvers),
``validate`` (value and cross-field checks, every problem at once) and ``job`` (what a job of a sweep is)."""
