"""``python -m sem.sample``: kept at this path because it is a public command; the entry is ``sem.tools.sample``."""

from sem.tools.sample import cli

if __name__ == "__main__":
    cli()
