"""The one error type users see.

A ``SegnestError`` carries a single line: what is wrong, which file or flag, and how to
fix it. The CLI prints it without a traceback (``--debug`` shows the traceback).
"""


class SegnestError(Exception):
    """A user-facing error: bad input, bad configuration or a missing file."""


# Exit status of a command, as the CLI returns it: 2 for a SegnestError; a run stopped on
# request exits with 128 + the signal's number, as a shell reports a process it killed, so
# ``segnest train ... && segnest export ...`` never goes on with a half-trained model.
EXIT_ERROR = 2
STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class RunStopped(Exception):
    """A run that stopped on request (Ctrl-C, SIGTERM) after saving its checkpoint."""

    def __init__(self, signal_name: str | None) -> None:
        super().__init__(signal_name or "SIGINT")
        self.signal_name = signal_name or "SIGINT"

    @property
    def exit_code(self) -> int:
        return STOP_EXIT_CODES.get(self.signal_name, STOP_EXIT_CODES["SIGINT"])
