"""``python -m sem.report``: kept at this path because it is a public command (``sem-report``); the
entry is ``sem.sweeps.report``."""

import sys

from sem.sweeps.report import main

if __name__ == "__main__":
    sys.exit(main())
