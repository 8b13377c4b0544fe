"""restic's include and exclude patterns, for saying what a restore would
write without writing it (restic 0.14 has no `restore --dry-run`). Pure.

As restic's filter package reads them: a pattern is split at "/" and
matched component by component (`*`, `?`, `[...]`, a backslash escaping
the next character; `**` spans any number of components); one that does
not start with "/" may match from any component on. A pattern that
matches a directory takes everything under it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache, lru_cache

_NEVER = re.compile(r"(?!)")


@lru_cache(maxsize=4096)
def _component(pattern: str) -> re.Pattern[str]:
    """One path component's pattern as a regular expression (one Go's
    matcher cannot use, such as the range [z-a], matches nothing)."""
    try:
        return re.compile(_translate(pattern))
    except re.error:
        return _NEVER


def _translate(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":  # Go's class: only ^ negates
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("^", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("^")
                body = re.sub(r"([\\\[\]^])", r"\\\1", body[1:] if negate else body)
                out.append("[" + ("^" if negate else "") + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + r"\Z"


def _split(pattern: str) -> tuple[str, ...]:
    parts = [p for p in pattern.split("/") if p]
    if not pattern.startswith("/"):
        parts = ["**", *parts]  # anywhere in the path
    return tuple(parts)


def _match(pattern: Sequence[str], path: Sequence[str]) -> bool:
    """Whether the pattern matches the path or one of its ancestors: each
    (pattern part, path part) pair decided once, so ** parts cost
    len(pattern) x len(path) steps, not exponentially many."""

    @cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return True  # the whole pattern matched a prefix: this is under it
        if pattern[i] == "**":
            return any(at(i + 1, k) for k in range(j, len(path) + 1))
        return j < len(path) and bool(_component(pattern[i]).match(path[j])) and at(i + 1, j + 1)

    return at(0, 0)


def matches(pattern: str, path: str) -> bool:
    """The pattern selects the path (itself, or a directory above it)."""
    return _match(_split(pattern), tuple(p for p in path.split("/") if p))


def selected(path: str, includes: Sequence[str] = (), excludes: Sequence[str] = ()) -> bool:
    """Whether a restore with these includes (none: everything) and
    excludes writes the file at `path`."""
    if excludes and any(matches(p, path) for p in excludes):
        return False
    return not includes or any(matches(p, path) for p in includes)
