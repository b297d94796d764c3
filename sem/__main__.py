"""``python -m sem [group=option ...] [key=value ...]``: the same as ``python launch.py`` (the configs in
the checkout's ``conf/``). Extra DDP ranks of a job are started this way (``sem.engines.lightning.strategy``)."""

from sem.app import app, cli

if __name__ == "__main__":
    cli(app)
