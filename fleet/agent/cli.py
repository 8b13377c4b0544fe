"""`fleet-agent` command line (argparse: the agent carries no click)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .. import __version__
from ..protocol import PROTOCOL_VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-agent", description="The Fleet agent: runs restic for fleetd on this server."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fleet-agent {__version__} (protocol {PROTOCOL_VERSION})",
    )
    return parser


def main(argv: Optional[list] = None) -> None:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    sys.exit(2)
