"""Engines that drive the core policies of ``sem.training``: ``build`` (components -> an engine, with
``instantiate``'s ``make``), ``resume`` (where a run starts), ``fit`` (train to the end), ``final`` (the
final validation and scores, ``summary.json``), ``samples`` (``samples.txt``), ``standalone`` (a
plain-PyTorch loop) and ``lightning`` (the Lightning adapters). ``engine=`` picks one; both are an
``Engine`` (``base``), what the recipe drives."""

from sem.engines.base import Engine

__all__ = ["Engine"]
