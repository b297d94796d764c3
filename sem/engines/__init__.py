"""Engines that drive the core policies of ``sem.training``: ``lightning`` (the Lightning adapters)
and ``standalone`` (a plain-PyTorch loop). ``sem/run.py`` picks one from ``engine=``."""
