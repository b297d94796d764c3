"""Train SEM: `python launch.py [group=option ...] [key=value ...]` (add -m to sweep). See README.md.
The same app as `python -m sem` (sem/app.py; configs in conf/)."""

from sem.app import app, cli

if __name__ == "__main__":
    cli(app)
