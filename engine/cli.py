"""What every entry point does with a mistake it can name: `error: ...` on one line, no traceback, and its exit status.

train.py, evaluate.py, predict.py, export.py, results.py, `python -m bench` and `python -m bench.sweep`
run their `main` through `run_main`; what is theirs alone (a predict.py file it cannot read, say)
they still say themselves, in the same form.
"""
import os
import sys

from pipelines import DataError

from .errors import SaveError, UserError


def run_main(main, argv=None, save_advice=""):
    """`main(argv)`'s exit status; a UserError or DataError (the user's to fix: flags, files, folders)
    is one line and 2, a SaveError (a full or read-only disk: what failed and where, the previous
    file intact) one line, `save_advice` after it, and 1. Under torchrun only rank 0 says a user's
    mistake, which every rank meets alike."""
    try:
        return main(argv)
    except (UserError, DataError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except SaveError as e:
        print(f"\nerror: {e}{save_advice}", file=sys.stderr)  # after a progress bar's line
        return 1
