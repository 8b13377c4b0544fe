"""hosts list/show/remove, and enroll."""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from .. import units
from ..common import protocol, selectors
from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, Duration, confirm, json_option, pass_app
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
    when = b["finished_at"] or b["created_at"]  # queued or running: since when
    return f"{render.status(b['status'])} {render.ago(when)} (job {b['job']})"


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
    applied = result["templates"]
    if as_json:
        render.emit_json(result)
    else:
        app.err.print(f"{escape(result['host'])}: {labels_cell(result['labels'])}")
        show_applied(app, applied)
    if applied["error"]:  # the labels are set; what they pick is not
        raise click.exceptions.Exit(int(Exit.ERROR))


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
            ("templates", c(h["templates"] or None)),
            ("tls", trust_text(h["tls"]) if h.get("tls") else "-"),
        ],
    )
    if h.get("template_error"):
        app.out.print(f"[red]templates not applied[/]: {escape(h['template_error'])}")
    render.table(
        app.out,
        ("SETTING", "NAME", "FROM", "OVERRIDDEN HERE"),
        (
            (
                s["kind"],
                c(s["name"]),
                c(f"template {s['template']}" if s["template"] else "this host"),
                c(", ".join(s["overrides"]) or None),
            )
            for s in h["settings"]
        ),
        empty="no repositories, groups or schedules yet",
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
    help="Print a root shell snippet: install restic, fetch the agent from fleetd and check "
    "it, enroll, enable the systemd unit.",
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
    whole root shell snippet for a systemd server, which fetches the agent
    fleetd serves (pinned TLS, the token, its SHA-256 checked).
    """
    pairs = label_pairs(labels, "--label")
    with app.client() as c:
        agent = c.call("agents.served") if install else None
        if install and agent is None:  # before a token is made for nothing
            raise CtlError(
                "fleetd serves no agent file for --install: start it with --agent-pyz FILE "
                "(see fleetd(8))",
                Exit.NOT_FOUND,
            )
        result = c.call(
            "enroll.create",
            host=host,
            expires_in=expires,
            force=force or None,
            labels=pairs or None,
        )
    if install:
        result["install"] = install_snippet(result["enrollment"], agent)
        result["agent"] = agent
    if as_json:
        render.emit_json(result)
        return
    app.out.print(result["install"] if install else result["command"], markup=False, soft_wrap=True)
    app.err.print(f"run this on {result['host']} before {result['expires_at']} (single use)")
    if result.get("templates"):  # the token stands even if they could not be applied
        show_applied(app, result["templates"])


def show_applied(app: App, applied: dict) -> None:
    """What applying the templates a host's labels pick did, on stderr."""
    for key, word in (("created", "added"), ("updated", "updated"), ("removed", "removed")):
        if applied[key]:
            app.err.print(f"templates {word}: {escape(', '.join(applied[key]))}")
    if applied["error"]:
        app.err.print(f"[red]templates not applied[/]: {escape(applied['error'])}")


AGENT_DIR = "/usr/local/lib/fleet"
AGENT_PYZ = f"{AGENT_DIR}/fleet-agent.pyz"
AGENT_STATE = "/var/lib/fleet-agent"

# The download step of the install snippet: stdlib Python 3.9+, which the
# agent needs anyway (curl may be missing, and its --pinnedpubkey pins a
# public key, while the enrollment string pins the certificate). The pin is
# checked on the very connection the file comes over, before the request.
DOWNLOAD = """import hashlib, http.client, os, ssl, sys, tempfile
from urllib.parse import urlsplit
URLS, PIN, TOKEN, SHA256, SIZE, VERSION = %(args)s
dest = sys.argv[1]

def fetch(url):
    u = urlsplit(url)
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        if PIN:  # the certificate's SHA-256 identifies fleetd, not a CA or its name
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=60)
        conn.connect()
        if PIN and hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest() != PIN:
            sys.exit("%%s presented a certificate other than the pinned one: refusing" %% u.netloc)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
    conn.request("GET", u.path, headers={"Authorization": "Bearer " + TOKEN})
    r = conn.getresponse()
    if r.status != 200:
        raise OSError("HTTP %%d %%s" %% (r.status, r.read(300).decode("utf-8", "replace").strip()))
    return r

failed = []
for url in URLS:  # every replica the enrollment names, in its order
    try:
        r = fetch(url)
        break
    except (OSError, http.client.HTTPException) as exc:
        failed.append("GET %%s: %%s" %% (url, exc))
else:
    sys.exit("; ".join(failed))
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".fleet-agent-", suffix=".tmp")
digest, n = hashlib.sha256(), 0
with os.fdopen(fd, "wb") as out:
    while n <= SIZE:
        chunk = r.read(65536)
        if not chunk:
            break
        n += len(chunk)
        digest.update(chunk)
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
if n != SIZE or digest.hexdigest() != SHA256:
    os.unlink(tmp)
    sys.exit("the download is not fleet-agent %%s (%%d bytes, SHA-256 %%s): refusing" %% (VERSION, n, digest.hexdigest()))
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
print("fleet-agent %%s (SHA-256 %%s) installed as %%s" %% (VERSION, SHA256, dest))"""


def download_script(enrollment: str, agent: dict) -> str:
    """Python that fetches the agent fleetd serves into argv[1], over TLS
    with the enrollment's pinned certificate, authenticated by its token,
    and keeps it only when its size and SHA-256 are what fleetd announced.
    With replicas, from the first of the enrollment's URLs that answers."""
    doc = protocol.parse_enrollment(enrollment)
    scheme = protocol.url_scheme(doc["url"])  # never a token over http:// to a wss:// fleet
    urls = [u for u in protocol.enrollment_urls(doc) if protocol.url_scheme(u) == scheme]
    args = (
        [protocol.agent_file_url(url) for url in urls],
        (doc.get("sha256") or "").lower(),
        doc["token"],
        agent["sha256"],
        agent["size_bytes"],
        agent["version"],
    )
    return DOWNLOAD % {"args": repr(args)}


def install_snippet(enrollment: str, agent: dict) -> str:
    """Root shell commands: restic, the user, the agent fetched from fleetd
    and checked, enrollment, the unit. The agent's directory is its own, so
    that it can replace its file when upgraded (fleetctl agents upgrade)."""
    unit = units.unit("fleet-agent.service").rstrip("\n")
    return f"""# as root on the server (Debian or Ubuntu, systemd): fleet-agent {agent["version"]} from fleetd
set -e
command -v restic >/dev/null || {{ apt-get update && apt-get install -y restic; }}
command -v python3 >/dev/null || {{ apt-get update && apt-get install -y python3; }}
id fleet-agent >/dev/null 2>&1 || useradd --system --home-dir {AGENT_STATE} --shell /usr/sbin/nologin fleet-agent
install -d -m 0755 -o fleet-agent -g fleet-agent {AGENT_DIR}
python3 - {AGENT_PYZ} <<'PY'
{download_script(enrollment, agent)}
PY
chown fleet-agent:fleet-agent {AGENT_PYZ}
install -d -m 0700 -o fleet-agent -g fleet-agent {AGENT_STATE} /var/cache/fleet-agent
runuser -u fleet-agent -- env SHIV_ROOT=/var/cache/fleet-agent/shiv python3 {AGENT_PYZ} enroll {enrollment} --state-dir {AGENT_STATE}
cat > /etc/systemd/system/fleet-agent.service <<'UNIT'
{unit}
UNIT
systemctl daemon-reload
systemctl enable --now fleet-agent
systemctl --no-pager status fleet-agent"""
