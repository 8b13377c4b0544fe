"""The man pages and the README against the code, in the spirit of sqlite-utils'
docs test: walk every fleetctl and fleetd command, and fail when one lacks help,
when its --help does not work, or when the man page leaves out the command or
one of its options. The other way round too: a man page may not document an
option that does not exist, and its exit status table must be exactly
fleet.exitcodes.Exit.

Man pages are roff: hyphens are written `\\-` and words carry font escapes
(`\\fB...\\fR`), so the page text is normalised before anything is searched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet.agent.cli import build_parser
from fleet.ctl.main import cli as fleetctl_cli
from fleet.exitcodes import Exit
from fleet.server.cli import cli as fleetd_cli

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
PAGES = ("fleetctl.1", "fleetd.8", "fleet-agent.8")

# -- reading roff ------------------------------------------------------------

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def normalise(text: str) -> str:
    """Roff source -> searchable text: `\\-` is '-', font escapes and `\\&` go."""
    text = text.replace("\\-", "-")
    text = _FONT.sub("", text)
    return text.replace("\\&", "").replace("\\%", "")


def page_source(name: str) -> str:
    path = MAN / name
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


def sections(source: str) -> dict[str, list[str]]:
    """The lines of each `.SH` section, by heading (quotes dropped)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"')
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def section_text(source: str, *names: str) -> str:
    found = sections(source)
    missing = [n for n in names if n not in found]
    assert not missing, f"no section {missing} (sections: {list(found)})"
    return normalise("\n".join(line for n in names for line in found[n]))


def tags(lines: list[str]) -> list[str]:
    """The tag lines of `.TP`/`.TQ` entries, normalised, macro name dropped."""
    out = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() in (".TP", ".TQ"):
            tag = lines[i + 1]
            if tag.startswith("."):
                tag = tag.split(None, 1)[1] if " " in tag else ""
                tag = tag.replace('"', "")
            out.append(normalise(tag).strip())
    return out


def mentions(text: str, word: str) -> bool:
    """`word` in `text` as a whole word: '--keep' does not match '--keep-daily'."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# -- walking the click trees -------------------------------------------------


def walk(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from walk(cmd.commands[name], (*path, name))


def long_options(cmd: click.Command) -> list[str]:
    opts = {"--help"}  # every command answers --help (and -h)
    for param in cmd.params:
        if isinstance(param, click.Option):
            opts.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return sorted(opts)


PROGRAMS = {"fleetctl": (fleetctl_cli, "fleetctl.1"), "fleetd": (fleetd_cli, "fleetd.8")}

COMMANDS = [
    pytest.param(prog, path, cmd, page, id=" ".join((prog, *path)))
    for prog, (root, page) in PROGRAMS.items()
    for path, cmd in walk(root)
]

OPTIONS = [
    pytest.param(prog, path, option, page, id=" ".join((prog, *path, option)))
    for prog, (root, page) in PROGRAMS.items()
    for path, cmd in walk(root)
    for option in long_options(cmd)
]


def test_the_walk_sees_every_command() -> None:
    """Guards the walk itself: a broken walk would make the tests below vacuous."""
    seen = {" ".join((c.values[0], *c.values[1])) for c in COMMANDS}
    for expected in ("fleetctl groups create", "fleetctl tokens revoke", "fleetd serve"):
        assert expected in seen
    assert len(COMMANDS) > 20


# -- every command -----------------------------------------------------------


@pytest.mark.parametrize(("prog", "path", "cmd", "page"), COMMANDS)
def test_command_has_help_text(prog: str, path: tuple, cmd: click.Command, page: str) -> None:
    text = cmd.short_help or cmd.help
    assert text and text.strip(), f"'{' '.join((prog, *path))}' has no help text"


@pytest.mark.parametrize(("prog", "path", "cmd", "page"), COMMANDS)
def test_command_help_exits_zero(prog: str, path: tuple, cmd: click.Command, page: str) -> None:
    root = PROGRAMS[prog][0]
    result = CliRunner().invoke(root, [*path, "--help"], prog_name=prog)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join((prog, *path))} ")


@pytest.mark.parametrize(("prog", "path", "cmd", "page"), COMMANDS)
def test_command_is_in_man_page(prog: str, path: tuple, cmd: click.Command, page: str) -> None:
    """Each command has an entry of its own under COMMANDS (a group: its subcommands')."""
    if not path:
        return  # the program itself: its options are checked below
    name = " ".join(path)
    entries = tags(sections(page_source(page))["COMMANDS"])
    assert any(t == name or t.startswith(name + " ") for t in entries), (
        f"{page} has no COMMANDS entry for '{prog} {name}'"
    )


@pytest.mark.parametrize(("prog", "path", "option", "page"), OPTIONS)
def test_option_is_in_man_page(prog: str, path: tuple, option: str, page: str) -> None:
    text = section_text(page_source(page), "OPTIONS", "COMMANDS")
    assert mentions(text, option), (
        f"{page} does not document {option} of '{' '.join((prog, *path))}'"
    )


# -- the pages as a whole ----------------------------------------------------


def agent_options() -> list[str]:
    return sorted(
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--")
    )


def known_options(page: str) -> set[str]:
    if page == "fleet-agent.8":
        return set(agent_options())
    prog = next(p for p, (_, pg) in PROGRAMS.items() if pg == page)
    return {o for _, cmd in walk(PROGRAMS[prog][0]) for o in long_options(cmd)}


@pytest.mark.parametrize("page", PAGES)
def test_man_page_invents_no_option(page: str) -> None:
    """Every --option a page mentions, examples included, exists in the code."""
    text = normalise(page_source(page))
    invented = sorted(set(_LONG_OPTION.findall(text)) - known_options(page))
    assert not invented, f"{page} documents options the code does not have: {invented}"


@pytest.mark.parametrize("page", PAGES)
def test_man_page_has_the_classic_sections(page: str) -> None:
    source = page_source(page)
    name, section = page.rsplit(".", 1)
    th = next((line for line in source.splitlines() if line.startswith(".TH ")), "")
    assert normalise(th).split()[1:3] == [name.upper(), section], th
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert heading in sections(source), f"{page} has no {heading} section"
    assert normalise("\n".join(sections(source)["NAME"])).strip().startswith(f"{name} - ")


@pytest.mark.parametrize("page", ["fleetctl.1", "fleetd.8"])
def test_exit_status_table_is_exit_enum(page: str) -> None:
    lines = sections(page_source(page))["EXIT STATUS"]
    documented = [int(t) for t in tags(lines) if t.isdigit()]
    assert sorted(documented) == sorted(int(e) for e in Exit), (
        f"{page} EXIT STATUS lists {documented}; fleet.exitcodes.Exit is {[int(e) for e in Exit]}"
    )


def test_fleetctl_page_documents_environment_and_files() -> None:
    source = page_source("fleetctl.1")
    env = section_text(source, "ENVIRONMENT")
    for var in ("FLEET_SERVER", "FLEET_TOKEN", "FLEET_CAFILE", "XDG_CONFIG_HOME"):
        assert mentions(env, var), f"fleetctl.1 ENVIRONMENT lacks {var}"
    files = section_text(source, "FILES")
    assert "$XDG_CONFIG_HOME/fleet/config.json" in files
    assert "0600" in files
    assert "fleetctl: error:" in normalise(source)


def test_fleetd_page_documents_environment_and_files() -> None:
    source = page_source("fleetd.8")
    env = section_text(source, "ENVIRONMENT")
    for var in ("FLEETD_DATA_DIR", "FLEET_ADMIN_PASSWORD"):
        assert mentions(env, var), f"fleetd.8 ENVIRONMENT lacks {var}"
    files = section_text(source, "FILES")
    for name in ("fleet.db", "secret.key"):
        assert mentions(files, name), f"fleetd.8 FILES lacks {name}"
    for endpoint in ("/healthz", "/login", "/enroll", "/ctl", "/agent"):
        assert mentions(section_text(source, "ENDPOINTS"), endpoint)


@pytest.mark.parametrize("option", agent_options())
def test_agent_option_is_in_man_page(option: str) -> None:
    assert mentions(section_text(page_source("fleet-agent.8"), "OPTIONS"), option)


def test_agent_help_and_version_exit_zero(capsys: pytest.CaptureFixture) -> None:
    for args in (["--help"], ["--version"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(args)
        assert exit_info.value.code == 0
    assert "fleet-agent" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_readme_mentions_make_targets() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    text = readme.read_text(encoding="utf-8")
    for target in ("make demo", "make test"):
        assert target in text, f"README.md does not mention `{target}`"
