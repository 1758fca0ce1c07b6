"""The one base class of the errors a user can fix (a wrong flag, a missing or malformed file, a busy folder).

Each module's expected errors subclass `UserError`; cli.run_command prints any of them as one line naming the
thing and the fix, with exit status 2. Every other exception is a bug and keeps its traceback.
"""
import signal


class UserError(Exception):
    """An error the user can fix by changing a flag or a file; its message names the thing and the fix."""


class TrainingDiverged(UserError, FloatingPointError):
    """A training step whose loss is not finite (NaN or infinite): the run stops before it changes a weight."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C, or SIGTERM from a job scheduler: the program stops cleanly, and its message says what was saved
    and how to continue (cli.run_command prints it as one line, and exits with 128 + `signal`)."""

    def __init__(self, message: str = "", signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal = signal_number
