#!/usr/bin/env bash
# Creates build/venv-kserve with the kserve SDK (tests/requirements-kserve.txt), whose REST and
# gRPC clients test_kserve.py runs in processes of their own: kserve and tritonclient cannot be
# imported together, so they live in separate venvs. Prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv-kserve
if ! "$venv/bin/python" -c "import kserve, numpy" 2>/dev/null; then
    mkdir -p build
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements-kserve.txt >&2
fi
echo "$PWD/$venv/bin/python"
