"""``python -m sem [group=option ...] [key=value ...]``: the same as ``python launch.py`` (the configs in
the checkout's ``conf/``). Extra DDP ranks of a job are started this way (``sem.engines.lightning.strategy``)."""

from sem.training.preemption import stop_during_startup

if __name__ == "__main__":
    stop_during_startup()  # Ctrl-C or SIGTERM while torch, Hydra and Lightning load: exit 75, no traceback

from sem.app import app, cli  # noqa: E402 (after the stop signals: importing takes seconds)

if __name__ == "__main__":
    cli(app)
