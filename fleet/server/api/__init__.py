"""The operator API (`/ctl`): one module per noun, one registry built from them.

Each noun module lists its methods in `METHODS`; `build_registry()` takes
them from the explicit tuple `NOUNS`, so nothing registers by import side
effect. Domain code raises the typed errors of `errors`; only
`Registry.dispatch` turns them into wire error frames.
"""

from __future__ import annotations

from types import ModuleType

from . import (
    agents,
    alerts,
    audit,
    auth,
    enroll,
    groups,
    hosts,
    jobs,
    maintenance,
    notify,
    repos,
    restore,
    schedules,
    snapshots,
    status,
    templates,
    tls,
    tokens,
    users,
)
from .registry import Registry

NOUNS: tuple[ModuleType, ...] = (
    auth,
    users,
    tokens,
    enroll,
    hosts,
    templates,
    agents,
    repos,
    maintenance,
    groups,
    schedules,
    jobs,
    snapshots,
    restore,
    status,
    alerts,
    notify,
    audit,
    tls,
)


def build_registry(nouns: tuple[ModuleType, ...] = NOUNS) -> Registry:
    """One Registry holding every method of `nouns`; a name twice is an error."""
    return Registry((m for noun in nouns for m in noun.METHODS), refresh=auth.refresh_caller)
