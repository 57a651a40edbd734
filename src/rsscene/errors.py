"""The one exception type for a user's mistake: the CLI prints it in one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): not a bug in rsscene."""
