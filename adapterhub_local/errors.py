"""The one error type for user mistakes: the CLI prints its message as one line, no traceback.
And what a user sees of other libraries: their errors on one line, their log lines quieted."""

import contextlib
import logging


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


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    """Within, these loggers pass `level` and above only; each gets its own level back after
    (a library leaves its user's logging as it was)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
