"""Imports flow one way (DESIGN.md, "Layout"): the agent, fleetd and fleetctl
may import fleet.common; fleet.common imports none of them; the agent imports
nothing of fleetd's or fleetctl's, nor what needs peewee, rich, click, argon2 or
nacl; fleetd and fleetctl do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FLEET = Path(__file__).resolve().parents[2] / "fleet"

# package -> the fleet packages and third-party tops it must never import
FORBIDDEN = {
    # croniter (pure Python, 3.9+) is the one library common may use: cron.py
    # is the rule fleetd and the agent must share to agree on fire times
    "common": (
        {"agent", "server", "ctl"},
        {"peewee", "rich", "click", "argon2", "nacl", "websockets"},
    ),
    "agent": ({"server", "ctl"}, {"peewee", "rich", "click", "argon2", "nacl"}),
    "server": ({"agent", "ctl"}, set()),
    "ctl": ({"agent", "server"}, {"peewee", "argon2", "nacl"}),
}


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """Absolute dotted names a module imports, relative imports resolved."""
    package = path.relative_to(root.parent).parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # `from .. import server` names a package too
            out.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return out


def violations(package: str, root: Path = FLEET) -> list[str]:
    fleet_forbidden, third_forbidden = FORBIDDEN[package]
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for lineno, name in imports_of(path, root):
            parts = name.split(".")
            bad = (parts[0] == "fleet" and len(parts) > 1 and parts[1] in fleet_forbidden) or (
                parts[0] in third_forbidden
            )
            if bad:
                found.append(f"{path.relative_to(root.parent)}:{lineno} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The walker resolves relative imports: a planted bad one is caught."""
    fake = tmp_path / "fleet"
    (fake / "agent").mkdir(parents=True)
    (fake / "agent" / "bad.py").write_text("from ..server.store import db\nimport peewee\n")
    (fake / "agent" / "ok.py").write_text("from ..common import protocol\n")
    found = violations("agent", fake)
    assert found == [
        "fleet/agent/bad.py:1 imports fleet.server.store",
        "fleet/agent/bad.py:1 imports fleet.server.store.db",
        "fleet/agent/bad.py:2 imports peewee",
    ]


def test_every_package_is_covered() -> None:
    packages = {p.name for p in FLEET.iterdir() if (p / "__init__.py").exists()}
    assert packages - {"units"} == set(FORBIDDEN)
