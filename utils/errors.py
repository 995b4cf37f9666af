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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
