"""rsscene's exceptions: a user's mistake, and the two ways a training run stops early."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): not a bug in rsscene.

    The CLI prints it in one line and exits 2.
    """


class Diverged(UserError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; ``last.pt`` was saved after the current step."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
