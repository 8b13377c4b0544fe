"""systemd units for fleetd and fleet-agent (also linked from build/systemd/)."""

from __future__ import annotations

from importlib import resources


def unit(name: str) -> str:
    """The text of a unit file shipped with the package, e.g. 'fleet-agent.service'."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
