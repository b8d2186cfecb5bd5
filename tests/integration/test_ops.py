"""tpd in operation: Prometheus metrics, HTTP health, sd_notify, journald log lines, ModelConfig.

(a) Metrics: /metrics parsed by a strict parser of the text exposition format 0.0.4 (HELP and
    TYPE once per family and before its samples, label syntax and escapes, no duplicate series,
    histogram buckets cumulative and sorted with +Inf equal to _count); the counters move with
    OK, INVALID_ARGUMENT and NOT_FOUND requests by exactly what was sent; the per-rank worker-up
    gauge drops to 0 when a worker is killed and comes back to 1, and the restart counter counts.
(b) HTTP health: with a worker that takes seconds to load (a --worker wrapper that sleeps, then
    execs tpd-worker), /v2/health/live is 200 and ready 503 before the workers are ready, 200
    after, 503 again while draining; a busy or malformed --metrics-listen stops tpd at start
    with a message naming the address; 'off' serves no HTTP.
(c) sd_notify: the test owns the NOTIFY_SOCKET datagram socket; READY=1 arrives only after every
    worker logged its load and gRPC answers ready, STATUS= lines say loading/serving/restarting,
    WATCHDOG=1 comes every WATCHDOG_USEC/2 during the load and after, STOPPING=1 on SIGTERM.
(d) Logging: with JOURNAL_STREAM naming tpd's stderr every line (tpd's and the workers') starts
    with <N> and has no time; without it (or naming another file) lines start with the time;
    per-request lines only at debug.
(e) ModelConfig through tritonclient's get_model_config; ServerMetadata's extensions.
"""

import math
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import TpdTestCase, make_layer, pid_alive, run, wait_for  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

IN, OUT, RANKS = 40, 90, 2  # 45 columns per rank: not a power of two
MODEL = "opslinear"


# ------------------------------------------------------------------------------------------------
# the exposition format

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_value(s):
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    if s == "NaN":
        return math.nan
    if not re.fullmatch(r"[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)", s):
        raise AssertionError("bad sample value %r" % s)
    return float(s)


def parse_labels(s, lineno):
    """'a="x",b="y\\"z"' -> (('a', 'x'), ('b', 'y"z')), strictly."""
    labels = []
    i = 0
    while i < len(s):
        m = LABEL_NAME_RE.match(s, i)
        if not m:
            raise AssertionError("line %d: bad label name at %r" % (lineno, s[i:]))
        name = m.group(0)
        i = m.end()
        if s[i:i + 2] != '="':
            raise AssertionError("line %d: expected =\" after label %s" % (lineno, name))
        i += 2
        val = []
        while True:
            if i >= len(s):
                raise AssertionError("line %d: unterminated label value" % lineno)
            c = s[i]
            if c == "\\":
                nxt = s[i + 1:i + 2]
                if nxt not in ("\\", '"', "n"):
                    raise AssertionError("line %d: bad escape \\%s" % (lineno, nxt))
                val.append("\n" if nxt == "n" else nxt)
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                val.append(c)
                i += 1
        labels.append((name, "".join(val)))
        if i < len(s):
            if s[i] != ",":
                raise AssertionError("line %d: expected ',' between labels" % lineno)
            i += 1
    names = [n for n, _ in labels]
    if len(set(names)) != len(names):
        raise AssertionError("line %d: a label is repeated" % lineno)
    return tuple(sorted(labels))


def parse_exposition(text):
    """Strict parser of the Prometheus text format 0.0.4 as tpd writes it.
    -> {family: {"type": t, "help": h, "samples": {(name, labels): value}}}"""
    if not text.endswith("\n"):
        raise AssertionError("exposition does not end with a newline")
    fams = {}
    current = None
    seen_series = set()
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME_RE.match(name):
                    raise AssertionError("line %d: bad metric name %r" % (lineno, name))
                f = fams.setdefault(name, {"type": None, "help": None, "samples": {}})
                key = parts[1].lower()
                if f[key] is not None:
                    raise AssertionError("line %d: second %s for %s" % (lineno, parts[1], name))
                if f["samples"]:
                    raise AssertionError("line %d: %s after samples of %s" % (lineno, parts[1],
                                                                              name))
                val = parts[3] if len(parts) > 3 else ""
                if key == "type":
                    if val not in ("counter", "gauge", "histogram", "summary", "untyped"):
                        raise AssertionError("line %d: bad type %r" % (lineno, val))
                elif not val:
                    raise AssertionError("line %d: empty HELP" % lineno)
                f[key] = val
                current = name
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)( -?\d+)?", line)
        if not m:
            raise AssertionError("line %d: not a sample: %r" % (lineno, line))
        name, labels, value = m.group(1), parse_labels(m.group(3) or "", lineno), m.group(4)
        fam = name
        if current and fams[current]["type"] == "histogram" and name in (
                current + "_bucket", current + "_sum", current + "_count"):
            fam = current
        if fam not in fams or fams[fam]["type"] is None:
            raise AssertionError("line %d: sample %s before its # TYPE" % (lineno, name))
        if fam != current:
            raise AssertionError("line %d: sample of %s outside its family's block" % (lineno, fam))
        if (name, labels) in seen_series:
            raise AssertionError("line %d: duplicate series %s%s" % (lineno, name, labels))
        seen_series.add((name, labels))
        fams[fam]["samples"][(name, labels)] = parse_value(value)
    for name, f in fams.items():
        if f["type"] is None or f["help"] is None:
            raise AssertionError("%s lacks # TYPE or # HELP" % name)
        if f["type"] == "counter":
            for (sname, _), v in f["samples"].items():
                if not (v >= 0 and sname == name):
                    raise AssertionError("counter %s: sample %s = %r" % (name, sname, v))
        if f["type"] == "histogram":
            check_histogram(name, f)
    return fams


def check_histogram(name, f):
    """Buckets sorted by le, cumulative, +Inf last and equal to _count; _sum present."""
    groups = {}
    for (sname, labels), v in f["samples"].items():
        base = tuple(l for l in labels if l[0] != "le")
        g = groups.setdefault(base, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            le = dict(labels).get("le")
            if le is None:
                raise AssertionError("%s_bucket without le" % name)
            g["buckets"].append((parse_value(le), v))
        elif sname == name + "_sum":
            g["sum"] = v
        elif sname == name + "_count":
            g["count"] = v
        else:
            raise AssertionError("histogram %s has a sample %s" % (name, sname))
    for base, g in groups.items():
        b = g["buckets"]
        if g["sum"] is None or g["count"] is None or not b:
            raise AssertionError("histogram %s%s lacks buckets, _sum or _count" % (name, base))
        les = [le for le, _ in b]
        if les != sorted(les) or len(set(les)) != len(les) or les[-1] != math.inf:
            raise AssertionError("histogram %s: le not increasing up to +Inf: %s" % (name, les))
        counts = [c for _, c in b]
        if any(c2 < c1 for c1, c2 in zip(counts, counts[1:])):
            raise AssertionError("histogram %s: buckets not cumulative: %s" % (name, counts))
        if counts[-1] != g["count"]:
            raise AssertionError("histogram %s: +Inf %r != _count %r" % (name, counts[-1],
                                                                         g["count"]))
        if g["count"] == 0 and g["sum"] != 0:
            raise AssertionError("histogram %s: empty with _sum %r" % (name, g["sum"]))


def value(fams, family, sample=None, **labels):
    f = fams[family]
    key = (sample or family, tuple(sorted(labels.items())))
    if key not in f["samples"]:
        raise AssertionError("no series %s%s; have %s" % (key[0], labels, sorted(f["samples"])))
    return f["samples"][key]


def http_get(url, method="GET", timeout=10):
    """(status, body, headers); HTTP errors are results, not exceptions."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def scrape(d):
    status, body, headers = http_get(d.metrics_url() + "/metrics")
    if status != 200:
        raise AssertionError("GET /metrics: %d %s" % (status, body))
    ctype = headers.get("Content-Type", "")
    if not ctype.startswith("text/plain") or "version=0.0.4" not in ctype:
        raise AssertionError("GET /metrics: Content-Type %r" % ctype)
    return parse_exposition(body)


def slow_worker(tmp, seconds):
    """A --worker wrapper that sleeps, then execs the real tpd-worker."""
    real = os.path.join(os.path.dirname(os.path.abspath(tpdtest.TPD)), "tpd-worker")
    path = os.path.join(tmp, "slow-worker.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nsleep %s\nexec '%s' \"$@\"\n" % (seconds, real))
    os.chmod(path, stat.S_IRWXU)
    return path


class OpsCase(TpdTestCase):

    def layer(self):
        self.wpath = self.path(MODEL + ".safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, seed=11)
        return self.wpath

    def infer(self, client, x, model=MODEL):
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], outputs=[tgrpc.InferRequestedOutput("output")])


# ------------------------------------------------------------------------------------------------
# (a) metrics


class TestMetrics(OpsCase):

    def test_counters_histograms_and_worker_gauges(self):
        d = self.start_daemon(self.layer(), "--cpu", RANKS, "--model", MODEL,
                              "--restart-backoff-ms", 2000, name="metrics")
        m0 = scrape(d)
        for fam, typ in (("tpd_requests_total", "counter"),
                         ("tpd_request_duration_seconds", "histogram"),
                         ("tpd_request_queue_seconds", "histogram"),
                         ("tpd_compute_seconds", "histogram"),
                         ("tpd_batch_rows", "histogram"),
                         ("tpd_request_rows_total", "counter"),
                         ("tpd_received_bytes_total", "counter"),
                         ("tpd_sent_bytes_total", "counter"),
                         ("tpd_worker_up", "gauge"),
                         ("tpd_worker_restarts_total", "counter")):
            self.assertIn(fam, m0)
            self.assertEqual(m0[fam]["type"], typ, fam)
        self.assertEqual(value(m0, "tpd_requests_total", model=MODEL, code="OK"), 0)
        for r in range(RANKS):
            self.assertEqual(value(m0, "tpd_worker_up", rank=str(r)), 1)
            self.assertEqual(value(m0, "tpd_worker_restarts_total", rank=str(r)), 0)

        client = tgrpc.InferenceServerClient(url=d.addr)
        rng = np.random.default_rng(3)
        rows = [1, 5, 7]
        for n in rows:
            x = rng.standard_normal((n, IN)).astype(np.float32)
            y = self.infer(client, x).as_numpy("output")
            self.assert_close(y, x, self.W, self.b, 1e-5, "batch %d" % n)
        with self.assertRaises(InferenceServerException) as cm:  # wrong width
            self.infer(client, rng.standard_normal((2, IN + 1)).astype(np.float32))
        self.assertIn("INVALID_ARGUMENT", str(cm.exception.status()))
        with self.assertRaises(InferenceServerException) as cm:  # unknown model
            self.infer(client, rng.standard_normal((2, IN)).astype(np.float32), model="nosuch")
        self.assertIn("NOT_FOUND", str(cm.exception.status()))

        m1 = scrape(d)
        self.assertEqual(value(m1, "tpd_requests_total", model=MODEL, code="OK"), 3)
        self.assertEqual(value(m1, "tpd_requests_total", model=MODEL, code="INVALID_ARGUMENT"), 1)
        self.assertEqual(value(m1, "tpd_requests_total", model="", code="NOT_FOUND"), 1)
        hist = lambda fam, s: value(m1, fam, fam + s, model=MODEL)  # noqa: E731
        # latency: every answered call for the model; queue, compute, batch: the 3 that ran
        self.assertEqual(hist("tpd_request_duration_seconds", "_count"), 4)
        self.assertEqual(hist("tpd_request_queue_seconds", "_count"), 3)
        self.assertEqual(hist("tpd_compute_seconds", "_count"), 3)
        self.assertEqual(hist("tpd_batch_rows", "_count"), 3)
        self.assertEqual(hist("tpd_batch_rows", "_sum"), sum(rows))
        self.assertEqual(value(m1, "tpd_batch_rows", "tpd_batch_rows_bucket", model=MODEL,
                               le="1"), 1)
        self.assertEqual(value(m1, "tpd_batch_rows", "tpd_batch_rows_bucket", model=MODEL,
                               le="4"), 1)
        self.assertEqual(value(m1, "tpd_batch_rows", "tpd_batch_rows_bucket", model=MODEL,
                               le="8"), 3)
        self.assertEqual(value(m1, "tpd_request_rows_total", model=MODEL), sum(rows))
        for fam in ("tpd_request_duration_seconds", "tpd_request_queue_seconds",
                    "tpd_compute_seconds"):
            s = hist(fam, "_sum")
            self.assertTrue(0 < s < 60, "%s_sum %r" % (fam, s))
        # compute is part of the request's time: their sums over the 3 OK requests are ordered
        self.assertLessEqual(hist("tpd_compute_seconds", "_sum"),
                             hist("tpd_request_duration_seconds", "_sum"))
        sent_floats = sum(rows) * OUT * 4
        got_floats = (sum(rows) + 2 + 2) * IN * 4
        self.assertGreaterEqual(value(m1, "tpd_sent_bytes_total"), sent_floats)
        self.assertLess(value(m1, "tpd_sent_bytes_total"), sent_floats + 3 * 1024)
        self.assertGreaterEqual(value(m1, "tpd_received_bytes_total"), got_floats)
        self.assertLess(value(m1, "tpd_received_bytes_total"), got_floats + 5 * 1024)

        # a worker killed: every rank's gauge drops (the group goes down), then comes back
        victim = d.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: all(value(scrape(d), "tpd_worker_up", rank=str(r)) == 0
                             for r in range(RANKS)), 10, "tpd_worker_up 0 after kill -9", d)
        status, _, _ = http_get(d.metrics_url() + "/v2/health/ready")
        self.assertEqual(status, 503, "ready while the workers are down")
        m2 = wait_for(lambda: (lambda m: m if all(
            value(m, "tpd_worker_up", rank=str(r)) == 1 for r in range(RANKS)) else None)(
                scrape(d)), 30, "tpd_worker_up back to 1", d)
        for r in range(RANKS):
            self.assertEqual(value(m2, "tpd_worker_restarts_total", rank=str(r)), 1)
        self.assertFalse(pid_alive(victim))
        d.wait_ready()
        x = rng.standard_normal((3, IN)).astype(np.float32)
        self.assert_close(self.infer(client, x).as_numpy("output"), x, self.W, self.b, 1e-5,
                          "after the restart")
        self.assertEqual(value(scrape(d), "tpd_requests_total", model=MODEL, code="OK"), 4)
        client.close()
        d.stop()

    def test_concurrent_scrapes_and_requests(self):
        """Scrapes while requests run (several gRPC threads) always parse and add up."""
        d = self.start_daemon(self.layer(), "--cpu", RANKS, "--model", MODEL, "--grpc-threads", 2,
                              name="concurrent")
        errors = []
        n_clients, per_client = 3, 15

        def load(seed):
            try:
                c = tgrpc.InferenceServerClient(url=d.addr)
                rng = np.random.default_rng(seed)
                for _ in range(per_client):
                    self.infer(c, rng.standard_normal((4, IN)).astype(np.float32))
                c.close()
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=load, args=(s,)) for s in range(n_clients)]
        for t in threads:
            t.start()
        scrapes = 0
        while any(t.is_alive() for t in threads):
            m = scrape(d)
            ok = value(m, "tpd_requests_total", model=MODEL, code="OK")
            self.assertLessEqual(ok, value(m, "tpd_request_duration_seconds",
                                           "tpd_request_duration_seconds_count", model=MODEL))
            scrapes += 1
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        m = scrape(d)
        total = n_clients * per_client
        self.assertEqual(value(m, "tpd_requests_total", model=MODEL, code="OK"), total)
        self.assertEqual(value(m, "tpd_batch_rows", "tpd_batch_rows_sum", model=MODEL), 4 * total)
        print("concurrent: %d scrapes during %d requests" % (scrapes, total))
        d.stop()


# ------------------------------------------------------------------------------------------------
# (b) HTTP health


class TestHealth(OpsCase):

    def test_not_ready_while_loading_then_ready_then_draining(self):
        d = self.daemon(self.layer(), "--cpu", RANKS, "--model", MODEL, "--worker",
                        slow_worker(self.tmp, 3), name="slow").start(wait_ready=False)
        base = d.metrics_url()
        t0 = time.monotonic()
        # before the workers are ready: live, not ready (the workers sleep 3 s before loading)
        self.assertEqual(http_get(base + "/v2/health/live")[0], 200)
        self.assertEqual(http_get(base + "/v2/health/ready")[0], 503)
        self.assertEqual(http_get(base + "/v2/models/%s/ready" % MODEL)[0], 503)
        self.assertEqual(http_get(base + "/v2/models/%s/versions/1/ready" % MODEL)[0], 503)
        self.assertEqual(d.loaded(), [], "a worker loaded before the checks: timing assumption")
        self.assertLess(time.monotonic() - t0, 3.0)
        d.wait_ready()
        self.assertEqual(len(d.loaded()), RANKS)
        self.assertEqual(http_get(base + "/v2/health/live")[0], 200)
        self.assertEqual(http_get(base + "/v2/health/ready")[0], 200)
        self.assertEqual(http_get(base + "/v2/models/%s/ready" % MODEL)[0], 200)
        self.assertEqual(http_get(base + "/v2/models/%s/versions/1/ready" % MODEL)[0], 200)
        self.assertEqual(http_get(base + "/v2/models/%s/versions/2/ready" % MODEL)[0], 404)
        self.assertEqual(http_get(base + "/v2/models/nosuch/ready")[0], 404)
        self.assertEqual(http_get(base + "/nosuch")[0], 404)
        self.assertEqual(http_get(base + "/v2/health/ready", method="POST")[0], 405)
        self.assertEqual(http_get(base + "/v2/health/ready", method="HEAD")[0], 200)
        d.stop()
        with self.assertRaises(OSError):
            urllib.request.urlopen(base + "/v2/health/live", timeout=5)

    def test_busy_metrics_address_fails_at_start(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        addr = "127.0.0.1:%d" % busy.getsockname()[1]
        d = self.daemon(self.layer(), "--metrics-listen", addr, name="busy").start(
            wait_ready=False)
        rc = d.wait_exit(30)
        self.assertEqual(rc, 1, d.log_tail())
        err = [l for l in d.log().splitlines() if ": error: " in l]
        self.assertTrue(err and addr in err[-1] and "Address already in use" in err[-1],
                        d.log_tail())
        self.assertEqual(d.count(tpdtest.STARTED_RE), 0, "workers started before the bind")

    def test_bad_and_disabled_metrics_address(self):
        for bad in ("nocolon", "127.0.0.1:", "no.such.host.invalid:80", "127.0.0.1:99999"):
            with self.subTest(addr=bad):
                d = self.daemon(self.layer(), "--metrics-listen", bad,
                                name="bad%d" % len(self.daemons)).start(wait_ready=False)
                self.assertEqual(d.wait_exit(30), 1, d.log_tail())
                self.assertIn("'%s'" % bad if bad != "127.0.0.1:99999" else bad, d.log(),
                              d.log_tail())
        d = self.start_daemon(self.layer(), "--metrics-listen", "off", name="off")
        self.assertIsNone(tpdtest.METRICS_RE.search(d.log()), d.log_tail())
        d.stop()


# ------------------------------------------------------------------------------------------------
# (c) sd_notify


class NotifyListener:
    """The datagram socket systemd would own: records (monotonic time, message, log snapshot)."""

    def __init__(self, path, daemon_log):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.path = path
        self.log = daemon_log
        self.msgs = []
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            # the log as it was when the message arrived
            self.msgs.append((time.monotonic(), data.decode(), self.log()))

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close()

    def lines(self):
        return [(t, l, log) for t, m, log in self.msgs for l in m.split("\n") if l]

    def first(self, line):
        for t, l, log in self.lines():
            if l == line:
                return t, log
        return None


WD_USEC = 1000000  # tpd pings every 0.5 s


class TestNotify(OpsCase):

    def test_ready_status_watchdog_stopping(self):
        sock = self.path("systemd-notify.sock")
        holder = {}
        listener = NotifyListener(sock, lambda: holder["d"].log())
        self.addCleanup(listener.close)
        d = self.daemon(self.layer(), "--cpu", RANKS, "--model", MODEL, "--worker",
                        slow_worker(self.tmp, 3), "--restart-backoff-ms", 500, name="notify",
                        env={"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": WD_USEC,
                             "WATCHDOG_PID": None})
        holder["d"] = d
        t_start = time.monotonic()
        d.start(wait_ready=False)
        ready = wait_for(lambda: listener.first("READY=1"), 60, "READY=1", d)
        t_ready, log_at_ready = ready
        # when READY=1 came, every rank had loaded its shard and tpd logged it serves
        self.assertEqual(len(tpdtest.LOADED_RE.findall(log_at_ready)), RANKS, log_at_ready)
        self.assertIn("ready: serving", log_at_ready)
        self.assertGreaterEqual(t_ready - t_start, 3.0, "READY=1 before the workers slept 3 s")
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.assertTrue(client.is_server_ready())

        status = [l for _, l, _ in listener.lines() if l.startswith("STATUS=")]
        self.assertTrue(any("loading shards" in s for s in status), status)
        self.assertTrue(any(s.startswith("STATUS=serving '%s' with %d ranks" % (MODEL, RANKS))
                            for s in status), status)
        # the watchdog was fed during the 3 s load (every 0.5 s) and keeps being fed while serving
        wd_before = [t for t, l, _ in listener.lines() if l == "WATCHDOG=1" and t < t_ready]
        self.assertGreaterEqual(len(wd_before), 3, "WATCHDOG=1 during the load: %d" %
                                len(wd_before))
        time.sleep(2.5)
        wd_after = [t for t, l, _ in listener.lines() if l == "WATCHDOG=1" and t > t_ready]
        self.assertGreaterEqual(len(wd_after), 3, "WATCHDOG=1 while serving: %d" % len(wd_after))
        gaps = [b - a for a, b in zip(wd_after, wd_after[1:])]
        self.assertLess(max(gaps), WD_USEC / 1e6, "watchdog gap %.2f s >= WATCHDOG_USEC" % max(gaps))

        # a worker dies: the status says so, then serving again
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        wait_for(lambda: any("restarting workers" in l for _, l, _ in listener.lines()), 10,
                 "STATUS= restarting workers", d)
        wait_for(lambda: any(l.startswith("STATUS=serving: %d ranks ready again" % RANKS)
                             for _, l, _ in listener.lines()), 30, "STATUS= ready again", d)
        self.assertEqual(sum(1 for _, l, _ in listener.lines() if l == "READY=1"), 1)
        client.close()

        self.assertIsNone(listener.first("STOPPING=1"))
        d.stop()
        wait_for(lambda: listener.first("STOPPING=1"), 5, "STOPPING=1", d)
        stop_t, log_at_stop = listener.first("STOPPING=1")
        self.assertIn("draining", log_at_stop)

    def test_no_watchdog_without_watchdog_usec(self):
        sock = self.path("systemd-notify.sock")
        holder = {}
        listener = NotifyListener(sock, lambda: holder["d"].log())
        self.addCleanup(listener.close)
        d = self.daemon(self.layer(), name="nowd", env={"NOTIFY_SOCKET": sock,
                                                         "WATCHDOG_USEC": None})
        holder["d"] = d
        d.start()
        wait_for(lambda: listener.first("READY=1"), 10, "READY=1", d)
        time.sleep(1.0)
        self.assertEqual([l for _, l, _ in listener.lines() if l == "WATCHDOG=1"], [])
        d.stop()


# ------------------------------------------------------------------------------------------------
# (d) logging

TIME_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
LINE_RE = r"tpd(?:-worker rank \d+)?: (?P<level>error|warning|notice|info|debug): "
PRIO = {"error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


class TestLogging(OpsCase):

    def start_logged(self, name, journal, *args):
        """Starts tpd with JOURNAL_STREAM: 'self' (its log file's dev:ino), 'other' (some other
        file's) or None (unset)."""
        d = self.daemon(self.layer(), "--cpu", RANKS, "--model", MODEL, *args, name=name)
        d.env.pop("JOURNAL_STREAM", None)
        if journal:
            # Daemon.start truncates the log file, keeping its inode
            target = d.log_path if journal == "self" else self.path("other-file")
            open(target, "wb").close()
            st = os.stat(target)
            d.env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        d.start()
        x = np.random.default_rng(1).standard_normal((2, IN)).astype(np.float32)
        self.forward(d, x)
        d.stop()
        lines = [l for l in d.log().splitlines() if l]
        self.assertGreater(len(lines), 4, d.log_tail())
        return lines

    def test_journal_prefix_and_no_time(self):
        lines = self.start_logged("journal", "self")
        for l in lines:
            m = re.match(r"<(?P<prio>[3-7])>" + LINE_RE, l)
            self.assertTrue(m, "not a journal line: %r" % l)
            self.assertEqual(int(m.group("prio")), PRIO[m.group("level")], l)
            self.assertNotRegex(l, r"\d\d:\d\d:\d\d", "a time under journald: %r" % l)
        self.assertTrue(any(l.startswith("<5>tpd-worker rank 1: notice: loaded rows") for l in lines))
        self.assertFalse(any(re.search(r"accepted request", l) for l in lines))

    def test_terminal_lines_have_time_and_no_prefix(self):
        for journal in (None, "other"):
            with self.subTest(journal=journal):
                lines = self.start_logged("plain%s" % journal, journal)
                for l in lines:
                    self.assertRegex(l, "^" + TIME_RE + LINE_RE, "not a plain line: %r" % l)
                    self.assertFalse(l.startswith("<"), l)
                self.assertFalse(any("accepted request" in l for l in lines), "request line "
                                 "at notice")

    def test_request_lines_only_at_debug(self):
        lines = self.start_logged("debug", "self", "--log-level", "debug")
        acc = [l for l in lines if "accepted request" in l]
        self.assertEqual(len(acc), 1, lines)
        self.assertTrue(acc[0].startswith("<7>tpd: debug: accepted request"), acc[0])


# ------------------------------------------------------------------------------------------------
# (e) ModelConfig


class TestModelConfig(OpsCase):

    def test_get_model_config_and_extensions(self):
        d = self.start_daemon(self.layer(), "--cpu", RANKS, "--model", MODEL, "--max-batch", 32,
                              name="config")
        client = tgrpc.InferenceServerClient(url=d.addr)
        cfg = client.get_model_config(MODEL).config
        self.assertEqual(cfg.name, MODEL)
        self.assertEqual(cfg.platform, "tpd_linear")
        self.assertEqual(cfg.backend, "cpu")
        self.assertEqual(cfg.max_batch_size, 32)
        self.assertEqual(len(cfg.input), 1)
        self.assertEqual(len(cfg.output), 1)
        self.assertEqual(cfg.input[0].name, "input")
        self.assertEqual(cfg.output[0].name, "output")
        self.assertEqual(cfg.input[0].data_type, tgrpc.model_config_pb2.TYPE_FP32)
        self.assertEqual(cfg.output[0].data_type, tgrpc.model_config_pb2.TYPE_FP32)
        self.assertEqual(list(cfg.input[0].dims), [IN])
        self.assertEqual(list(cfg.output[0].dims), [OUT])
        # dynamic batching, with the default delay
        self.assertEqual(cfg.WhichOneof("scheduling_choice"), "dynamic_batching")
        self.assertEqual(cfg.dynamic_batching.max_queue_delay_microseconds, 200)
        as_json = client.get_model_config(MODEL, model_version="1", as_json=True)
        self.assertEqual(as_json["config"]["input"][0]["data_type"], "TYPE_FP32")
        self.assertEqual(as_json["config"]["input"][0]["dims"], [str(IN)])
        for name, version in (("nosuch", ""), (MODEL, "2")):
            with self.assertRaises(InferenceServerException) as cm:
                client.get_model_config(name, model_version=version)
            self.assertIn("NOT_FOUND", str(cm.exception.status()))
            self.assertIn(name if name != MODEL else "'2'", cm.exception.message())
        meta = client.get_server_metadata()
        self.assertEqual(list(meta.extensions), ["model_configuration", "system_shared_memory",
                                                 "statistics", "model_repository"])
        client.close()
        d.stop()
        # batching off: no scheduling choice at all
        d = self.start_daemon(self.layer(), "--cpu", RANKS, "--model", MODEL,
                              "--batch-delay-us", 0, name="config-nobatch")
        client = tgrpc.InferenceServerClient(url=d.addr)
        cfg = client.get_model_config(MODEL).config
        self.assertIsNone(cfg.WhichOneof("scheduling_choice"))
        client.close()
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
