"""A peer's text made safe for one log line: bounded, printable, and the client's own words out of a traceback."""

from __future__ import annotations

MAX_REASON = 500  # characters of a client's error message kept for the log and the history


def printable(text: str, limit: int, *, escaped: bool = False) -> str:
    """`text` cut to `limit` characters (and "..." if cut), control characters (newlines, terminal
    escapes) as "?", or with `escaped` as Python escapes (a newline as \\n: shows exactly what a
    peer sent), so that it can never write lines of its own into a log."""
    cut = text[:limit]
    shown = cut.encode("unicode_escape").decode("ascii") if escaped else "".join(
        c if c.isprintable() else "?" for c in cut)
    return shown + "..." if len(text) > limit else shown


def concise_reason(reason: str | None) -> str:
    """The client's own error message out of the traceback text Flower and Ray wrap around it; bounded."""
    if not reason:  # Flower's Error allows none
        return "no reason given"
    marker = "Message: "
    at = reason.rfind(marker)
    if at >= 0:
        tail = reason[at + len(marker): at + len(marker) + 4 * MAX_REASON].strip()
        first = tail.splitlines()[0].removesuffix("'>").strip() if tail else ""  # Ray wraps it in a repr
        return printable(first, MAX_REASON) if first else "no reason given"
    end = len(reason.rstrip())
    start = max(reason.rfind("\n", 0, end) + 1, end - 4 * MAX_REASON)
    last = reason[start:end].strip()
    return printable(last, MAX_REASON) if last else "no reason given"
