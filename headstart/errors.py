"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""


class UserError(ValueError):
    """Bad input, settings or environment; the message names the file or setting and the fix."""
