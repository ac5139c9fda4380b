#!/usr/bin/env bash
set -euo pipefail
VENV=.venv
PY=python3.11; command -v $PY >/dev/null || PY=python3

pip_install() {
  # Some machines list local package mirrors that may be missing; pip warns for each one. Keep real errors.
  $VENV/bin/pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location " >&2)
}

setup() {
  # System tools the tests start themselves (redis-server on free ports; chromium for the UI test).
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
  fi
  local stamp=$VENV/.installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    [ -d $VENV ] || $PY -m venv $VENV
    # torch first, exactly pinned: pip then takes the local CPU wheel instead of a CUDA build.
    pip_install torch==2.13.0
    pip_install -c constraints.txt -e ".[dev]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo)
    setup; shift
    exec $VENV/bin/mgmflow demo "$@" ;;
  test)
    setup; shift
    exec $VENV/bin/python -m pytest "$@" ;;
  *) echo "usage: ./dev {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
