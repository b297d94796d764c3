"""Engines that drive the core policies of ``sem.training``: ``build`` (components -> an engine, with
``instantiate``'s ``make``), ``resume`` (where a run starts), ``fit`` (fit, final validation, samples),
``standalone`` (a plain-PyTorch loop) and ``lightning`` (the Lightning adapters). ``engine=`` picks one."""
