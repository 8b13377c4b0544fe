#!/usr/bin/env bash
# Install fleetd and fleetctl on Debian 12 (as root), where `pip install .`
# into the system Python is refused (an "externally managed environment"):
#
#   /opt/fleet                      a virtualenv holding the package and its dependencies
#   /usr/local/bin/fleetd, fleetctl links into it
#   /usr/local/share/man/man{1,8}   fleetctl.1, fleetd.8, fleet-agent.8 (then mandb)
#   fleetd:fleetd                   a system user and group, no shell
#   /var/lib/fleetd                 its state directory, mode 0700
#   /etc/fleetd                     for the TLS certificate and key, mode 0750, group fleetd
#   /etc/systemd/system/fleetd.service, checked with `systemd-analyze verify`
#
# Run again to upgrade in place: the virtualenv is reused and the package
# reinstalled; the data directory and /etc/fleetd are left as they are.
# Nothing is started unless --start is given.
#
# --root DIR installs under DIR instead of / (for tests and staging): the
# paths inside the unit stay the real ones, no user is created and systemd is
# not told; the virtualenv works at DIR/opt/fleet only. The unit is verified
# against DIR when DIR holds systemd's own units (DIR/usr/lib/systemd/system).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: build/install-fleetd.sh [--root DIR] [--wheel FILE] [--start]
  --root DIR    install under DIR instead of / (no user, no systemctl)
  --wheel FILE  install this wheel of fleet instead of the checkout
  --start       enable and start fleetd.service (after `fleetd init`)
EOF
}

ROOT=/ WHEEL= START=
while [ $# -gt 0 ]; do
  case $1 in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
    --start) START=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install-fleetd: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)
R=${ROOT%/}  # prefix of every path written: "" for the real root
REAL=$([ "$ROOT" = / ] && echo 1 || true)
VENV=/opt/fleet
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "install-fleetd: $*" >&2; }
die() { say "$*"; exit 1; }

if [ -n "$REAL" ] && [ "$(id -u)" -ne 0 ]; then
  die "run it as root (or give --root DIR to install under DIR)"
fi
if [ -n "$WHEEL" ] && [ ! -f "$WHEEL" ]; then
  echo "install-fleetd: no wheel at $WHEEL" >&2; exit 2
fi
if [ -n "$START" ] && [ -z "$REAL" ]; then
  echo "install-fleetd: --start needs the real root, not --root" >&2; exit 2
fi

# Debian keeps venv (ensurepip) in its own package
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  [ -n "$REAL" ] || die "$PYTHON has no venv module: apt-get install python3-venv"
  say "installing python3-venv"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

# 1. the virtualenv, and the package in it (reinstalled on every run)
if [ ! -x "$R$VENV/bin/python" ]; then
  say "creating the virtualenv $R$VENV"
  "$PYTHON" -m venv "$R$VENV"
fi
if [ -n "$WHEEL" ]; then
  source=$WHEEL
else
  # from a copy of the tree: setuptools leaves build/ dirs behind in what it builds
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  cp -r "$CHECKOUT/pyproject.toml" "$CHECKOUT/README.md" "$CHECKOUT/fleet" "$stage/"
  find "$stage" -name __pycache__ -prune -exec rm -rf {} +
  source=$stage
fi
say "installing fleet into $R$VENV"
"$R$VENV/bin/pip" install --quiet --upgrade "$source" || die "pip could not install $source"
"$R$VENV/bin/fleetd" --version >/dev/null || die "$R$VENV/bin/fleetd does not run"

# 2. the commands, as relative links so that they also resolve under --root
install -d -m 0755 "$R/usr/local/bin"
for cmd in fleetd fleetctl; do
  ln -sfn "../../..$VENV/bin/$cmd" "$R/usr/local/bin/$cmd"
done

# 3. the man pages
install -d -m 0755 "$R/usr/local/share/man/man1" "$R/usr/local/share/man/man8"
install -m 0644 "$CHECKOUT/man/fleetctl.1" "$R/usr/local/share/man/man1/fleetctl.1"
install -m 0644 "$CHECKOUT/man/fleetd.8" "$CHECKOUT/man/fleet-agent.8" "$R/usr/local/share/man/man8/"
if [ -n "$REAL" ] && command -v mandb >/dev/null; then
  mandb -q || say "mandb failed; 'man fleetd' still finds the page"
fi

# 4. the user, its state directory and the configuration directory
if [ -n "$REAL" ] && ! getent passwd fleetd >/dev/null; then
  say "creating the system user fleetd"
  useradd --system --user-group --home-dir /var/lib/fleetd --no-create-home \
    --shell /usr/sbin/nologin --comment "Fleet control plane" fleetd
fi
install -d -m 0700 "$R/var/lib/fleetd"
install -d -m 0750 "$R/etc/fleetd"
if [ -n "$REAL" ]; then
  chown fleetd:fleetd /var/lib/fleetd
  chgrp fleetd /etc/fleetd
fi

# 5. the unit, as the installed package ships it, then checked
unit=$R/etc/systemd/system/fleetd.service
install -d -m 0755 "$R/etc/systemd/system"
"$R$VENV/bin/python" -c 'import sys; from fleet import units; sys.stdout.write(units.unit("fleetd.service"))' >"$unit.new"
chmod 0644 "$unit.new"
mv "$unit.new" "$unit"
if ! command -v systemd-analyze >/dev/null; then
  say "systemd-analyze is not installed: $unit not verified"
elif [ -n "$REAL" ]; then
  systemd-analyze verify "$unit" || die "systemd-analyze verify $unit failed"
  say "verified $unit"
elif [ -e "$R/usr/lib/systemd/system/sysinit.target" ]; then
  # the man page is looked for where this run put it
  MANPATH="$R/usr/local/share/man" systemd-analyze verify --root="$ROOT" "$unit" ||
    die "systemd-analyze verify --root=$ROOT $unit failed"
  say "verified $unit"
else
  say "$ROOT has no systemd units (usr/lib/systemd/system): $unit not verified"
fi

# 6. systemd, told of the unit; started only when asked
if [ -n "$START" ]; then
  [ -e /var/lib/fleetd/fleet.db ] ||
    die "not started: first runuser -u fleetd -- fleetd init --data-dir /var/lib/fleetd"
  for f in /etc/fleetd/cert.pem /etc/fleetd/key.pem; do
    [ -r "$f" ] || die "not started: the unit serves TLS from $f, which is missing"
  done
fi
if [ -n "$REAL" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ -n "$START" ]; then
    systemctl enable --now fleetd.service
    say "fleetd.service enabled and started"
  elif systemctl is-active --quiet fleetd.service; then
    systemctl restart fleetd.service  # an upgrade: the new code takes over
    say "fleetd.service restarted"
  fi
elif [ -n "$START" ]; then
  die "systemd is not running here: cannot start fleetd.service"
fi

say "installed $("$R$VENV/bin/fleetd" --version)"
if [ ! -e "$R/var/lib/fleetd/fleet.db" ] && [ -z "$START" ]; then
  cat >&2 <<'EOF'
next, as root:
  runuser -u fleetd -- fleetd init --data-dir /var/lib/fleetd   # prints the admin password once
  install -o root -g fleetd -m 0640 cert.pem key.pem /etc/fleetd/
  systemctl enable --now fleetd
EOF
fi
