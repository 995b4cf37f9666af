"""User-facing errors: one line, exit code 2, no traceback.

Library code raises `DarkslimError("file:line: what was found; what was expected")`;
every CLI's `main()` runs under `cli_main`, which prints that one line to stderr and exits 2.
"""
import re
import sys

_PLACEHOLDER = re.compile(r'\{([a-z_][a-z0-9_]*)\}')   # a parameter named in a message template


class DarkslimError(Exception):
    """Bad user input (a file, an option, a cfg): message names the place and what was expected.

    `param` (optional keyword): the library parameter the message is about (e.g. 'sr_local'), for a front end
    that shows it under its own name (train.py: its flag); None when the error is not about one parameter."""

    def __init__(self, *args, param=None):
        super().__init__(*args)
        self.param = param

    def __str__(self):
        return self.shown({})

    def shown(self, names):
        """The message with each parameter placeholder `{name}` written as names.get(name, name): a library
        caller reads parameter names, a CLI passes its flags (e.g. {'percent': '--percent'})."""
        return _PLACEHOLDER.sub(lambda m: names.get(m.group(1), m.group(1)), super().__str__())


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
