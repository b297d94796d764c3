"""Train SEM: `python launch.py [group=option ...] [key=value ...]` (add -m to sweep). See README.md.
The same app as `python -m sem` (sem/app.py; configs in conf/)."""

from sem.training.preemption import stop_during_startup

if __name__ == "__main__":
    stop_during_startup()  # Ctrl-C or SIGTERM while torch, Hydra and Lightning load: exit 75, no traceback

from sem.app import app, cli  # noqa: E402 (after the stop signals: importing takes seconds)

if __name__ == "__main__":
    cli(app)
