#!/usr/bin/env bash
# Runs `systemd-analyze verify` on deploy/tpd.service. verify insists that ExecStart's binary
# exists, so it checks a copy whose only change is ExecStart's path, pointed at the tpd just
# built (the installed unit gets the install prefix the same way). verify exits 0 after mere
# warnings (an unknown key, a value it cannot parse), so any output fails the test too; and a
# copy with a misspelt key must be flagged, proving the check can fail here.
#   verify_unit.sh UNIT TPD_BINARY
set -euo pipefail
unit=$1 tpd=$(realpath "$2")
fail() { echo "verify_unit: FAILED: $*" >&2; exit 1; }

command -v systemd-analyze >/dev/null ||
    fail "systemd-analyze is not installed (Debian package 'systemd'; scripts/deps.sh installs it)"
[ -x "$tpd" ] || fail "$tpd is not an executable"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

grep -q '^ExecStart=/usr/bin/tpd ' "$unit" || fail "$unit has no 'ExecStart=/usr/bin/tpd ' line"
sed "s|^ExecStart=/usr/bin/tpd |ExecStart=$tpd |" "$unit" > "$tmp/tpd.service"
changed=$(diff "$unit" "$tmp/tpd.service" | grep -c '^>' || true)
[ "$changed" -eq 1 ] || fail "rewriting ExecStart changed $changed lines, expected 1"

# the control: a misspelt key must be reported, or this systemd-analyze proves nothing
sed 's/^Restart=/Restrat=/' "$tmp/tpd.service" > "$tmp/control.service"
out=$(systemd-analyze verify "$tmp/control.service" 2>&1 || true)
echo "$out" | grep -q "Restrat" ||
    fail "systemd-analyze did not flag a misspelt key, so it cannot check the unit here: $out"

set +e
out=$(systemd-analyze verify "$tmp/tpd.service" 2>&1)
rc=$?
set -e
[ $rc -eq 0 ] || fail "systemd-analyze verify exited $rc: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed warnings: $out"
echo "verify_unit: $unit verifies cleanly (systemd $(systemd-analyze --version | head -1 | cut -d' ' -f2))"
