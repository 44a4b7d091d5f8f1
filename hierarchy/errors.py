"""The one base type of every error this project raises on purpose (bad input, missing files, refusals)."""


class HmoeError(Exception):
    """A failure a user can act on: the message says what was wrong and what was expected.

    Command lines print it as one line; anything else (a programming error) keeps its traceback."""


class UsageError(HmoeError, ValueError):
    """A setting, flag or request that is not valid (an unknown name, a value out of range)."""


class UnknownNameError(HmoeError, KeyError):
    """A node, expert or other name that does not exist; the message lists what does."""

    def __str__(self) -> str:   # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""
