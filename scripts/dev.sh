#!/usr/bin/env bash
set -euo pipefail
VENV=.venv
PY=python3.11; command -v $PY >/dev/null || PY=python3

say() { printf '[dev] %s\n' "$*" >&2; }

pip_install() {
  # pip's own lines, thinned to one per package so a first setup shows it is moving; mirror warnings dropped.
  $VENV/bin/pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | awk '/^WARNING: Location / {next} /^(Collecting|Installing collected|Successfully installed)/ {print "      " $0; fflush(); next} /ERROR|rror:/ {print; fflush()}' >&2
}

apt_install() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing system packages: ${missing[*]} (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
}

setup_python() {
  local stamp=$VENV/.installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    local start=$SECONDS
    say "setting up $VENV (first run: a few minutes; later runs skip this)"
    [ -d $VENV ] || $PY -m venv $VENV
    # torch first, exactly pinned: pip then takes the local CPU wheel instead of a CUDA build.
    say "1/2 torch (CPU build)"
    pip_install torch==2.13.0
    say "2/2 mgmflow and its dependencies"
    pip_install -c constraints.txt -e ".[dev]"
    touch "$stamp"
    say "ready in $((SECONDS - start)) s"
  fi
}

case "${1:-}" in
  setup) apt_install redis-server chromium docker-compose; setup_python ;;
  demo)
    setup_python; shift
    exec $VENV/bin/mgmflow demo "$@" ;;
  test)
    # The tests start redis-server on free ports, drive chromium for the playground and check the compose file
    # with docker-compose (no engine needed); the demo needs none of them.
    apt_install redis-server chromium docker-compose; setup_python; shift
    exec $VENV/bin/python -m pytest "$@" ;;
  *) echo "usage: ./dev {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
