"""User-facing errors: one line, exit code 2, no traceback.

Library code raises `DarkslimError("file:line: what was found; what was expected")`;
every CLI's `main()` runs under `cli_main`, which prints that one line to stderr and exits 2.
"""
import sys


class DarkslimError(Exception):
    """Bad user input (a file, an option, a cfg): message names the place and what was expected."""


def cli_main(main, args):
    """Run `main(args)`; turn a DarkslimError into one stderr line and exit code 2."""
    try:
        return main(args)
    except DarkslimError as e:
        # raised in a DataLoader worker, torch re-raises it with the worker's traceback in the message:
        # keep only our own last line
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {msg.removeprefix('utils.errors.DarkslimError: ')}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path the user named cannot be read or written
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
