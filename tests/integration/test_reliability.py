"""tpd under faults: workers killed under load, workers that keep dying at start, the coordinator
killed, a full queue, messages over the size limit, and garbage on the listening sockets.

Load comes from loadgen.Load: concurrent tritonclient connections, random batch sizes, every
answer checked against the float64 NumPy reference. The rule everywhere: a request either gets
the right answer or a proper failure status; never a wrong answer, never a hang.

(a) kill -9 a worker under load, several times: requests in flight fail UNAVAILABLE, readiness
    turns false, then true again once the group is rebuilt (new pids for every rank), and
    requests succeed again. The recovery time (kill -> ready) is printed, median of the kills.
(b) a worker that keeps dying at start (a --worker wrapper that runs the real worker only the
    first time): tpd logs why, backs off with a doubling delay, stays not-ready and does not
    spin (its CPU time stays small); once the worker can start again, tpd is ready again.
(c) kill -9 tpd under load: every worker exits by itself, nothing is left in /dev/shm. Once
    through PR_SET_PDEATHSIG, and once through EOF on the control socket alone: a --worker
    wrapper runs the real worker as its own child, which has no parent-death signal (it is not
    inherited across fork), so only the closed socket can tell it that tpd is gone.
(d) --slots 1 --max-queue 1 with the only slot held (its worker stopped with SIGSTOP): one more
    request waits, the ones after it get RESOURCE_EXHAUSTED at once; after SIGCONT the two
    accepted requests get their right answers.
(e) a message over the size limit gets RESOURCE_EXHAUSTED from gRPC; other clients are served.
(g) a start that fails after the listen addresses are bound (a worker that cannot start, a
    second address that cannot be bound) exits 1 with the reason, not with an abort, and
    removes the unix socket it made.
(f) random bytes, broken HTTP/2 and idle half-open connections on the TCP port and on the unix
    socket do not disturb the clients that are being served.
"""

import os
import re
import signal
import socket
import statistics
import struct
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from loadgen import Load  # noqa: E402
from tpdtest import (ACCEPTED_RE, TpdTestCase, make_layer, one_line_error, pid_alive,  # noqa: E402
                     shm_entries, wait_gone)

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pbg  # noqa: E402

TOL = 1e-5
PORT_RE = re.compile(r"listening on 127\.0\.0\.1:0 \(port (\d+),")
BACKOFF_RE = re.compile(r"restarting the group in (\d+) ms")


def cpu_seconds(pid):
    """utime + stime of pid, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_status(channel):
    """grpc.health.v1.Health/Check of service "": 1 SERVING, 2 NOT_SERVING (the response is one
    enum field, number 1)."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda m: m, response_deserializer=lambda m: m)
    resp = check(b"", timeout=10)
    if resp[:1] != b"\x08" or len(resp) != 2:
        raise AssertionError("unexpected health response %r" % resp)
    return resp[1]


STATUS_FIELDS = ("Name", "State", "PPid", "Tgid")


def proc_status(pid):
    """The STATUS_FIELDS of /proc/PID/status as {field: value}; {} once pid is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {k: fields[k].strip() for k in STATUS_FIELDS if k in fields}


def processes_with(needle):
    """{pid: proc_status(pid)} of live processes whose command line contains needle (bytes). The
    status is read as soon as the pid is found: such a process may be about to vanish, and a
    failure message needs to say what it was."""
    found = {}
    for e in os.listdir("/proc"):
        if e.isdigit() and pid_alive(int(e), needle):
            found[int(e)] = proc_status(int(e))
    return found


def describe_processes(found, workers):
    """One line per pid of processes_with(), saying whether it is one of the worker pids."""
    return "\n".join("  pid %d: %s; %s" % (
        pid, ", ".join("%s %s" % kv for kv in st.items()) or "gone before its status was read",
        "a worker pid from the log" if pid in workers else "not a worker pid from the log")
        for pid, st in sorted(found.items()))


class ReliabilityCase(TpdTestCase):

    def layer(self, out, in_, seed):
        wpath = self.path("rel%d.safetensors" % seed)
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=seed)
        return wpath, W, b

    def load(self, d, model, W, b, **kw):
        ld = Load(d.addr, model, W, b, **kw)
        self.addCleanup(ld.stop, 5)
        return ld.start()

    def triton(self, d):
        c = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(c.close)
        return c

    def finish(self, d, ld, allowed=("OK",)):
        """Stops the load and checks: no hang, no wrong answer, only allowed outcomes."""
        hung = ld.stop()
        self.assertEqual(hung, [], "clients hung\n" + d.log_tail())
        self.assertEqual(ld.errors, [], "load generator errors")
        wrong = ld.wrong()
        self.assertEqual(wrong, [], "WRONG ANSWERS: %s" % [(r.rows, r.detail) for r in wrong])
        out = ld.outcomes()
        bad = {k: v for k, v in out.items() if k not in allowed}
        self.assertEqual(bad, {}, "unexpected outcomes %s (all: %s); e.g. %s\n%s" % (
            bad, dict(out), [r.detail for r in ld.snapshot() if r.outcome in bad][:3],
            d.log_tail()))
        return out


class TestWorkerKill(ReliabilityCase):

    def test_kill_workers_under_load(self):
        in_, out, ranks, kills = 1024, 3 * 344, 3, 4
        wpath, W, b = self.layer(out, in_, seed=61)
        # the not-ready window is at least the backoff: long enough for the probe below to see
        # it twice even when the load threads keep it from running for a while
        d = self.start_daemon(wpath, "--cpu", ranks, "--restart-backoff-ms", 400, name="kill")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        ld = self.load(d, model, W, b, clients=4, seed=1)
        probe = self.triton(d)
        self.assertTrue(ld.wait_ok(20), "no answers before the first kill\n" + d.log_tail())
        rng = np.random.default_rng(9)
        recovery, unready, in_flight_failed, not_serving = [], [], 0, 0
        hch = grpc.insecure_channel(d.addr)
        self.addCleanup(hch.close)
        self.assertEqual(health_status(hch), 1, "health is not SERVING before the kills")
        for k in range(kills):
            before = d.worker_pids()
            self.assertEqual(sorted(before), list(range(ranks)), d.log_tail())
            rank = int(rng.integers(ranks))
            ld.wait_inflight(2)
            t_kill = time.monotonic()
            os.kill(before[rank], signal.SIGKILL)

            seen_unready = None
            while time.monotonic() - t_kill < 30:
                ready = probe.is_server_ready(client_timeout=10)
                if seen_unready is not None and health_status(hch) == 2:
                    not_serving += 1
                if not ready and seen_unready is None:
                    seen_unready = time.monotonic() - t_kill
                if ready and seen_unready is not None:
                    break
                time.sleep(0.01)
            t_ready = time.monotonic() - t_kill
            self.assertIsNotNone(seen_unready, "kill %d: never seen not ready\n%s" % (
                k, d.log_tail()))
            self.assertLess(t_ready, 30, "kill %d: not ready again after 30 s\n%s" % (
                k, d.log_tail()))
            after = d.worker_pids()
            for r in range(ranks):
                self.assertNotEqual(after.get(r), before[r], "kill %d: rank %d not rebuilt" % (
                    k, r))
            self.assertEqual(wait_gone(before.values()), [], "old workers left running")
            self.assertEqual(health_status(hch), 1, "kill %d: health not SERVING once ready" % k)
            recovery.append(t_ready)
            unready.append(seen_unready)
            t_back = time.monotonic()
            self.assertTrue(ld.wait_ok(10, since=t_back), "kill %d: no answers after the "
                            "rebuild\n%s" % (k, d.log_tail()))
            fl = ld.in_flight_at(t_kill)
            in_flight_failed += sum(1 for r in fl if r.outcome == "UNAVAILABLE")
            for r in fl:
                self.assertIn(r.outcome, ("OK", "UNAVAILABLE"), "in flight at kill %d: %s %s" % (
                    k, r.outcome, r.detail))
        out = self.finish(d, ld, allowed=("OK", "UNAVAILABLE"))
        self.assertGreater(not_serving, 0, "grpc.health.v1 never said NOT_SERVING while the "
                           "server was not ready")
        self.assertGreater(in_flight_failed, 0,
                           "no request in flight at any of the kills failed UNAVAILABLE: the "
                           "kills missed the load (outcomes %s)" % dict(out))
        unavailable = [r.detail for r in ld.snapshot() if r.outcome == "UNAVAILABLE"]
        self.assertTrue(all(m for m in unavailable), "UNAVAILABLE without a message")
        print("worker kill under load (%d ranks, 4 clients, --restart-backoff-ms 400): %d kills; "
              "not ready after %s s; recovery (kill -> ready) %s s, median %.3f s; outcomes %s; "
              "%d in-flight requests failed UNAVAILABLE, 0 wrong answers" % (
                  ranks, kills, ["%.3f" % t for t in unready], ["%.3f" % t for t in recovery],
                  statistics.median(recovery), dict(out), in_flight_failed))
        d.stop()


class TestCrashLoop(ReliabilityCase):

    def test_worker_dying_at_start_backs_off(self):
        wpath, W, b = self.layer(24, 16, seed=62)
        real = os.path.join(os.path.dirname(tpdtest.TPD), "tpd-worker")
        allow = self.path("allow")
        wrapper = self.path("worker.sh")
        with open(wrapper, "w") as f:
            f.write("""#!/bin/sh
# runs the real worker once per rank, then refuses until %(allow)s exists
rank=$(echo "$@" | sed -n 's/.*--rank \\([0-9]*\\).*/\\1/p')
if mkdir "%(dir)s/started-$rank" 2>/dev/null || [ -e "%(allow)s" ]; then
    exec "%(real)s" "$@"
fi
echo "test wrapper: rank $rank refuses to start" >&2
exit 1
""" % {"dir": self.tmp, "allow": allow, "real": real})
        os.chmod(wrapper, 0o755)
        d = self.start_daemon(wpath, "--cpu", 2, "--worker", wrapper,
                              "--restart-backoff-ms", 200, name="loop")
        x = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
        self.assert_close(self.forward(d, x, name="first"), x, W, b, TOL, "first group")
        pid = d.proc.pid

        os.kill(d.worker_pids()[0], signal.SIGKILL)
        t0 = time.monotonic()
        cpu0 = cpu_seconds(pid)
        # tpd learns of the death from the control socket's EOF, a moment after the kill
        while d.client("health", "--timeout", "2000", timeout=10).rc != 3:
            self.assertLess(time.monotonic() - t0, 5, "still ready 5 s after a worker was killed")
            time.sleep(0.05)
        # 200 + 400 + 800 + 1600 ms of backoff: four failed restarts in ~3 s, then 3.2 s
        while len(BACKOFF_RE.findall(d.log())) < 5 and time.monotonic() - t0 < 20:
            self.assertTrue(d.running(), "tpd exited\n" + d.log_tail())
            h = d.client("health", "--timeout", "2000", timeout=10)
            self.assertEqual(h.rc, 3, "ready while its workers cannot start: %r" % h)
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        delays = [int(v) for v in BACKOFF_RE.findall(d.log())]
        self.assertGreaterEqual(len(delays), 5, "restarts not logged: %s\n%s" % (
            delays, d.log_tail()))
        for a, b_ in zip(delays, delays[1:]):
            self.assertEqual(b_, min(2 * a, 30000), "backoff does not double: %s" % delays)
        self.assertEqual(delays[0], 200, "first delay is not --restart-backoff-ms")
        log = d.log()
        self.assertIn("test wrapper: rank", log, "the worker's own message is not in the log")
        self.assertRegex(log, r"worker rank \d .*exited with status 1",
                         "the exit status is not logged\n" + d.log_tail())
        self.assertLess(cpu, 0.25 * wall + 0.5, "tpd used %.2f s of CPU in %.2f s while its "
                        "workers kept failing: spinning" % (cpu, wall))
        print("crash loop: restart delays %s ms; tpd CPU %.2f s in %.2f s" % (delays, cpu, wall))

        # the worker can start again: the next restart brings the group back
        open(allow, "w").close()
        d.wait_ready(timeout=40)
        self.assert_close(self.forward(d, x, name="again"), x, W, b, TOL, "after the crash loop")
        d.stop()


class TestCoordinatorDeath(ReliabilityCase):

    def test_kill_tpd_under_load(self):
        wpath, W, b = self.layer(3 * 40, 96, seed=63)
        shm_before = shm_entries()
        d = self.start_daemon(wpath, "--cpu", 3, name="coord")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        pids = list(d.worker_pids().values())
        self.assertEqual(len(pids), 3)
        ld = self.load(d, model, W, b, clients=3, seed=2)
        self.assertTrue(ld.wait_ok(10), d.log_tail())
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
        t0 = time.monotonic()
        left = wait_gone(pids, timeout=10)
        took = time.monotonic() - t0
        self.assertEqual(left, [], "workers outlived tpd: %s" % left)
        stray = processes_with(wpath.encode())
        self.assertEqual(stray, {}, "processes still running with the weights file (workers "
                         "in the log: %s):\n%s\n%s" % (
                             d.all_worker_pids(), describe_processes(stray, d.all_worker_pids()),
                             d.log_tail()))
        self.assertEqual(sorted(shm_entries() - shm_before), [], "new entries in /dev/shm")
        # clients see the connection go; no answer may be wrong, none may hang
        self.finish(d, ld, allowed=("OK", "UNAVAILABLE", "CANCELLED", "UNKNOWN"))
        print("coordinator killed: all %d workers gone %.2f s later" % (len(pids), took))


    def test_workers_exit_on_control_socket_eof(self):
        wpath, W, b = self.layer(2 * 20, 32, seed=67)
        real = os.path.join(os.path.dirname(tpdtest.TPD), "tpd-worker")
        wrapper = self.path("fork.sh")
        with open(wrapper, "w") as f:
            f.write("""#!/bin/sh
# the real worker as a child of this shell: no parent-death signal for it
"%s" "$@" &
echo "test wrapper: real worker pid $!" >&2
wait $!
""" % real)
        os.chmod(wrapper, 0o755)
        d = self.start_daemon(wpath, "--cpu", 2, "--worker", wrapper, name="eof")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        real_pids = [int(p) for p in re.findall(r"test wrapper: real worker pid (\d+)", d.log())]
        self.assertEqual(len(real_pids), 2, d.log_tail())
        self.assertTrue(all(pid_alive(p) for p in real_pids), "real workers not running")
        ld = self.load(d, model, W, b, clients=2, seed=5)
        self.assertTrue(ld.wait_ok(10), d.log_tail())
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
        t0 = time.monotonic()
        left = wait_gone(real_pids, timeout=10)
        self.assertEqual(left, [], "workers did not exit on EOF of their control socket")
        print("coordinator killed, workers without a parent-death signal: gone %.2f s later" % (
            time.monotonic() - t0))
        self.finish(d, ld, allowed=("OK", "UNAVAILABLE", "CANCELLED", "UNKNOWN"))


class TestBackpressure(ReliabilityCase):

    def test_full_queue_is_resource_exhausted(self):
        in_, out = 64, 2 * 24
        wpath, W, b = self.layer(out, in_, seed=64)
        # a worker is stopped on purpose, for as long as the test takes: not a hung job
        d = self.start_daemon(wpath, "--cpu", 2, "--slots", 1, "--max-queue", 1,
                              "--job-timeout-ms", 0, "--log-level", "debug", name="bp")
        rng = np.random.default_rng(6)
        xs = [rng.standard_normal((8, in_)).astype(np.float32) * (i + 1) for i in range(2)]
        victim = d.worker_pids()[1]
        os.kill(victim, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(victim) and os.kill(victim, signal.SIGCONT))
        procs = []
        for i, x in enumerate(xs):
            np.save(self.path("x%d.npy" % i), x)
            procs.append(d.client_bg("forward", self.path("x%d.npy" % i), "-o",
                                     self.path("y%d.npy" % i)))
            self.addCleanup(procs[-1].kill)
            deadline = time.monotonic() + 20
            while d.count(ACCEPTED_RE) < i + 1:
                self.assertLess(time.monotonic(), deadline, "request %d not accepted\n%s" % (
                    i, d.log_tail()))
                time.sleep(0.01)
        # the slot is held and the queue is full: refused at once
        for i in range(3):
            t0 = time.monotonic()
            res = d.client("forward", self.path("x0.npy"), "-o", self.path("no.npy"),
                           "--timeout", "20000", timeout=30)
            took = time.monotonic() - t0
            self.assertEqual(res.rc, 1, repr(res))
            line = one_line_error(self, res)
            self.assertIn("RESOURCE_EXHAUSTED", line)
            self.assertIn("max-queue", line, "the message does not name the limit")
            self.assertLess(took, 5.0, "refusal took %.2f s: not at once" % took)
        c = self.triton(d)
        inp = tgrpc.InferInput("input", [1, in_], "FP32")
        inp.set_data_from_numpy(xs[0][:1])
        with self.assertRaises(tgrpc.InferenceServerException) as cm:
            c.infer(os.path.basename(wpath)[:-12], [inp], client_timeout=20)
        self.assertIn("RESOURCE_EXHAUSTED", cm.exception.status())
        os.kill(victim, signal.SIGCONT)
        for i, (x, p) in enumerate(zip(xs, procs)):
            res = p.wait(timeout=60)
            self.assertEqual(res.rc, 0, "accepted request %d: %r" % (i, res))
            self.assert_close(np.load(self.path("y%d.npy" % i)), x, W, b, TOL, "request %d" % i)
        d.stop()


class TestMessageLimits(ReliabilityCase):

    def test_oversize_message(self):
        in_, out, max_batch = 64, 2 * 40, 4
        wpath, W, b = self.layer(out, in_, seed=65)
        d = self.start_daemon(wpath, "--cpu", 2, "--max-batch", max_batch, name="big")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        pids = d.worker_pids()
        ld = self.load(d, model, W, b, clients=2, batches=(1, 2, 3, 4), seed=3)
        self.assertTrue(ld.wait_ok(5), d.log_tail())
        opts = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(d.addr, options=opts) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            for mib in (2, 16):
                rows = (mib << 20) // (in_ * 4)
                req = pb.ModelInferRequest(model_name=model)
                req.inputs.add(name="input", datatype="FP32", shape=[rows, in_])
                req.raw_input_contents.append(bytes(rows * in_ * 4))
                with self.subTest(mib=mib):
                    with self.assertRaises(grpc.RpcError) as cm:
                        stub.ModelInfer(req, timeout=30)
                    self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     cm.exception.details())
            # the same connection still works for a request within the limit
            req = pb.ModelInferRequest(model_name=model)
            x = np.ones((max_batch, in_), np.float32)
            req.inputs.add(name="input", datatype="FP32", shape=[max_batch, in_])
            req.raw_input_contents.append(x.tobytes())
            resp = stub.ModelInfer(req, timeout=30)
            y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(max_batch, out)
            self.assert_close(y, x, W, b, TOL, "after the oversize messages")
        self.assertTrue(ld.wait_ok(ld.count("OK") + 5), "load stalled\n" + d.log_tail())
        self.finish(d, ld)
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        d.stop()


class TestStartFailures(ReliabilityCase):

    def test_failures_after_binding_exit_1(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        sock = self.path("start.sock")
        cases = (
            (["--worker", "/bin/false"], "exited with status 1"),
            (["--listen", "unix:" + self.path("no-such-dir/b.sock")], "no-such-dir/b.sock"),
        )
        for args, needle in cases:
            with self.subTest(args=args):
                res = tpdtest.run([tpdtest.TPD, "--weights", seed, "--listen", "unix:" + sock,
                                   "--http-listen", "off"] + args, timeout=30)
                self.assertEqual(res.rc, 1, repr(res))
                self.assertIn(needle, res.err, repr(res))
                self.assertFalse(os.path.exists(sock), "unix socket left behind")


def h2_frame(ftype, flags, stream, payload, length=None):
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class TestHostileBytes(ReliabilityCase):

    def garbage(self, rng):
        """(name, bytes to send) of each hostile connection."""
        settings = h2_frame(4, 0, 0, b"")
        return [
            ("random bytes", rng.bytes(65536)),
            ("http/1.1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("preface + random frames", PREFACE + settings + rng.bytes(4096)),
            ("bad settings length", PREFACE + h2_frame(4, 0, 0, b"\0" * 5)),
            ("garbage hpack", PREFACE + settings + h2_frame(1, 4 | 1, 1, rng.bytes(200))),
            ("headers on stream 0", PREFACE + settings + h2_frame(1, 4, 0, b"\x82")),
            ("oversize frame header", PREFACE + settings + h2_frame(0, 0, 1, b"x" * 100,
                                                                    length=(1 << 24) - 1)),
            ("window update 0", PREFACE + settings + h2_frame(8, 0, 0, b"\0\0\0\0")),
            ("rst on idle stream", PREFACE + settings + h2_frame(3, 0, 7, b"\0\0\0\x08")),
            ("half preface", PREFACE[:10]),
        ]

    def attack(self, family, addr, rng, held):
        for name, data in self.garbage(rng):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(addr)
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may hang up on us half way: that is its right
            if name == "half preface":
                held.append(s)  # left open, idle, until the end of the test
                continue
            try:
                s.recv(4096)
            except OSError:
                pass
            s.close()

    def test_garbage_on_listening_sockets(self):
        wpath, W, b = self.layer(2 * 36, 48, seed=66)
        d = self.start_daemon(wpath, "--cpu", 2, "--listen", "127.0.0.1:0", name="junk")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        port = int(PORT_RE.search(d.log()).group(1))
        pids = d.worker_pids()
        ld = self.load(d, model, W, b, clients=3, seed=4)
        self.assertTrue(ld.wait_ok(10), d.log_tail())
        rng = np.random.default_rng(12)
        held = []
        try:
            for rnd in range(3):
                self.attack(socket.AF_INET, ("127.0.0.1", port), rng, held)
                self.attack(socket.AF_UNIX, d.sock, rng, held)
            for _ in range(30):  # many idle connections at once
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(PREFACE[:5])
                held.append(s)
            mark = time.monotonic()
            self.assertTrue(ld.wait_ok(20, since=mark), "clients stalled while connections "
                            "were held open\n" + d.log_tail())
            tcp = tgrpc.InferenceServerClient(url="127.0.0.1:%d" % port)
            self.addCleanup(tcp.close)
            self.assertTrue(tcp.is_server_ready(client_timeout=10))
        finally:
            for s in held:
                s.close()
        out = self.finish(d, ld)
        self.assertTrue(d.running(), "tpd died\n" + d.log_tail())
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        print("hostile bytes: %d garbage connections, 30 idle ones; served clients: %s" % (
            2 * 3 * 10, dict(out)))
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
