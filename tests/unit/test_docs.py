"""The man pages and the README against the code, in the spirit of sqlite-utils'
docs test: walk every fleetctl and fleetd command (click) and every fleet-agent
subcommand (argparse), and fail when one lacks help, when its --help does not
work, or when the man page leaves out the command or one of its options. The
other way round too: a man page may not document an option that does not
exist, and its exit status table must be exactly fleet.common.exitcodes.Exit (for
fleet-agent: a part of it holding every status its parser's epilog names).

Man pages are roff: hyphens are written `\\-` and words carry font escapes
(`\\fB...\\fR`), so the page text is normalised before anything is searched.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet.agent.cli import build_parser
from fleet.agent.state import DEFAULT_STATE_DIR, State
from fleet.common.exitcodes import Exit
from fleet.ctl.main import cli as fleetctl_cli
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


# -- walking the argparse tree of fleet-agent --------------------------------

AGENT_PAGE = "fleet-agent.8"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (the help line shown in the parent's usage, the subparser)."""
    out: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out[name] = (helps.get(name, ""), sub)
    return out


def argparse_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    )


AGENT_COMMANDS = [
    pytest.param(name, help_line, sub, id=f"fleet-agent {name}")
    for name, (help_line, sub) in subcommands(build_parser()).items()
]

AGENT_OPTIONS = [
    pytest.param(name, option, id=f"fleet-agent {name} {option}")
    for name, (_, sub) in subcommands(build_parser()).items()
    for option in argparse_options(sub)
]


def test_the_walk_sees_every_command() -> None:
    """Guards the walk itself: a broken walk would make the tests below vacuous."""
    seen = {" ".join((c.values[0], *c.values[1])) for c in COMMANDS}
    for expected in ("fleetctl groups create", "fleetctl tokens revoke", "fleetd serve"):
        assert expected in seen
    assert len(COMMANDS) > 20
    agent = {c.values[0] for c in AGENT_COMMANDS}
    assert {"enroll", "run", "status"} <= agent, agent
    assert {"--state-dir", "--restic"} <= {o.values[1] for o in AGENT_OPTIONS}


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


# -- every fleet-agent subcommand --------------------------------------------


@pytest.mark.parametrize(("name", "help_line", "sub"), AGENT_COMMANDS)
def test_agent_command_has_help_text(
    name: str, help_line: str, sub: argparse.ArgumentParser
) -> None:
    assert help_line.strip(), f"'fleet-agent {name}' has no help text"


@pytest.mark.parametrize(("name", "help_line", "sub"), AGENT_COMMANDS)
def test_agent_command_help_exits_zero(
    name: str, help_line: str, sub: argparse.ArgumentParser, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fleet-agent {name} ")


@pytest.mark.parametrize(("name", "help_line", "sub"), AGENT_COMMANDS)
def test_agent_command_is_in_man_page(
    name: str, help_line: str, sub: argparse.ArgumentParser
) -> None:
    entries = tags(sections(page_source(AGENT_PAGE))["COMMANDS"])
    assert any(t == name or t.startswith(name + " ") for t in entries), (
        f"{AGENT_PAGE} has no COMMANDS entry for 'fleet-agent {name}'"
    )


@pytest.mark.parametrize(("name", "option"), AGENT_OPTIONS)
def test_agent_subcommand_option_is_in_man_page(name: str, option: str) -> None:
    text = section_text(page_source(AGENT_PAGE), "OPTIONS", "COMMANDS")
    assert mentions(text, option), (
        f"{AGENT_PAGE} does not document {option} of 'fleet-agent {name}'"
    )


def test_agent_options_sit_under_their_command() -> None:
    """Each subcommand's options appear in its own COMMANDS entry, not only in
    another's: `status --json` is not documented by a `--json` elsewhere."""
    lines = sections(page_source(AGENT_PAGE))["COMMANDS"]
    entries: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        if line.strip() == ".TP" and i + 1 < len(lines):
            tag = normalise(lines[i + 1]).strip()
            head = tag.split(" ", 1)[0]
            if head in subcommands(build_parser()):
                current = head
                entries[current] = []
        if current is not None:
            entries[current].append(line)
    for name, (_, sub) in subcommands(build_parser()).items():
        text = normalise("\n".join(entries.get(name, [])))
        own = [o for o in argparse_options(sub) if o != "--help"]  # under OPTIONS, for all
        missing = [o for o in own if not mentions(text, o)]
        assert not missing, f"{AGENT_PAGE}: the entry of '{name}' does not document {missing}"


def choices(page: str) -> list[tuple[str, str, str]]:
    """(command, option, value) for every option restricted to a set of values."""
    out = []
    if page == AGENT_PAGE:
        for name, (_, sub) in subcommands(build_parser()).items():
            for action in sub._actions:
                if action.choices and action.option_strings:
                    out += [(name, action.option_strings[-1], str(c)) for c in action.choices]
        return out
    prog = next(p for p, (_, pg) in PROGRAMS.items() if pg == page)
    for path, cmd in walk(PROGRAMS[prog][0]):
        for param in cmd.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
                out += [(" ".join(path), param.opts[-1], str(c)) for c in param.type.choices]
    return out


@pytest.mark.parametrize("page", PAGES)
def test_man_page_names_every_choice(page: str) -> None:
    """An option taking one of a set of values (job statuses, kinds, roles,
    log levels) has each value spelled out in the page."""
    text = section_text(page_source(page), "OPTIONS", "COMMANDS")
    missing = [
        f"{cmd} {opt} {value}" for cmd, opt, value in choices(page) if not mentions(text, value)
    ]
    assert not missing, f"{page} does not name these values: {missing}"


# -- the pages as a whole ----------------------------------------------------


def agent_options() -> list[str]:
    return sorted(
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--")
    )


def known_options(page: str) -> set[str]:
    if page == AGENT_PAGE:
        subs = [sub for _, sub in subcommands(build_parser()).values()]
        return set(agent_options()).union(*(argparse_options(s) for s in subs))
    prog = next(p for p, (_, pg) in PROGRAMS.items() if pg == page)
    known = {o for _, cmd in walk(PROGRAMS[prog][0]) for o in long_options(cmd)}
    if page == "fleetd.8":  # its INSTALLATION documents the install script
        known |= set(install_script_options())
    return known


def install_script_options() -> list[str]:
    """The options build/install-fleetd.sh --help lists (it must answer it)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "build" / "install-fleetd.sh"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return _LONG_OPTION.findall(proc.stdout)


@pytest.mark.parametrize("page", PAGES)
def test_man_page_invents_no_option(page: str) -> None:
    """Every --option a page mentions, examples included, exists in the code."""
    text = normalise(page_source(page))
    invented = sorted(set(_LONG_OPTION.findall(text)) - known_options(page))
    assert not invented, f"{page} documents options the code does not have: {invented}"


def test_json_output_names_every_command_with_json() -> None:
    """Every fleetctl command that takes --json says, in JSON OUTPUT, what it
    prints (tests/integration/test_json_output.py checks the fields)."""
    text = section_text(page_source("fleetctl.1"), "JSON OUTPUT").replace('"', "")
    with_json = [
        " ".join(path) for path, cmd in walk(fleetctl_cli) if path and "--json" in long_options(cmd)
    ]
    assert len(with_json) > 30
    missing = [name for name in with_json if not mentions(text, name)]
    assert not missing, f"JSON OUTPUT does not say what these print: {missing}"


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
        f"{page} EXIT STATUS lists {documented}; fleet.common.exitcodes.Exit is {[int(e) for e in Exit]}"
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
    assert mentions(section_text(page_source(AGENT_PAGE), "OPTIONS"), option)


def test_agent_exit_status_table() -> None:
    """fleet-agent uses part of the shared table: each status its --help epilog
    names is documented, and nothing outside fleet.common.exitcodes.Exit."""
    documented = {
        int(t) for t in tags(sections(page_source(AGENT_PAGE))["EXIT STATUS"]) if t.isdigit()
    }
    epilog = build_parser().epilog or ""
    named = {int(n) for n in re.findall(r"(?<![\w-])(\d+) [a-z]", epilog)}
    assert named, f"no exit statuses found in the epilog: {epilog!r}"
    assert named <= documented, f"{AGENT_PAGE} EXIT STATUS lacks {sorted(named - documented)}"
    assert documented <= {int(e) for e in Exit}, sorted(documented)


def test_agent_page_documents_environment_and_files() -> None:
    source = page_source(AGENT_PAGE)
    env = section_text(source, "ENVIRONMENT")
    for var in ("FLEET_AGENT_STATE_DIR", "FLEET_RESTIC"):
        assert mentions(env, var), f"{AGENT_PAGE} ENVIRONMENT lacks {var}"
    files = section_text(source, "FILES")
    state = State(Path(DEFAULT_STATE_DIR))
    names = [
        state.identity_path,
        state.cert_path,
        state.pins_path,
        state.refusal_path,
        state.repo_path,
        state.spool_path,
    ]
    for name in [p.name for p in names] + ["agent.lock", DEFAULT_STATE_DIR]:
        assert mentions(files, name), f"{AGENT_PAGE} FILES lacks {name}"
    assert "0600" in files
    text = normalise(source)
    assert "fleetctl enroll" in text
    assert "not available" not in text and "not implemented" not in text


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


def test_readme_shows_a_backup_end_to_end() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    text = readme.read_text(encoding="utf-8")
    for command in (
        "fleet-agent enroll",
        "fleet-agent run",
        "fleetctl run",
        "--follow",
        "fleetctl jobs list",
        "fleetctl snapshots",
    ):
        assert command in text, f"README.md does not show `{command}`"
