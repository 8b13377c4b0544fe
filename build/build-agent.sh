#!/usr/bin/env bash
# Build dist/fleet-agent.pyz: one file, pure Python, CPython 3.9+.
# Reproducible: timestamps come from the last commit (SOURCE_DATE_EPOCH),
# nothing machine-specific is packed, so two builds are byte-identical.
# FLEET_AGENT_VERSION=V stamps another version into the file (fleet/__init__.py
# and its metadata): a hotfix build, or the second agent of an upgrade test.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-dist/fleet-agent.pyz}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}
export BUILD_EXTENSION=no PYTHONHASHSEED=0 PIP_DISABLE_PIP_VERSION_CHECK=1

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
site="$stage/site-packages"

# third-party code, from source for websockets so no C speedups are built
"$BIN/pip" install --quiet --no-compile --no-deps --target "$site" \
  --no-binary websockets -r build/agent-requirements.txt 2>&1 | grep -v '^WARNING: Location' >&2 || true
# the fleet package itself, without its server and CLI dependencies, from a
# copy of the tree (setuptools leaves build/ dirs behind in what it builds)
mkdir "$stage/src"
cp -r pyproject.toml README.md fleet "$stage/src/"
# the agent side only: fleetd and fleetctl stay out of the file dropped on every server
rm -rf "$stage/src/fleet/server" "$stage/src/fleet/ctl"
if [ -n "${FLEET_AGENT_VERSION:-}" ]; then
  # the agent reports this version in its hello and fleetd reads it back from the file
  if ! [[ "$FLEET_AGENT_VERSION" =~ ^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$ ]]; then
    echo "build-agent: FLEET_AGENT_VERSION=$FLEET_AGENT_VERSION is not a version (letters, digits, . + -)" >&2
    exit 2
  fi
  sed -i "s/^__version__ = .*/__version__ = \"$FLEET_AGENT_VERSION\"/" "$stage/src/fleet/__init__.py"
fi
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
"$BIN/pip" install --quiet --no-compile --no-deps --target "$site/.fleet" "$stage/src" 2>&1 | grep -v '^WARNING: Location' >&2 || true
mv "$site/.fleet/fleet" "$site/.fleet"/fleet-*.dist-info "$site/"
rm -rf "$site/.fleet" "$site/bin"

# drop what differs from one build or machine to another
find "$site" -name __pycache__ -prune -exec rm -rf {} +
find "$site" -name direct_url.json -delete
find "$site" -name 'RECORD' -path '*.dist-info/*' -delete
find "$site" -name 'INSTALLER' -path '*.dist-info/*' -delete
if find "$site" -name '*.so' | grep -q .; then
  echo "build-agent: a compiled module slipped in:" >&2; find "$site" -name '*.so' >&2; exit 1
fi

mkdir -p "$(dirname "$OUT")"
"$BIN/shiv" --site-packages "$site" --reproducible --compressed \
  --python '/usr/bin/env python3' -e fleet.agent.cli:main -o "$OUT" --no-modify
ls -l "$OUT"
