"""Host labels and the selectors that pick hosts by them. Pure.

A label is key=value (`role=web`). A selector is requirements joined by
commas, all of which a host must meet: `key=value`, `key!=value`, `key`
(the host has the label), `!key` (it has not). An empty selector picks
every host.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KEY = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?\Z")
VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z|\Z")
MAX_LABELS = 32  # on one host
MAX_REQUIREMENTS = 16  # in one selector


class SelectorError(ValueError):
    """A label or selector that does not parse; says which part."""


class Requirement(NamedTuple):
    key: str
    op: str  # "=", "!=", "has", "lacks"
    value: str = ""


def check_key(key: str) -> str:
    if not KEY.match(key):
        raise SelectorError(
            f"label key {key!r}: lower-case letters, digits, '.', '_', '/', '-' (at most 63)"
        )
    return key


def check_value(value: str) -> str:
    if not VALUE.match(value):
        raise SelectorError(f"label value {value!r}: letters, digits, '.', '_', '-' (at most 63)")
    return value


def parse_label(text: str) -> tuple[str, str]:
    """'role=web' -> ('role', 'web'). Raises SelectorError."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SelectorError(f"label {text!r} is not key=value")
    return check_key(key.strip()), check_value(value.strip())


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as given, each key and value checked. Raises SelectorError."""
    return {check_key(k): check_value(v) for k, v in labels.items()}


def parse(selector: str) -> tuple[Requirement, ...]:
    """A selector's requirements. Raises SelectorError."""
    parts = [p.strip() for p in selector.split(",") if p.strip()]
    if len(parts) > MAX_REQUIREMENTS:
        raise SelectorError(f"a selector holds at most {MAX_REQUIREMENTS} requirements")
    out = []
    for part in parts:
        if "!=" in part:
            key, value = part.split("!=", 1)
            out.append(Requirement(check_key(key.strip()), "!=", check_value(value.strip())))
        elif "=" in part:
            key, value = part.split("=", 1)
            out.append(Requirement(check_key(key.strip()), "=", check_value(value.strip())))
        elif part.startswith("!"):
            out.append(Requirement(check_key(part[1:].strip()), "lacks"))
        else:
            out.append(Requirement(check_key(part), "has"))
    return tuple(out)


def matches(requirements: tuple[Requirement, ...], labels: dict[str, str]) -> bool:
    for r in requirements:
        value = labels.get(r.key)
        if r.op == "=" and value != r.value:
            return False
        if r.op == "!=" and value == r.value:
            return False
        if r.op == "has" and value is None:
            return False
        if r.op == "lacks" and value is not None:
            return False
    return True
