#!/usr/bin/env bash
# Creates the Python venv for the Kubernetes API emulator and installs requirements.txt.
#
#   tests/k8s-emulator/setup.sh          # idempotent; a no-op when already up to date
#
# The venv is <repo>/.venv (gitignored), or $EMULATOR_VENV.  It is (re)installed when it
# is missing, broken, or when requirements.txt or the Python interpreter changed.  On a
# fresh Debian machine without the venv module it installs python3-venv with apt-get
# (as root).  Exits non-zero with a message on any failure.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${EMULATOR_VENV:-$ROOT/.venv}
REQ=$HERE/requirements.txt
PY=${PYTHON:-python3}

fail() { echo "k8s-emulator setup: ERROR: $*" >&2; exit 1; }
trap 'fail "command failed (line $LINENO): $BASH_COMMAND"' ERR

command -v "$PY" >/dev/null || fail "$PY not found; install python3 (>= 3.11)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || fail "kmock needs Python >= 3.11, $PY is $("$PY" -V 2>&1)"

# What the installed venv must match: the requirements and the interpreter.
WANT=$({ cat "$REQ"; "$PY" -c 'import sys; print(sys.version, sys.executable)'; } | sha256sum | cut -d' ' -f1)
STAMP=$VENV/.k8s-emulator-requirements.sha256

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1
}
up_to_date() {
    venv_ok && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
        && "$VENV/bin/python" -c 'import kmock, aiohttp, jsonpatch' >/dev/null 2>&1
}

if up_to_date; then
    echo "k8s-emulator setup: $VENV is up to date"
    exit 0
fi

mkdir -p "$VENV"
# One setup at a time (parallel test runs): lock inside the venv directory.
exec 9>"$VENV/.k8s-emulator-setup.lock"
command -v flock >/dev/null && flock -w 600 9 || true
if up_to_date; then  # another run finished it while we waited
    echo "k8s-emulator setup: $VENV is up to date"
    exit 0
fi

# The venv module (Debian ships it separately as python3-venv / python3.X-venv).
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    command -v apt-get >/dev/null || fail "'$PY -m venv' is unavailable and apt-get is missing; install the venv module"
    [ "$(id -u)" = 0 ] || fail "'$PY -m venv' is unavailable; run as root (or: apt-get install python3-venv)"
    PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "k8s-emulator setup: installing python3-venv with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q python3-venv >&2 || apt-get install -y -q "python$PYVER-venv" >&2
    "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || fail "python3-venv installed but '$PY -m venv' still fails"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "k8s-emulator setup: creating $VENV" >&2
    "$PY" -m venv "$VENV"
elif ! venv_ok; then
    # Only a broken venv (no working python or pip) is replaced; a healthy one is kept,
    # with whatever else is installed in it.
    echo "k8s-emulator setup: re-creating the broken venv $VENV" >&2
    "$PY" -m venv --clear "$VENV"
    exec 9>"$VENV/.k8s-emulator-setup.lock"
fi

echo "k8s-emulator setup: installing $REQ into $VENV" >&2
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$REQ"
"$VENV/bin/python" -c 'import kmock, aiohttp, jsonpatch' || fail "the installed packages do not import"
echo "$WANT" > "$STAMP"
echo "k8s-emulator setup: $VENV ready (kmock $("$VENV/bin/python" -c 'import kmock; print(kmock.__version__)'))"
