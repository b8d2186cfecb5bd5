"""tpd against clients that hold on to what it gives them, and against a second tpd.

(a) A client that never reads its replies: a real HTTP/2 client (h2, over the unix socket) that
    announces SETTINGS_INITIAL_WINDOW_SIZE 0 and never sends WINDOW_UPDATE opens 6 ModelInfer
    streams, more than the 4 slots; each computed reply is lent from its slot and cannot be sent.
    A well-behaved tritonclient must keep getting right answers within a normal deadline while
    that connection stays open, and the stuck calls must end with RESOURCE_EXHAUSTED (their
    trailers are not flow controlled, so the client sees them) once --reply-timeout-ms (2 s by
    default) passed. A SIGTERM while such calls are stuck ends within a few seconds.
(b) Memory bounded by the queue's bytes: with the only worker stopped (SIGSTOP, so every slot
    stays busy), 400 requests of 2 MiB arrive. tpd's RSS (/proc/PID/status) must stay within what
    the byte bound of the queue (--max-queue-mb, default 256) allows gRPC to hold (1.5 times the
    bound: the queue, and half as much in transit) plus a margin, the requests beyond it get
    RESOURCE_EXHAUSTED naming the flag, the accepted ones get right answers once the worker runs
    again, and the RSS comes back down once they are done. (Under AddressSanitizer, whose
    allocator and quarantine keep freed memory, RSS measures ASan: the bounds are not checked.)
(c) A unix socket that a live tpd serves is not taken over: a second tpd on the same path exits
    non-zero naming the path, before starting any worker, and the first still serves; a socket
    file left by a killed tpd (connect gives ECONNREFUSED) is taken over; a path that is not a
    socket is never removed.
(d) SIGTERM with idle client connections open exits 0 within 2 s (5 s sanitized): a tritonclient
    channel after a call, a socket that never spoke HTTP/2, and an HTTP/2 client that reads
    nothing (so never answers the GOAWAY ping, which gRPC would wait 20 s for).
(e) A peer with a large window that stops reading its socket: gRPC's socket write to it never
    ends, and keeps what it took (replies of 6 jobs, more than the 4 slots) even after their calls
    are cancelled. A well-behaved client is still served (the last slot is never lent out), and a
    SIGTERM gives up on the peer after a bounded wait.
(f) REST clients that stop reading large binary answers, with a reply timeout long enough for
    slow links: the last slot is not lent to them either, and a gRPC client is served at once.
"""

import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import (STARTED_RE, TpdTestCase, free_tcp_port, make_layer, pid_alive,  # noqa: E402
                     sanitized)

import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

TOL = 1e-5
INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(model, x, req_id=""):
    req = pb.ModelInferRequest(model_name=model, id=req_id)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return req


def grpc_frame(msg):
    """One gRPC message on the wire: uncompressed flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(msg)) + msg


class NonReader:
    """An HTTP/2 client that asks for replies and never takes them: its streams' receive window
    is 0 (SETTINGS_INITIAL_WINDOW_SIZE) and it never sends WINDOW_UPDATE. It does read the socket
    and answers SETTINGS and PING as h2 does by itself, so to the server it is a live peer that
    simply does not consume what it asked for. A thread of its own feeds h2; events per stream
    are kept: 'headers' (response HEADERS seen), 'status' (grpc-status of the trailers), 'message'
    (grpc-message) and 'reset' (RST_STREAM error code)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.lock = threading.Lock()
        self.streams = {}
        self.closed = False
        with self.lock:
            self.conn.initiate_connection()
            self.sock.sendall(self.conn.data_to_send())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def call(self, method, msg):
        with self.lock:
            sid = self.conn.get_next_available_stream_id()
            self.streams[sid] = {}
            self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                         (":path", method), (":authority", "localhost"),
                                         ("content-type", "application/grpc"), ("te", "trailers")])
            self.conn.send_data(sid, grpc_frame(msg), end_stream=True)
            self.sock.sendall(self.conn.data_to_send())
        return sid

    def _run(self):
        while not self.stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return
            with self.lock:
                for ev in self.conn.receive_data(data):
                    st = self.streams.get(getattr(ev, "stream_id", None))
                    if st is None:
                        continue
                    if isinstance(ev, h2.events.ResponseReceived):
                        st["headers"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        hd = dict(ev.headers)
                        st["status"] = hd.get("grpc-status")
                        st["message"] = hd.get("grpc-message", "")
                    elif isinstance(ev, h2.events.StreamReset):
                        st["reset"] = ev.error_code
                out = self.conn.data_to_send()
                if out:
                    self.sock.sendall(out)

    def count(self, key):
        with self.lock:
            return sum(key in st for st in self.streams.values())

    def snapshot(self):
        with self.lock:
            return {sid: dict(st) for sid, st in self.streams.items()}

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def vm_kb(pid, field):
    """VmRSS, VmHWM, ... of /proc/PID/status in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


class SlowClientCase(TpdTestCase):

    def layer(self, out, in_, seed):
        wpath = self.path("slow%d.safetensors" % seed)
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=seed)
        return wpath, W, b, os.path.basename(wpath)[:-len(".safetensors")]

    def triton(self, d):
        c = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(c.close)
        return c

    def infer_ok(self, c, model, x, W, b, timeout, what):
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        t0 = time.monotonic()
        r = c.infer(model, [inp], client_timeout=timeout)
        took = time.monotonic() - t0
        self.assert_close(r.as_numpy("output"), x, W, b, TOL, what)
        return took


class TestNonReadingClient(SlowClientCase):

    def test_client_that_never_reads_holds_no_slot(self):
        in_, out = 256, 1024
        wpath, W, b, model = self.layer(out, in_, seed=1)
        # one request per job, so that 6 requests need 6 slots: 4 replies hold all of them
        d = self.start_daemon(wpath, "--cpu", 1, "--slots", 4, "--batch-delay-us", 0,
                              name="nonreader")
        rng = np.random.default_rng(1)
        bad = NonReader(d.sock)
        self.addCleanup(bad.close)
        nbad = 6
        for i in range(nbad):
            x = rng.standard_normal((1, in_)).astype(np.float32)
            bad.call(INFER, infer_request(model, x, "stuck-%d" % i).SerializeToString())
        # the first 4 are computed and their replies started: HEADERS come, DATA cannot
        deadline = time.monotonic() + 20
        while bad.count("headers") < 4:
            self.assertLess(time.monotonic(), deadline, "no replies started: %r\n%s" % (
                bad.snapshot(), d.log_tail()))
            time.sleep(0.02)

        c = self.triton(d)
        self.assertTrue(c.is_server_ready())
        t0 = time.monotonic()
        lat = []
        for i in range(20):
            x = rng.standard_normal((1 + i % 3, in_)).astype(np.float32)
            lat.append(self.infer_ok(c, model, x, W, b, 5, "good request %d" % i))
        total = time.monotonic() - t0
        print("\ngood client with a non-reading connection open: first answer %.3f s, "
              "median %.4f s, 20 in %.2f s" % (lat[0], sorted(lat)[10], total), file=sys.stderr)
        self.assertFalse(bad.closed, "the connection itself was closed")
        # every stuck call ends, as RESOURCE_EXHAUSTED in trailers the client can read
        deadline = time.monotonic() + 20
        while bad.count("status") < nbad:
            self.assertLess(time.monotonic(), deadline, "stuck calls not ended: %r\n%s" % (
                bad.snapshot(), d.log_tail()))
            time.sleep(0.05)
        for sid, st in bad.snapshot().items():
            self.assertEqual(st["status"], "8", "stream %d: %r" % (sid, st))
            self.assertIn("reply-timeout-ms", st["message"], "stream %d: %r" % (sid, st))
        self.infer_ok(c, model, np.ones((2, in_), np.float32), W, b, 5, "after")
        # the same connection asks again and the server is stopped meanwhile: the drain waits for
        # those calls only until their replies time out, then closes the connection
        for i in range(4):
            x = rng.standard_normal((1, in_)).astype(np.float32)
            bad.call(INFER, infer_request(model, x, "again-%d" % i).SerializeToString())
        deadline = time.monotonic() + 20
        while bad.count("headers") < nbad + 4:
            self.assertLess(time.monotonic(), deadline, "no replies started: %r\n%s" % (
                bad.snapshot(), d.log_tail()))
            time.sleep(0.02)
        took = d.stop()
        print("SIGTERM with 4 replies not taken: exit 0 after %.2f s" % took, file=sys.stderr)
        self.assertLess(took, 6.0)


class TestQueuedBytes(SlowClientCase):

    def test_queued_bytes_are_bounded_and_given_back(self):
        in_, out, rows = 1024, 64, 512  # 2 MiB a request, 128 KiB a reply
        wpath, W, b, model = self.layer(out, in_, seed=2)
        # the worker is stopped on purpose, for as long as the burst takes: not a hung job
        d = self.start_daemon(wpath, "--cpu", 1, "--slots", 4, "--max-batch", rows,
                              "--max-queue", 1024, "--job-timeout-ms", 0, name="bytes")
        pid = d.proc.pid
        asan = sanitized(pid)
        rng = np.random.default_rng(2)
        xs = [rng.standard_normal((rows, in_)).astype(np.float32) for _ in range(4)]
        payloads = [infer_request(model, x).SerializeToString() for x in xs]
        opts = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]
        channels = [grpc.insecure_channel(d.addr, options=opts + [("grpc.use_local_subchannel_pool",
                                                                    1)]) for _ in range(4)]
        for ch in channels:
            self.addCleanup(ch.close)
        calls = [ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)
                 for ch in channels]
        # warm up: the paths that a request of this size takes, then the resting RSS
        for i in range(8):
            resp = pb.ModelInferResponse.FromString(calls[i % 4](payloads[i % 4], timeout=30))
            y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(rows, out)
            self.assert_close(y, xs[i % 4], W, b, TOL, "warm-up %d" % i)
        time.sleep(0.5)
        base = vm_kb(pid, "VmRSS") / 1024.0

        worker = int(STARTED_RE.findall(d.log())[-1][1])
        os.kill(worker, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(worker) and os.kill(worker, signal.SIGCONT))
        peak = [base]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], vm_kb(pid, "VmRSS") / 1024.0)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        n = 400
        results = [None] * n
        done = threading.Semaphore(0)

        def finished(i, fut):
            try:
                results[i] = ("OK", fut.result())
            except grpc.RpcError as e:
                results[i] = (e.code().name, e.details())
            done.release()

        t0 = time.monotonic()
        for i in range(n):
            fut = calls[i % 4].future(payloads[i % 4], timeout=120)
            fut.add_done_callback(lambda f, i=i: finished(i, f))
        # the refused come back while the worker is stopped; the accepted wait for it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answered = sum(r is not None for r in results)
            time.sleep(2.0)
            if answered == sum(r is not None for r in results):
                break
        refused = [r for r in results if r is not None and r[0] != "OK"]
        os.kill(worker, signal.SIGCONT)
        for _ in range(n):
            self.assertTrue(done.acquire(timeout=120), "a request got no answer\n" + d.log_tail())
        sampling.set()
        sampler.join()
        codes = {}
        for r in results:
            codes[r[0]] = codes.get(r[0], 0) + 1
        ok = [(i, r[1]) for i, r in enumerate(results) if r[0] == "OK"]
        for i, body in ok:
            resp = pb.ModelInferResponse.FromString(body)
            y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(rows, out)
            self.assert_close(y, xs[i % 4], W, b, TOL, "request %d" % i)
        # once the clients are gone, the memory goes back
        for ch in channels:
            ch.close()
        after = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = vm_kb(pid, "VmRSS") / 1024.0
            if after < base + 96:
                break
            time.sleep(0.2)
        print("\n%d requests of 2 MiB, worker stopped: RSS %.0f MB at rest, %.0f MB at the "
              "peak, %.0f MB after; %s in %.1f s" % (n, base, peak[0], after, codes,
                                                     time.monotonic() - t0), file=sys.stderr)
        if asan:
            print("tpd runs under AddressSanitizer: RSS bounds not checked", file=sys.stderr)
        else:
            self.assertLess(peak[0], base + 256 * 1.5 + 128,
                            "RSS grew from %.0f to %.0f MB with requests queued\n%s" % (
                                base, peak[0], d.log_tail()))
            self.assertLess(after, base + 96, "RSS stayed at %.0f MB after the burst (%.0f at "
                            "rest)\n%s" % (after, base, d.log_tail()))
        self.assertGreater(len(ok), 4, codes)
        self.assertEqual(set(codes) - {"OK", "RESOURCE_EXHAUSTED"}, set(), codes)
        self.assertTrue(refused, "nothing was refused: %s" % codes)
        # the queue refuses by name; gRPC's quota may also reset a few streams (RESOURCE_EXHAUSTED
        # too) when more is in transit than it allows, as on a slow (sanitized) build
        self.assertTrue(any("--max-queue-mb" in r[1] for r in refused), refused[:3])
        self.assertLess(d.stop(), 5.0)


class TestUnixSocketOwner(SlowClientCase):

    def test_live_socket_is_not_taken_over(self):
        wpath, W, b, model = self.layer(96, 32, seed=3)
        sock = self.path("shared.sock")
        first = self.start_daemon(wpath, "--cpu", 1, name="first", listen="unix:" + sock)
        second = self.daemon(wpath, "--cpu", 1, name="second", listen="unix:" + sock)
        second.start(wait_ready=False)
        rc = second.wait_exit(20)
        log = second.log()
        self.assertNotEqual(rc, 0, log)
        self.assertIn(sock, log, "the error does not name the path")
        self.assertRegex(log, r"(?i)another server|in use|already", log)
        self.assertEqual(STARTED_RE.findall(log), [], "workers started before the refusal")
        self.assertTrue(first.running())
        x = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)
        self.infer_ok(self.triton(first), model, x, W, b, 10, "first after the second")
        self.assertLess(first.stop(), 5.0)
        self.assertFalse(os.path.exists(sock), "the socket file is left after a clean stop")

    def test_stale_socket_is_taken_over(self):
        wpath, W, b, model = self.layer(96, 32, seed=4)
        sock = self.path("stale.sock")
        first = self.start_daemon(wpath, "--cpu", 1, name="killed", listen="unix:" + sock)
        first.kill()
        self.assertTrue(os.path.exists(sock), "a killed tpd removed its socket?")
        with self.assertRaises(ConnectionRefusedError):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock)
            finally:
                s.close()
        second = self.start_daemon(wpath, "--cpu", 1, name="heir", listen="unix:" + sock)
        x = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
        self.infer_ok(self.triton(second), model, x, W, b, 10, "on the stale path")
        self.assertLess(second.stop(), 5.0)

    def test_path_that_is_not_a_socket_is_kept(self):
        wpath, W, b, model = self.layer(96, 32, seed=5)
        path = self.path("file.sock")
        with open(path, "w") as f:
            f.write("not a socket\n")
        d = self.daemon(wpath, "--cpu", 1, name="file", listen="unix:" + path)
        d.start(wait_ready=False)
        rc = d.wait_exit(20)
        self.assertNotEqual(rc, 0, d.log())
        self.assertIn(path, d.log())
        self.assertIn("not a socket", d.log())
        self.assertEqual(STARTED_RE.findall(d.log()), [], "workers started before the refusal")
        with open(path) as f:
            self.assertEqual(f.read(), "not a socket\n")


class TestPromptStop(SlowClientCase):

    def test_sigterm_with_idle_connection(self):
        wpath, W, b, model = self.layer(96, 32, seed=6)
        for listen in (None, "127.0.0.1:%d" % free_tcp_port()):
            with self.subTest(listen=listen or "unix"):
                d = self.start_daemon(wpath, "--cpu", 1, listen=listen,
                                      name="idle%d" % bool(listen))
                asan = sanitized(d.proc.pid)
                c = tgrpc.InferenceServerClient(url=d.addr)
                self.addCleanup(c.close)
                x = np.ones((1, 32), np.float32)
                self.infer_ok(c, model, x, W, b, 10, "before the stop")
                if listen:
                    host, port = listen.split(":")
                    raw = socket.create_connection((host, int(port)))
                else:
                    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    raw.connect(d.sock)
                self.addCleanup(raw.close)
                if listen:
                    silent = None
                else:
                    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    silent.connect(d.sock)
                    conn = h2.connection.H2Connection(
                        config=h2.config.H2Configuration(client_side=True))
                    conn.initiate_connection()
                    silent.sendall(conn.data_to_send())
                    self.addCleanup(silent.close)
                time.sleep(0.3)
                took = d.stop()
                print("\nSIGTERM with an idle connection open (%s): exit 0 after %.3f s" % (
                    listen or "unix", took), file=sys.stderr)
                # the bug took 20 s (gRPC's wait for the GOAWAY ping); the exit of a sanitized
                # tpd and its workers alone can take a good part of a second on a busy machine
                self.assertLess(took, 5.0 if asan else 2.0, d.log_tail())

    def test_sigterm_with_a_peer_that_stopped_reading(self):
        # A peer that asked for large replies with a large window, then never reads its socket:
        # gRPC's write to it never finishes, and the connection never closes. What that write
        # took stays referenced until then, cancelled calls or not: replies sent from their slot
        # would keep every slot, and no other client would be served again. tpd never lends the
        # last slot out, so a well-behaved client is served all along. The stop gives up on the
        # peer after a bounded wait, says so, and exits 0 (it used to wait forever).
        wpath, W, b, model = self.layer(4096, 32, seed=7)
        # one request per job: 6 replies of 256 KiB, more than the 4 slots
        d = self.start_daemon(wpath, "--cpu", 1, "--slots", 4, "--batch-delay-us", 0,
                              name="stuckwrite")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(d.sock)
        self.addCleanup(sock.close)
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.initiate_connection()
        conn.increment_flow_control_window(2**30)
        x = np.ones((16, 32), np.float32)
        for _ in range(6):  # one at a time: each reply is written (and stalls) before the next
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", INFER),
                                    (":authority", "localhost"),
                                    ("content-type", "application/grpc"), ("te", "trailers")])
            conn.send_data(sid, grpc_frame(infer_request(model, x).SerializeToString()),
                           end_stream=True)
            sock.sendall(conn.data_to_send())
            time.sleep(0.2)
        # past --reply-timeout-ms (2 s): the calls are cancelled, what the write took is not
        # given back
        time.sleep(2.5)
        c = self.triton(d)
        self.infer_ok(c, model, x[:1], W, b, 10, "a well-behaved client meanwhile")
        took = d.stop()
        print("\nSIGTERM with a peer that stopped reading: exit 0 after %.3f s" % took,
              file=sys.stderr)
        self.assertLess(took, 12.0, d.log_tail())
        self.assertIn("did not close within", d.log())
        self.assertFalse(os.path.exists(d.sock), "unix socket left behind")


class TestRestReaders(SlowClientCase):
    """REST clients that ask for large binary answers and then do not read them, on connections
    whose receive buffer is small: libmicrohttpd's write of each answer stalls, and with a reply
    timeout long enough for slow links (20 s here) the connections stay open meanwhile. Their
    answers must not take the last slot: a gRPC client is served beside them."""

    def test_stalled_readers_leave_a_slot(self):
        wpath, W, b, model = self.layer(4096, 32, seed=8)
        # one request per job: 6 answers of 16 MiB, more than the 4 slots (and than what the
        # kernel buffers of a connection take)
        d = self.start_daemon(wpath, "--cpu", 1, "--slots", 4, "--batch-delay-us", 0,
                              "--max-batch", 1024, "--reply-timeout-ms", 20000, name="stalled")
        x = np.ones((1024, 32), np.float32)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        body, json_size = thttp.InferenceServerClient.generate_request_body(
            [inp], outputs=[thttp.InferRequestedOutput("output", binary_data=True)])
        host, port = d.http_addr().rsplit(":", 1)
        head = ("POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/octet-stream\r\n"
                "Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (
                    model, json_size, len(body))).encode()
        readers = []
        for _ in range(6):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            self.addCleanup(s.close)
            s.sendall(head + body)
            readers.append(s)
        # every answer has started: its status line is the first thing each connection gets
        for i, s in enumerate(readers):
            s.settimeout(15)
            try:
                self.assertTrue(s.recv(64).startswith(b"HTTP/1.1 200"), d.log_tail())
            except socket.timeout:
                self.fail("answer %d did not start in 15 s: stalled readers hold every slot" % i)
        c = self.triton(d)
        took = self.infer_ok(c, model, x[:1], W, b, 10, "a gRPC client beside 6 stalled readers")
        print("\ngRPC client beside 6 stalled REST readers: answered in %.3f s" % took,
              file=sys.stderr)
        self.assertLess(took, 5.0, "the gRPC client waited for a stalled reader's slot")

if __name__ == "__main__":
    unittest.main(verbosity=2)
