"""The one error type for user mistakes: the CLI prints its message as one line, no traceback."""


class AhlError(Exception):
    """A problem with the user's input or store; the message names the problem and the fix."""


def brief(error: BaseException, limit: int = 200) -> str:
    """Another library's error message for one line: its lines joined, cut at a word within
    `limit` characters ("..." where cut). Its first line alone can end mid-list ("one of: ")."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
