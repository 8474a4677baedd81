"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit 2."""


class BnexpError(Exception):
    """Bad input or a missing resource, with a message that says what and how to fix it."""
