#!/usr/bin/env bash
# `make demo`: the main job on the embedded default, start to finish.
# A local fleetd on SQLite in a temp dir, an operator login, a host enrolled,
# its repository and a source group set up and listed. (The agent and a live
# restic backup join this script as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
work=$(mktemp -d /tmp/fleet-demo.XXXXXX)
export XDG_CONFIG_HOME="$work/config" FLEETD_DATA_DIR="$work/fleetd"
unset FLEET_SERVER FLEET_TOKEN
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" || true
  fi
  echo "demo files left in $work (fleetd log: $work/fleetd.log)"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step fleetd init --data-dir "$FLEETD_DATA_DIR"
export FLEET_ADMIN_PASSWORD="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
$BIN/fleetd init

step fleetd serve --listen 127.0.0.1:0 '&'
$BIN/fleetd serve --listen 127.0.0.1:0 >"$work/fleetd.out" 2>"$work/fleetd.log" &
pid=$!
for _ in $(seq 100); do
  url=$(sed -n 's/^fleetd listening on //p' "$work/fleetd.out")
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/fleetd.log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "fleetd did not start"; exit 1; }
echo "fleetd is up at $url"

step fleetctl login --server "$url" --user admin
echo "$FLEET_ADMIN_PASSWORD" | $BIN/fleetctl login --server "$url" --user admin --password-stdin

step fleetctl enroll demo-host
$BIN/fleetctl enroll demo-host

mkdir -p "$work/sample" "$work/repo"
printf 'hello from fleet\n' >"$work/sample/hello.txt"
head -c 1048576 /dev/urandom >"$work/sample/random.bin"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/repo.pass"

step fleetctl repo set demo-host --url "$work/repo" --password-file "$work/repo.pass"
$BIN/fleetctl repo set demo-host --url "$work/repo" --password-file "$work/repo.pass"

step fleetctl groups create demo-host sample --include "$work/sample" --exclude '*.tmp' --keep-daily 7 --keep-weekly 4
$BIN/fleetctl groups create demo-host sample --include "$work/sample" --exclude '*.tmp' --keep-daily 7 --keep-weekly 4

step fleetctl groups list demo-host
$BIN/fleetctl groups list demo-host

step fleetctl repo show demo-host
$BIN/fleetctl repo show demo-host

step fleetctl hosts list
$BIN/fleetctl hosts list

step fleetctl audit
$BIN/fleetctl audit
