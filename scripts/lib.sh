# Sourced by the scripts that run a tpd of their own (demo, benchmarks): a temporary directory,
# tpd started in the background on a unix socket there, readiness polled with tpclient, and
# everything stopped and removed on exit.
tp_dir=$(mktemp -d)
tp_pid=
tp_sock="unix:$tp_dir/tpd.sock"

tp_cleanup() {
    if [ -n "$tp_pid" ] && kill -TERM "$tp_pid" 2>/dev/null; then
        wait "$tp_pid" || true
    fi
    rm -rf "$tp_dir"
}
trap tp_cleanup EXIT

# tp_start ARGS...: starts build/bin/tpd ARGS on $tp_sock and waits until it is ready (60 s).
# Its metrics server takes a free port (the default 8002 may be taken on a shared machine); the
# log line "metrics and health on http://..." names it.
tp_start() {
    build/bin/tpd --listen "$tp_sock" --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 "$@" &
    tp_pid=$!
    for _ in $(seq 600); do
        build/bin/tpclient --server "$tp_sock" health >/dev/null 2>&1 && return 0
        kill -0 "$tp_pid" 2>/dev/null || { echo "tpd exited before it was ready" >&2; return 1; }
        sleep 0.1
    done
    echo "tpd was not ready after 60 s" >&2
    return 1
}
