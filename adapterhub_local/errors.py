"""The one error type for user mistakes: the CLI prints its message as one line, no traceback."""


class AhlError(Exception):
    """A problem with the user's input or store; the message names the problem and the fix."""


def has_type_of(value, default) -> bool:
    """Whether a user's value (a spec's TOML, a Python call's argument) is of its option's
    type, judged by the option's default: a whole number where a float belongs, never a bool
    where a number does (True is an int to Python)."""
    kind = type(default)
    allowed = (int, float) if kind is float else (kind,)
    return isinstance(value, allowed) and (kind is bool or not isinstance(value, bool))


def brief(error: BaseException, limit: int = 200) -> str:
    """Another library's error message for one line: its lines joined, cut at a word within
    `limit` characters ("..." where cut). Its first line alone can end mid-list ("one of: ")."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
