#!/usr/bin/env bash
# `make demo`: the main job on the embedded default, start to finish.
# A local fleetd on SQLite in a temp dir, an operator login, a local agent
# enrolled, a repository and a source group, then a real restic backup run
# now and followed live, and the snapshot it made.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
work=$(mktemp -d /tmp/fleet-demo.XXXXXX)
export XDG_CONFIG_HOME="$work/config" FLEETD_DATA_DIR="$work/fleetd"
unset FLEET_SERVER FLEET_TOKEN
pid=""
agent=""
cleanup() {
  for p in $agent $pid; do
    if kill -0 "$p" 2>/dev/null; then kill -TERM "$p"; wait "$p" || true; fi
  done
  if [ "${KEEP:-}" = 1 ]; then
    echo "demo files left in $work"
  else
    rm -rf "$work"; echo "demo files removed (KEEP=1 make demo keeps them)"
  fi
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
enroll_line=$($BIN/fleetctl enroll demo-host)
echo "$enroll_line"

step fleet-agent enroll fleet1:... --state-dir "$work/agent"
$BIN/fleet-agent enroll "${enroll_line##* }" --state-dir "$work/agent"

step fleet-agent run --state-dir "$work/agent" '&'
$BIN/fleet-agent run --state-dir "$work/agent" 2>"$work/agent.log" &
agent=$!

mkdir -p "$work/sample" "$work/repo"
printf 'hello from fleet\n' >"$work/sample/hello.txt"
for i in $(seq 1 128); do head -c 4194304 /dev/urandom >"$work/sample/data-$i.bin"; done
echo "scratch" >"$work/sample/scratch.tmp"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/repo.pass"

step fleetctl repo set demo-host --url "$work/repo" --password-file "$work/repo.pass"
$BIN/fleetctl repo set demo-host --url "$work/repo" --password-file "$work/repo.pass"

step fleetctl groups create demo-host sample --include "$work/sample" --exclude '*.tmp' --keep-daily 7 --keep-weekly 4
$BIN/fleetctl groups create demo-host sample --include "$work/sample" --exclude '*.tmp' --keep-daily 7 --keep-weekly 4

step fleetctl groups list demo-host
$BIN/fleetctl groups list demo-host

step fleetctl repo show demo-host
$BIN/fleetctl repo show demo-host

for _ in $(seq 100); do  # the agent connects, gets the repository and initialises it
  $BIN/fleetctl jobs list --kind init --status succeeded --json | grep -q '"id"' && break
  kill -0 "$agent" 2>/dev/null || { cat "$work/agent.log"; exit 1; }
  sleep 0.2
done

step fleetctl hosts list
$BIN/fleetctl hosts list

step fleetctl run demo-host sample --follow
$BIN/fleetctl run demo-host sample --follow

step fleetctl snapshots demo-host
$BIN/fleetctl snapshots demo-host

step fleetctl jobs list
$BIN/fleetctl jobs list

step fleetctl ls demo-host latest "$work/sample" "(browsed through the agent: *.tmp excluded)"
$BIN/fleetctl ls demo-host latest "$work/sample" | awk 'NR <= 8'

step fleetctl restore demo-host latest --target "$work/restored" --follow
$BIN/fleetctl restore demo-host latest --target "$work/restored" --follow
step diff -r "$work/sample" "$work/restored$work/sample" "(the restore, byte for byte)"
diff -r --exclude='*.tmp' "$work/sample" "$work/restored$work/sample" && echo "identical"

step fleetctl schedules create demo-host --cron "30 2 * * *" --group sample --name nightly
$BIN/fleetctl schedules create demo-host --cron "30 2 * * *" --group sample --name nightly
$BIN/fleetctl schedules list demo-host

step fleet-agent status --state-dir "$work/agent" "(the agent holds the schedule: it fires with or without fleetd)"
for _ in $(seq 1 100); do  # until the agent has applied the schedule fleetd pushed
  $BIN/fleetctl hosts show demo-host --json | grep -q '"schedule_lagging": false' && break
  sleep 0.1
done
$BIN/fleet-agent status --state-dir "$work/agent" | grep -E '^(host|schedule)'
 
