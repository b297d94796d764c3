"""Train SEM: `python launch.py [group=option ...] [key=value ...]` (add -m to sweep). See README.md.
The same app as `python -m sem` (sem/__main__.py; configs in conf/)."""

from sem.__main__ import app
from sem.run import cli

if __name__ == "__main__":
    cli(app)
