"""``python -m sem.evaluate``: kept at this path because it is a public command; the entry is ``sem.tools.evaluate``."""

from sem.tools.evaluate import cli

if __name__ == "__main__":
    cli()
