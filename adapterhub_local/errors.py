"""The one error type for user mistakes: the CLI prints its message as one line, no traceback."""


class AhlError(Exception):
    """A problem with the user's input or store; the message names the problem and the fix."""
