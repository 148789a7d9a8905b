"""Text of error messages: values a client sent (:func:`shown`), the config field a check names
(:func:`prefixed`), and an error's first line (:func:`first_line`).

``str`` or ``repr`` of a client's value can raise (Python refuses to print an integer of more than 4,300
digits, and an object's ``__str__`` may fail) or be huge; a server that formats such a value in an error
message must not crash on it. :func:`shown` is the one formatter for client-sent values."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

BIG_INT_BITS = 64  # integers wider than this are named by their width, not printed
MAX_CLIENT_TEXT = 1000  # characters of a client's failure or rejection reason that are logged and stored


def shown(value: object, limit: int = 80, *, as_repr: bool = True) -> str:
    """``repr(value)`` (or ``str`` with ``as_repr=False``) cut to about ``limit`` characters (head and tail
    around a note of how much was cut); an integer wider than 64 bits is shown by its width, and a value
    that cannot be printed by its type."""
    if isinstance(value, int) and not isinstance(value, bool) and int.bit_length(value) > BIG_INT_BITS:
        return f"<an integer of {int.bit_length(value)} bits>"  # int's own method: a subclass cannot raise
    try:
        text = repr(value) if as_repr else str(value)
    except Exception:  # noqa: BLE001 - whatever a value's __repr__ raises, the message still reads
        return f"<an unprintable {type(value).__name__}>"
    if len(text) <= limit:
        return text
    half = max(1, limit // 2)
    return f"{text[:half]} …[{len(text) - 2 * half} characters cut]… {text[-half:]}"


def first_line(what: object) -> str:
    """The first non-blank line of ``str(what)``, stripped (an exception without a message: its type's name)."""
    line = next((ln.strip() for ln in str(what).splitlines() if ln.strip()), "")
    return line or (type(what).__name__ if isinstance(what, BaseException) else "")


def last_line(text: str) -> str:
    """The last line of ``text`` after stripping it (``text`` itself when that leaves none)."""
    return (text.strip().splitlines() or [text])[-1]


@contextmanager
def prefixed(section: str, fields: Collection[str]) -> Iterator[None]:
    """A ValueError raised inside whose message begins with one of ``fields`` (a builder's ``beta must be in
    [0, 1)``) comes out as ``section.beta must be in [0, 1)``, naming the field as a config does; any other
    propagates as it is."""
    try:
        yield
    except ValueError as err:
        if str(err).split(" ", 1)[0] in fields:
            raise ValueError(f"{section}.{err}") from None
        raise
