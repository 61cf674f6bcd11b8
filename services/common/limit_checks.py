"""Checks of the public limits (limits.py) that more than one service makes,
so that a refusal reads the same whichever service makes it."""

from __future__ import annotations

from collections.abc import Sequence

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TIMEOUT_S


def at_most(what: str, count: int, limit: int) -> str:
    """The refusal of `count` items of a kind where at most `limit` are accepted."""
    return f"at most {limit} {what} are accepted, got {count}"


def timeout_problem(timeout_s: float) -> str | None:
    """Why a request's timeout is refused; None when it is within [0, MAX_TIMEOUT_S]."""
    if timeout_s < 0:
        return f"timeout must not be negative, got {timeout_s:.15g} s"
    if timeout_s > MAX_TIMEOUT_S:
        return f"timeout must be at most {MAX_TIMEOUT_S} s (a day), got {timeout_s:.15g} s"
    return None


def check_stop_strings(stop: Sequence[str]) -> None:
    """Refuse too many stop strings, an empty one, or one too long to hold back."""
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid_argument(at_most("stop strings", len(stop), MAX_STOP_STRINGS), field="stop")
    if any(not s for s in stop):
        raise invalid_argument("stop strings must not be empty", field="stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise invalid_argument(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}", field="stop")
