"""Project exceptions: user errors name the field, the value received and the fix."""

from __future__ import annotations

import reprlib

# Values are quoted bounded: a user's value can be huge (a YAML alias bomb, a whole file read by mistake)
_SHORT = reprlib.Repr()
for _name, _limit in (("maxlevel", 2), ("maxdict", 4), ("maxlist", 4), ("maxtuple", 4), ("maxset", 4),
                      ("maxstring", 300), ("maxother", 200), ("maxlong", 40)):
    setattr(_SHORT, _name, _limit)


def short(value: object) -> str:
    """``repr(value)`` cut to about 200 characters, computed without walking more than a few elements."""
    text = _SHORT.repr(value)
    return text if len(text) <= 400 else text[:397] + "..."


class MinidiscError(Exception):
    """Base class of every error minidisc-ray raises on purpose."""


class UserInputError(MinidiscError):
    """Bad input from the user: a config field, a CLI flag, a file.

    The message is one line of the form ``FIELD: got VALUE; FIX``. The CLI prints it and exits 2.
    """

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}: got {short(value)}; {fix}")

    def __reduce__(self) -> tuple[type[UserInputError], tuple[str, object, str]]:
        # raised in a Ray worker, it travels back pickled: rebuilt from its three parts, not from the message
        plain = isinstance(self.value, (str, int, float, bool, type(None)))
        return (type(self), (self.field, self.value if plain else short(self.value), self.fix))


class ConfigError(MinidiscError):
    """Every problem found in a config, collected so the user sees them all at once."""

    def __init__(self, problems: list[UserInputError]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class JobFailed(MinidiscError):
    """The job cannot go on (for example every search trial failed); the CLI prints it and exits 1."""

    exit_code = 1
