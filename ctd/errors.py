"""The one exception type users see: a message that names the problem and the fix."""


class CtdError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with status 2."""
