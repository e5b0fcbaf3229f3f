"""The one error type users see.

A ``SegnestError`` carries a single line: what is wrong, which file or flag, and how to
fix it. The CLI prints it without a traceback (``--debug`` shows the traceback).
"""


class SegnestError(Exception):
    """A user-facing error: bad input, bad configuration or a missing file."""
