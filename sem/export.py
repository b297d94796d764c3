"""``python -m sem.export``: kept at this path because it is a public command; the entry is ``sem.tools.export``."""

from sem.tools.export import cli

if __name__ == "__main__":
    cli()
