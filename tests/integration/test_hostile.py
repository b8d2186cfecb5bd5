"""tpd against hostile or careless peers. In every test a well-behaved client (loadgen.Load:
tritonclient connections, every answer checked against the float64 NumPy reference) keeps
running meanwhile, and must get only correct answers.

(a) SIGHUP (a terminal hangup, `kill -HUP`, a careless `systemctl kill -s HUP`): tpd logs it and
    keeps serving with the same workers; calls in flight are answered; HTTP and gRPC readiness
    agree; SIGTERM then drains and removes the unix socket.
(b) workers start with default signal dispositions and an empty signal mask, although tpd
    ignores SIGPIPE and blocks its stop signals and SIGHUP.
(c) 70 HTTP clients that each trickle one header line every 3 s (and reconnect when they are
    dropped) hold the metrics server's connections: /v2/health/ready still answers within 2.5 s,
    again and again, /metrics is scraped, the tricklers are dropped, and the server's own
    parser answers odd requests right (percent escapes, a query, bare LF, HEAD, POST, NUL,
    bad request lines, a head over 8 KiB).
(d) strings that are not proto3 strings: a NUL inside (the datatype "FP32\\0junk", a model name,
    an input or output name) or bytes that are not UTF-8 (the request id, parameter keys and
    values). Raw gRPC with the bytes built by hand, since protobuf refuses to serialize them:
    each gets INVALID_ARGUMENT naming the field, a valid non-ASCII id is echoed unchanged.
(e) shared-memory keys that name no object: '..', '/', a directory, a key with '/' inside, a
    FIFO, a symlink get INVALID_ARGUMENT; a key of no object NOT_FOUND; never INTERNAL.
(f) tpclient against a fake server whose metadata claims absurd sizes (in, out, max_batch near
    2^62, max_batch of the wrong type): one clear error line, no crash; then tpclient against
    the real tpd is served.
"""

import http.client
import os
import re
import signal
import socket
import sys
import threading
import time
import unittest
from concurrent import futures

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadgen import Load  # noqa: E402
from tpdtest import (TpdTestCase, make_layer, one_line_error, pid_alive, reference,  # noqa: E402
                     rel_err, tpclient, wait_for)

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS, MAX_BATCH = 32, 24, 2, 64
MODEL = "hostile"
INV = grpc.StatusCode.INVALID_ARGUMENT


def http_get(base, path, timeout):
    """(status, body, seconds) of one GET on a fresh connection; raises on a timeout."""
    host, port = base[len("http://"):].rsplit(":", 1)
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        return r.status, body, time.monotonic() - t0
    finally:
        c.close()


def raw_http(base, data, timeout=3.0):
    """The status code the metrics server answers to the bytes data, sent as they are."""
    host, port = base[len("http://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", got)
    if not m:
        raise AssertionError("not an HTTP response to %r: %r" % (data[:60], got[:200]))
    return int(m.group(1))


def raw_call(channel, method):
    """A unary call that sends and returns bytes as they are."""
    return channel.unary_unary("/inference.GRPCInferenceService/" + method,
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)


def patch(data, placeholder, raw):
    """data with the one occurrence of placeholder (bytes) replaced by raw, of the same length,
    so that every length prefix stays right."""
    assert len(placeholder) == len(raw), (placeholder, raw)
    assert data.count(placeholder) == 1, (placeholder, data)
    return data.replace(placeholder, raw)


def signal_names(mask):
    """The names of the signals in a /proc/PID/status mask (SigIgn, SigBlk)."""
    names = []
    for s in range(1, 65):
        if mask >> (s - 1) & 1:
            try:
                names.append(signal.Signals(s).name)
            except ValueError:
                names.append(str(s))
    return names


class HostileCase(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("hostile.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=23)

    def serve(self, *args, name="hostile"):
        return self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                                 "--model", MODEL, *args, name=name)

    def load(self, d, clients=2, seed=0):
        ld = Load(d.addr, MODEL, self.W, self.b, clients=clients, seed=seed,
                  batches=(1, 3, 8, 64))
        self.addCleanup(ld.stop, 5)
        ld.start()
        self.assertTrue(ld.wait_ok(3, timeout=30), "no answers at start\n" + d.log_tail())
        return ld

    def finish(self, d, ld):
        """Stops the load: no hang, no wrong answer, nothing but OK."""
        hung = ld.stop()
        self.assertEqual(hung, [], "clients hung\n" + d.log_tail())
        self.assertEqual(ld.errors, [], "load generator errors")
        self.assertEqual(ld.wrong(), [], "WRONG ANSWERS")
        out = dict(ld.outcomes())
        self.assertEqual(set(out), {"OK"}, "outcomes %s; e.g. %s\n%s" % (
            out, [r.detail for r in ld.snapshot() if r.outcome != "OK"][:3], d.log_tail()))
        return out

    def check(self, y, x, what):
        ref, mag = reference(x, self.W, self.b)
        self.assertEqual(y.shape, ref.shape, what)
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, TOL, "%s: relative error %.3g" % (what, err))


class TestSighup(HostileCase):

    def test_sighup_is_logged_and_serving_goes_on(self):
        d = self.serve("--log-level", "debug")
        pids = d.worker_pids()
        base = d.metrics_url()
        ld = self.load(d)
        triton = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(triton.close)
        for i in range(3):
            self.assertTrue(ld.wait_inflight(1), "no request in flight for SIGHUP %d" % i)
            d.send(signal.SIGHUP)
            # handled (its notice), and tpd is still there
            wait_for(lambda: d.count(r"tpd: notice: SIGHUP") >= i + 1, 10,
                     "the notice of SIGHUP %d" % i, d)
            self.assertTrue(d.running(), "tpd died of SIGHUP %d\n%s" % (i, d.log_tail()))
        mark = time.monotonic()
        self.assertTrue(ld.wait_ok(10, since=mark), "no answers after SIGHUP\n" + d.log_tail())
        self.assertEqual(d.count(r"tpd: notice: SIGHUP"), 3, "one notice per SIGHUP\n" +
                         d.log_tail())
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        # a hangup of the whole process group (tpd runs in a session of its own) kills no worker
        os.killpg(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: d.count(r"tpd: notice: SIGHUP") == 4, 10, "the group's SIGHUP", d)
        mark = time.monotonic()
        self.assertTrue(ld.wait_ok(10, since=mark), "no answers after the group's SIGHUP\n" +
                        d.log_tail())
        self.assertTrue(d.running(), "tpd died of its group's SIGHUP\n" + d.log_tail())
        for rank, pid in pids.items():
            self.assertTrue(pid_alive(pid), "rank %d died of its group's SIGHUP" % rank)
        self.assertEqual(d.worker_pids(), pids, "a worker died of its group's SIGHUP")
        self.assertEqual(d.count("restarting the group"), 0, d.log_tail())
        # one rule for readiness: HTTP and gRPC agree
        self.assertEqual(http_get(base, "/v2/health/ready", 5)[0], 200)
        self.assertTrue(triton.is_server_ready(client_timeout=10))
        self.assertTrue(triton.is_model_ready(MODEL, client_timeout=10))
        out = self.finish(d, ld)
        d.stop()
        self.assertFalse(os.path.exists(d.sock), "unix socket left behind")
        print("sighup: 3 signals under load, outcomes %s" % out)


class TestWorkerSignals(HostileCase):

    def test_workers_get_default_dispositions_and_no_mask(self):
        d = self.serve()
        pids = d.worker_pids()
        self.assertEqual(len(pids), RANKS)
        ld = self.load(d)
        for rank, pid in sorted(pids.items()):
            with open("/proc/%d/status" % pid) as f:
                st = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
            ign, blk = int(st["SigIgn"], 16), int(st["SigBlk"], 16)
            # inherited: nothing; the worker itself ignores SIGHUP (a hangup is tpd's to handle)
            self.assertEqual(ign, 1 << (signal.SIGHUP - 1),
                             "rank %d pid %d ignores signals other than SIGHUP: %s" % (
                                 rank, pid, signal_names(ign)))
            self.assertEqual(blk, 0, "rank %d pid %d starts with signals blocked: %s" % (
                rank, pid, signal_names(blk)))
        self.finish(d, ld)
        d.stop()


class Trickler:
    """n connections to (host, port) that each send a request line, then one header line every
    period seconds, never the end of the head; a connection the server closes is opened again
    at the next round. reconnects counts how often that happened."""

    def __init__(self, host, port, n, period):
        self.addr, self.n, self.period = (host, port), n, period
        self.socks = [None] * n
        self.lines = 0
        self.reconnects = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open(self, i):
        try:
            s = socket.create_connection(self.addr, timeout=2)
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: tpd\r\n")
            self.socks[i] = s
        except OSError:
            self.socks[i] = None

    def run(self):
        for i in range(self.n):
            self.open(i)
        while not self.stopping.wait(self.period):
            for i in range(self.n):
                s = self.socks[i]
                if s is not None:
                    try:
                        s.sendall(b"X-Slow-%d: %d\r\n" % (i, self.lines))
                        self.lines += 1
                        continue
                    except OSError:
                        s.close()
                self.reconnects += 1
                self.open(i)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        for s in self.socks:
            if s is not None:
                s.close()


class TestHealthStarvation(HostileCase):

    def test_health_answers_promptly_under_tricklers(self):
        d = self.serve()
        base = d.metrics_url()
        host, port = base[len("http://"):].rsplit(":", 1)
        ld = self.load(d)
        tr = Trickler(host, int(port), 70, 3.0).start()
        self.addCleanup(tr.stop)
        time.sleep(1.0)
        slowest, probes = 0.0, 0
        t_end = time.monotonic() + 14  # past any idle timeout that the trickle would reset
        # starved, a probe would wait for a trickler's next byte (3 s) or its header timeout
        # (5 s); a busy machine alone can delay one by a good part of a second
        while time.monotonic() < t_end:
            try:
                status, body, secs = http_get(base, "/v2/health/ready", 2.5)
            except OSError as e:
                self.fail("GET /v2/health/ready %d: no answer within 2.5 s (%r) with 70 "
                          "trickling clients\n%s" % (probes, e, d.log_tail()))
            self.assertEqual((status, body), (200, "ready\n"))
            self.assertLess(secs, 2.5)
            slowest = max(slowest, secs)
            probes += 1
            time.sleep(0.5)
        status, body, _ = http_get(base, "/metrics", 2.0)
        self.assertEqual(status, 200)
        self.assertIn("tpd_requests_total", body)
        self.assertGreater(tr.reconnects, 0, "the server held every trickling connection")
        # the requests a parser of its own must still get right, tricklers or not
        for data, want in ((b"GET /v2/models/host%69le/ready HTTP/1.1\r\nHost: x\r\n\r\n", 200),
                           (b"GET /v2/health/ready?probe=1 HTTP/1.0\r\n\r\n", 200),
                           (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200),
                           (b"GET /v2/health/ready HTTP/1.1\n\n", 200),
                           (b"POST /v2/health/ready HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                            405),
                           (b"GET /v2/models/a%00b/ready HTTP/1.1\r\n\r\n", 400),
                           (b"GET /v2/health/re\0ady HTTP/1.1\r\n\r\n", 400),
                           (b"GARBAGE\r\n\r\n", 400),
                           (b"GET / HTTP/2.0\r\n\r\n", 400),
                           (b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"y" * 9000 + b"\r\n\r\n",
                            431)):
            self.assertEqual(raw_http(base, data), want, data[:60])
        tr.stop()
        out = self.finish(d, ld)
        self.assertTrue(d.running(), d.log_tail())
        print("health under 70 tricklers: %d probes, slowest %.3f s; %d trickled lines, "
              "%d reconnects; outcomes %s" % (probes, slowest, tr.lines, tr.reconnects, out))
        d.stop()


class TestStrings(HostileCase):

    def setUp(self):
        super().setUp()
        self.d = self.serve()
        self.channel = grpc.insecure_channel(self.d.addr)
        self.addCleanup(self.channel.close)
        self.infer = raw_call(self.channel, "ModelInfer")
        self.rng = np.random.default_rng(3)

    def request(self, rows=2):
        x = self.rng.standard_normal((rows, IN)).astype(np.float32)
        r = pb.ModelInferRequest(model_name=MODEL, id="req-ok")
        t = r.inputs.add()
        t.name = "input"
        t.datatype = "FP32"
        t.shape.extend(x.shape)
        r.raw_input_contents.append(x.astype("<f4").tobytes())
        return r, x

    def refused(self, data, field, what):
        with self.assertRaises(grpc.RpcError, msg=what) as cm:
            self.infer(data, timeout=30)
        e = cm.exception
        self.assertEqual(e.code(), INV, "%s: %s %r" % (what, e.code(), e.details()))
        self.assertIn("'%s'" % field, e.details(), "%s: message does not name the field" % what)
        return e.details()

    def served(self, data, x, what):
        resp = pb.ModelInferResponse.FromString(self.infer(data, timeout=30))
        y = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(x.shape[0], OUT)
        self.check(y, x, what)
        return resp

    def test_nul_and_bad_utf8_are_refused_naming_the_field(self):
        ld = self.load(self.d)
        msgs = {}

        r, _ = self.request()
        r.inputs[0].datatype = "FP32\0junk"
        msgs["datatype"] = self.refused(r.SerializeToString(), "inputs[0].datatype",
                                        "datatype with a NUL")
        r, _ = self.request()
        r.model_name = MODEL + "\0other"
        self.refused(r.SerializeToString(), "model_name", "model name with a NUL")
        r, _ = self.request()
        r.inputs[0].name = "input\0"
        self.refused(r.SerializeToString(), "inputs[0].name", "input name with a NUL")
        r, _ = self.request()
        o = r.outputs.add()
        o.name = "outpuX"
        self.refused(patch(r.SerializeToString(), b"outpuX", b"outp\xc0\x80"),
                     "outputs[0].name", "output name with an overlong NUL")
        r, _ = self.request()
        r.id = "IDID"
        msgs["id"] = self.refused(patch(r.SerializeToString(), b"IDID", b"\xff\xfe\xfd\xfc"),
                                  "id", "id that is not UTF-8")
        r, _ = self.request()
        r.id = "IDIDID"
        self.refused(patch(r.SerializeToString(), b"IDIDID", b"id\xed\xa0\x80x"), "id",
                     "id with a surrogate")
        r, _ = self.request()
        r.parameters["KEYKEY"].string_param = "v"
        self.refused(patch(r.SerializeToString(), b"KEYKEY", b"key\xe2\x82z"),
                     "parameters[0].key", "request parameter key cut in a character")
        r, _ = self.request()
        r.inputs[0].parameters["shared_memory_region"].string_param = "VALVAL"
        self.refused(patch(r.SerializeToString(), b"VALVAL", b"val\x80\x80\x80"),
                     "inputs[0].parameters[0].value.string_param",
                     "input parameter value that is not UTF-8")
        # other methods: a model name with a NUL is not the served model
        ready = raw_call(self.channel, "ModelReady")
        with self.assertRaises(grpc.RpcError) as cm:
            ready(pb.ModelReadyRequest(name=MODEL + "\0").SerializeToString(), timeout=10)
        self.assertEqual(cm.exception.code(), INV, cm.exception.details())
        self.assertIn("'name'", cm.exception.details())

        # valid UTF-8 beyond ASCII is a string like any other, echoed as it came
        r, x = self.request()
        r.id = "r\u00e9q-\u2713-\U0001F600"
        resp = self.served(r.SerializeToString(), x, "non-ASCII id")
        self.assertEqual(resp.id, r.id)
        r, x = self.request()
        self.served(r.SerializeToString(), x, "plain request")
        out = self.finish(self.d, ld)
        print("strings: refused with %r and %r; load %s" % (msgs["datatype"], msgs["id"], out))
        self.d.stop()


class TestShmKeys(HostileCase):

    def test_bad_keys_are_invalid_argument_or_not_found(self):
        d = self.serve()
        ld = self.load(d)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        tag = "tpdhostile%d" % os.getpid()
        made = []

        def shm_path(name):
            p = os.path.join("/dev/shm", name)
            made.append(p)
            return p
        os.mkdir(shm_path(tag + "-dir"))
        self.addCleanup(os.rmdir, "/dev/shm/%s-dir" % tag)
        os.mkfifo(shm_path(tag + "-fifo"))
        self.addCleanup(os.unlink, "/dev/shm/%s-fifo" % tag)
        os.symlink("/etc/hostname", shm_path(tag + "-link"))
        self.addCleanup(os.unlink, "/dev/shm/%s-link" % tag)

        cases = [("..", "INVALID_ARGUMENT"), ("/..", "INVALID_ARGUMENT"),
                 (".", "INVALID_ARGUMENT"), ("/", "INVALID_ARGUMENT"),
                 ("/%s-dir/x" % tag, "INVALID_ARGUMENT"), ("/a/../b", "INVALID_ARGUMENT"),
                 ("/%s-dir" % tag, "INVALID_ARGUMENT"), ("/%s-fifo" % tag, "INVALID_ARGUMENT"),
                 ("/%s-link" % tag, "INVALID_ARGUMENT"), ("/" + "k" * 130, "INVALID_ARGUMENT"),
                 ("/%s-none" % tag, "NOT_FOUND")]
        got = {}
        for key, want in cases:
            with self.assertRaises(InferenceServerException, msg=key) as cm:
                client.register_system_shared_memory("r", key, 64)
            status = (cm.exception.status() or "").split(".")[-1]
            got[key] = status
            self.assertEqual(status, want, "key %r: %s %r" % (key, status,
                                                              cm.exception.message()))
            if len(key) < 40:
                self.assertIn(key, cm.exception.message(), "key %r not named" % key)
        self.assertEqual(len(client.get_system_shared_memory_status().regions), 0)
        out = self.finish(d, ld)
        print("shm keys: %s; load %s" % (got, out))
        d.stop()


def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def length_delimited(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


class FakeServer:
    """ModelMetadata from self.layout (in, out, max_batch: an int, a string, or None for none),
    with max_batch in tpd's parameters (field 100, which tritonclient's stubs lack, so the bytes
    are made here); ModelInfer answers the claimed shape with no data."""

    def __init__(self):
        self.layout = None

    def model_metadata(self, request, context):
        in_, out, mb = self.layout
        r = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake")
        r.inputs.add(name="input", datatype="FP32", shape=[-1, in_])
        r.outputs.add(name="output", datatype="FP32", shape=[-1, out])
        data = r.SerializeToString()
        if mb is not None:
            p = pb.InferParameter(string_param=mb) if isinstance(mb, str) else \
                pb.InferParameter(int64_param=mb)
            entry = length_delimited(1, b"max_batch") + length_delimited(2, p.SerializeToString())
            data += length_delimited(100, entry)
        return data

    def model_infer(self, request, context):
        _, out, _ = self.layout
        rows = request.inputs[0].shape[0]
        r = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        r.outputs.add(name="output", datatype="FP32", shape=[rows, out])
        r.raw_output_contents.append(b"")
        return r.SerializeToString()

    def handler(self):
        def method(fn, req):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=lambda b: b)
        return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelMetadata": method(self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": method(self.model_infer, pb.ModelInferRequest)})


class TestClientBounds(HostileCase):

    def test_tpclient_refuses_absurd_layouts(self):
        fake = FakeServer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((fake.handler(),))
        sock = self.path("fake.sock")
        server.add_insecure_port("unix:" + sock)
        server.start()
        self.addCleanup(server.stop, None)
        x = np.random.default_rng(2).standard_normal((2, IN)).astype(np.float32)
        np.save(self.path("x.npy"), x)
        big = 1 << 62
        cases = [((IN, big, None), str(big)), ((IN, big, 1), str(big)),
                 ((IN, 1 << 31, None), str(1 << 31)), ((IN, OUT, big), str(big)),
                 ((IN, OUT, -5), "-5"), ((IN, OUT, "64"), "max_batch"),
                 ((IN, 4 << 20, 1 << 20), "max_batch")]
        for layout, word in cases:
            fake.layout = layout
            res = self.run_tpclient("--server", "unix:" + sock, "forward", self.path("x.npy"),
                                    "-o", self.path("y.npy"), "--model", "m")
            self.assertEqual(res.rc, 1, "layout %s: %r" % (layout, res))
            line = one_line_error(self, res)
            self.assertIn("server claims", line, "layout %s" % (layout,))
            self.assertIn(word, line, "layout %s" % (layout,))
        # a sane fake layout is still taken (the answer then has no data: an error, not a crash)
        fake.layout = (IN, OUT, 8)
        res = self.run_tpclient("--server", "unix:" + sock, "forward", self.path("x.npy"),
                                "-o", self.path("y.npy"), "--model", "m")
        self.assertEqual(res.rc, 1, repr(res))
        self.assertIn("server answered something else", one_line_error(self, res))
        # and the real tpd is served
        d = self.serve()
        y = self.forward(d, x, model=MODEL)
        self.check(y, x, "tpclient forward against tpd")
        d.stop()

    def run_tpclient(self, *args):
        return tpclient(*args, timeout=30)


if __name__ == "__main__":
    unittest.main(verbosity=2)
