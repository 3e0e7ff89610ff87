#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run them all:
# ruff, mypy and pytest (unit, property and end-to-end tests with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v pebble >/dev/null || need_apt+=(pebble)  # ACME test server + pebble-challtestsrv
command -v faketime >/dev/null || need_apt+=(faketime)  # `tunneld doctor` clock-skew test
command -v systemd-analyze >/dev/null || need_apt+=(systemd)  # verifies systemd/*.service
command -v redis-server >/dev/null || need_apt+=(redis-server)  # the fleet's registry (tests start their own)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e '.[test]'

"$VENV/bin/ruff" check tunneld tests bench
"$VENV/bin/ruff" format --check tunneld tests bench
"$VENV/bin/mypy" tunneld
exec "$VENV/bin/python" -m pytest -q "$@"
