"""hosts list/show/remove, and enroll."""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from .. import units
from ..common import selectors
from . import render
from .app import App, Duration, confirm, json_option, pass_app
from .tls import trust_text


@click.group()
def hosts() -> None:
    """Servers with an agent (or an enrollment pending)."""


def locks(host: dict) -> str:
    n = host.get("repo_locks")
    if n is None:
        return "-"
    if n == 0:
        return "none"
    return f"[yellow]{n}[/] (a killed restic leaves one: 'fleetctl repo unlock {escape(host['name'])}')"


def repo_size(s: Optional[dict]) -> str:
    if not s:
        return "-"
    stored = ""
    if s.get("raw_size_bytes") is not None:
        stored = f"{render.human_bytes(s['raw_size_bytes'])} stored"
        if s.get("dedup_ratio"):
            stored += f" (deduplication {s['dedup_ratio']:g}x)"
        stored += ", "
    measured = f", measured {s['measured_at']}" if s.get("measured_at") else ""
    return render.cell(
        f"{stored}{render.human_bytes(s['size_bytes'])} to restore in "
        f"{s['snapshot_count']} snapshot(s), as of {s['updated_at']}{measured}"
    )


def repositories(h: dict) -> list[tuple[str, str]]:
    """A line per repository the host uses: its name and sizes."""
    out = []
    for r in h.get("repositories") or ():
        label = "repository" + (" (default)" if r["default"] else "")
        out.append((label, render.cell(r["name"]) + ": " + repo_size(r["stats"])))
    return out or [("repository", "-")]


def status_cell(host: dict) -> str:
    text = render.status(host["status"])
    if host.get("repo_locks"):
        text += " [yellow](repo locked)[/]"
    if host.get("schedule_lagging"):
        text += " [yellow](schedules not applied)[/]"
    if host.get("tls_refused"):
        text += " [red](refuses fleetd's key)[/]"
    return text


def last_backup(host: dict) -> str:
    b = host.get("last_backup")
    if not b:
        return "-"
    return f"{render.status(b['status'])} {render.ago(b['at'])} (job {b['job']})"


SELECTOR_HELP = (
    "Only the hosts whose labels match, e.g. 'role=web,env!=test' (key=value, key!=value, "
    "key, !key; all must hold)."
)


def label_pairs(texts: tuple, hint: str) -> dict[str, str]:
    """KEY=VALUE arguments as labels (fleetd checks them again)."""
    try:
        return dict(selectors.parse_label(text) for text in texts)
    except selectors.SelectorError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def labels_cell(labels: dict) -> str:
    return render.cell(",".join(f"{k}={v}" for k, v in sorted(labels.items())))


@hosts.command("list")
@click.option("--selector", "-l", metavar="SELECTOR", help=SELECTOR_HELP)
@json_option
@pass_app
def hosts_list(app: App, selector: Optional[str], as_json: bool) -> None:
    """List hosts with their state, labels and last backup."""
    rows = app.call("hosts.list", selector=selector)
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("HOST", "STATUS", "LAST SEEN", "AGENT", "LAST BACKUP", "LABELS"),
        (
            (
                render.cell(h["name"]),
                status_cell(h),
                render.ago(h["last_seen_at"]),
                render.cell(h["agent_version"]),
                last_backup(h),
                labels_cell(h.get("labels") or {}),
            )
            for h in rows
        ),
        empty="no host matches"
        if selector
        else "no hosts yet: add one with 'fleetctl enroll HOST'",
    )


@hosts.command("label")
@click.argument("host")
@click.argument("labels", nargs=-1, metavar="KEY=VALUE...")
@click.option("--remove", "removed", multiple=True, metavar="KEY", help="Remove this label.")
@json_option
@pass_app
def hosts_label(app: App, host: str, labels: tuple, removed: tuple, as_json: bool) -> None:
    """Set labels of HOST (KEY=VALUE; a key given again takes the new value)
    or remove them: what --selector picks hosts by."""
    if not labels and not removed:
        raise click.UsageError("give KEY=VALUE labels to set or --remove KEY")
    pairs = label_pairs(labels, "KEY=VALUE")
    result = app.call("hosts.label", host=host, set=pairs or None, remove=list(removed) or None)
    if as_json:
        render.emit_json(result)
        return
    app.err.print(f"{escape(result['host'])}: {labels_cell(result['labels'])}")


@hosts.command("show")
@click.argument("host")
@json_option
@pass_app
def hosts_show(app: App, host: str, as_json: bool) -> None:
    """Show one host."""
    h = app.call("hosts.show", host=host)
    if as_json:
        render.emit_json(h)
        return
    c = render.cell
    render.fields(
        app.out,
        [
            ("host", c(h["name"])),
            ("labels", labels_cell(h.get("labels") or {})),
            ("status", render.status(h["status"])),
            ("last seen", render.ago(h["last_seen_at"])),
            ("hostname", c(h["hostname"])),
            ("os/arch", c(f"{h['os']}/{h['arch']}" if h["os"] else None)),
            ("time zone", c(h["timezone"])),
            ("agent", c(h["agent_version"])),
            ("restic", c(h["restic_version"])),
            ("enrolled", c(h["enrolled_at"])),
            *repositories(h),
            ("repository locks", locks(h)),
            ("source groups", c(h["groups"])),
            (
                "schedule version",
                c(
                    f"{h['applied_schedule_version']} applied of {h['schedule_version']}"
                    + (" (the agent has not applied the latest)" if h["schedule_lagging"] else "")
                ),
            ),
            ("last backup", last_backup(h)),
            ("tls", trust_text(h["tls"]) if h.get("tls") else "-"),
        ],
    )


@hosts.command("remove")
@click.argument("host")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def hosts_remove(app: App, host: str, yes: bool) -> None:
    """Forget a host: its repository settings, groups, schedules and job history.

    The restic repository itself and its snapshots are not touched.
    """
    confirm(yes, f"Remove host {host} and its whole history from fleetd?")
    app.call("hosts.remove", host=host)
    app.err.print(f"removed host {host}")


@click.command()
@click.argument("host")
@click.option(
    "--install",
    is_flag=True,
    help="Print a root shell snippet: install the pyz, enroll, enable the systemd unit.",
)
@click.option(
    "--expires",
    type=Duration(),
    default="1h",
    show_default=True,
    help="How long the token may be used.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Give the host this label (repeatable), as 'hosts label' does.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Re-enroll a host that is enrolled already (admin): whoever redeems the new "
    "token replaces its agent.",
)
@json_option
@pass_app
def enroll(
    app: App,
    host: str,
    install: bool,
    expires: Optional[int],
    labels: tuple,
    force: bool,
    as_json: bool,
) -> None:
    """Print the one-line command that enrolls HOST's agent.

    The token inside is single use and expires, and voids any older token
    of HOST; HOST is created here if it is new, so its repository and
    groups can be set up before the agent runs. With --install, print the
    whole root shell snippet for a systemd server.
    """
    pairs = label_pairs(labels, "--label")
    result = app.call(
        "enroll.create", host=host, expires_in=expires, force=force or None, labels=pairs or None
    )
    if install:
        result["install"] = install_snippet(result["enrollment"])
    if as_json:
        render.emit_json(result)
        return
    app.out.print(result["install"] if install else result["command"], markup=False, soft_wrap=True)
    app.err.print(f"run this on {result['host']} before {result['expires_at']} (single use)")


AGENT_PYZ = "/usr/local/lib/fleet/fleet-agent.pyz"
AGENT_STATE = "/var/lib/fleet-agent"


def install_snippet(enrollment: str) -> str:
    """Root shell commands: user, pyz, enrollment, unit. Copy fleet-agent.pyz
    (from `make agent`) next to where they run first."""
    unit = units.unit("fleet-agent.service").rstrip("\n")
    return f"""# as root on the server, in a directory holding fleet-agent.pyz (built by 'make agent'):
set -e
command -v restic >/dev/null || apt-get install -y restic
id fleet-agent >/dev/null 2>&1 || useradd --system --home-dir {AGENT_STATE} --shell /usr/sbin/nologin fleet-agent
install -D -m 0755 fleet-agent.pyz {AGENT_PYZ}
install -d -m 0700 -o fleet-agent -g fleet-agent {AGENT_STATE} /var/cache/fleet-agent
runuser -u fleet-agent -- env SHIV_ROOT=/var/cache/fleet-agent/shiv python3 {AGENT_PYZ} enroll {enrollment} --state-dir {AGENT_STATE}
cat > /etc/systemd/system/fleet-agent.service <<'UNIT'
{unit}
UNIT
systemctl daemon-reload
systemctl enable --now fleet-agent
systemctl --no-pager status fleet-agent"""
