"""Workers that stop answering: a rank stopped with SIGSTOP, one stopped while it loads, and jobs
that are long but legitimate. A stopped rank neither dies nor closes its socket, so only a bound
on the time a job may take can find it (--job-timeout-ms, docs/cli.md).

(a) SIGSTOP one rank of two, then send requests: they fail with UNAVAILABLE soon after the bound,
    not at their own deadline; the log names the rank, the job and the time waited; readiness
    (ServerReady, grpc.health.v1, /v2/health/ready) turns false; the stopped worker is killed,
    the group restarts with new pids and answers correctly again. Every rank stopped: no rank
    answers anything, and the request still fails soon after the bound.
(b) one rank stopped while far more jobs are in flight than its control socket holds: ServerReady
    keeps answering promptly (no thread waits on the stopped rank), the jobs that do not fit
    wait in tpd, and the bound takes the group down. Both ranks stopped for a moment with such a
    backlog: once they go on, every request gets its own right answer. And a SIGTERM while a rank
    is stopped and requests wait on it stops tpd within the stop timeout.
(c) a long but legitimate job is not declared hung: 1024-row jobs of a 4096 x 4096 layer take
    longer than a 100 ms --job-timeout-ms, and the rule that scales the bound with the layer
    and with the measured time per row keeps them alive.
(d) the flag: bad values are refused on the command line (64) and in the file (78); 0 turns the
    check off (a rank stopped for longer than any bound then finishes its job once continued).
(e) a rank stopped while it loads, on a restart: the group is taken down once the load bound
    has passed, and the next restart brings it back.
"""

import os
import re
import signal
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import (ACCEPTED_RE, STOP_TIMEOUT, TpdTestCase, make_layer,  # noqa: E402
                     one_line_error, pid_alive, run, wait_gone)

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402

TOL = 1e-5
HUNG_RE = re.compile(r"warn(?:ing)?: worker rank (\d+) did not finish job (\d+) \((\d+) rows?, "
                     r"slot \d+\) within (\d+) ms \(waited (\d+) ms\)")
LOAD_RE = re.compile(r"warn(?:ing)?: worker rank (\d+) did not report ready within (\d+) ms "
                     r"\(waited (\d+) ms\)")
JOB_MS_RE = re.compile(r"tpd-worker rank \d+: debug: job \d+: (\d+) rows in ([\d.]+) ms")


def health_status(channel, timeout=10):
    """grpc.health.v1.Health/Check of service "": 1 SERVING, 2 NOT_SERVING."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda m: m, response_deserializer=lambda m: m)
    resp = check(b"", timeout=timeout)
    if resp[:1] != b"\x08" or len(resp) != 2:
        raise AssertionError("unexpected health response %r" % resp)
    return resp[1]


def http_status(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class HungCase(TpdTestCase):

    def layer(self, out, in_, seed):
        wpath = self.path("hung%d.safetensors" % seed)
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=seed)
        return wpath, W, b

    def stop_worker(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGCONT))

    def triton(self, d):
        c = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(c.close)
        return c

    def forward_bg(self, d, x, name, *extra):
        np.save(self.path(name + ".npy"), x)
        p = d.client_bg("forward", self.path(name + ".npy"), "-o", self.path(name + ".out.npy"),
                        *extra)
        self.addCleanup(p.kill)
        return p


class TestStoppedWorker(HungCase):

    def test_stopped_rank_fails_requests_and_restarts(self):
        in_, out, bound_ms = 32, 2 * 20, 500
        wpath, W, b = self.layer(out, in_, seed=81)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", bound_ms,
                              "--restart-backoff-ms", 1500, name="stopped")
        rng = np.random.default_rng(1)
        x = rng.standard_normal((5, in_)).astype(np.float32)
        self.assert_close(self.forward(d, x, name="before"), x, W, b, TOL, "before the stop")
        before = d.worker_pids()
        probe = self.triton(d)
        hch = grpc.insecure_channel(d.addr)
        self.addCleanup(hch.close)
        ready_url = d.metrics_url() + "/v2/health/ready"
        self.assertEqual(health_status(hch), 1)
        self.assertEqual(http_status(ready_url), 200)

        victim = before[1]
        self.stop_worker(victim)
        t0 = time.monotonic()
        procs = [self.forward_bg(d, x * (i + 1), "x%d" % i, "--timeout", "20000")
                 for i in range(3)]
        # readiness turns false once the bound has passed (the backoff keeps it false 1.5 s)
        seen = None
        while time.monotonic() - t0 < 10:
            if not probe.is_server_ready(client_timeout=5):
                seen = time.monotonic() - t0
                break
            time.sleep(0.01)
        self.assertIsNotNone(seen, "still ready 10 s after a rank was stopped\n" + d.log_tail())
        self.assertEqual(health_status(hch), 2, "grpc.health.v1 still SERVING")
        self.assertEqual(http_status(ready_url), 503, "/v2/health/ready still 200")
        for i, p in enumerate(procs):
            res = p.wait(timeout=30)
            took = time.monotonic() - t0
            self.assertEqual(res.rc, 1, "request %d: %r" % (i, res))
            line = one_line_error(self, res)
            self.assertIn("UNAVAILABLE", line)
            self.assertLess(took, 5.0, "request %d failed only after %.2f s: the bound is %d ms"
                            % (i, took, bound_ms))
        m = HUNG_RE.search(d.log())
        self.assertIsNotNone(m, "no warning naming the rank that did not answer\n" + d.log_tail())
        self.assertEqual(int(m.group(1)), 1, m.group(0))
        self.assertEqual(int(m.group(4)), bound_ms, m.group(0))
        self.assertGreaterEqual(int(m.group(5)), bound_ms, m.group(0))
        self.assertEqual(wait_gone([victim]), [], "the stopped worker was not killed")

        d.wait_ready(timeout=20)
        after = d.worker_pids()
        for r in (0, 1):
            self.assertNotEqual(after[r], before[r], "rank %d was not restarted" % r)
        self.assertEqual(health_status(hch), 1)
        self.assert_close(self.forward(d, x, name="after"), x, W, b, TOL, "after the restart")
        print("stopped rank: not ready %.2f s after the stop; log: %s" % (seen, m.group(0)))
        d.stop()

    def test_every_rank_stopped(self):
        # No rank answers anything, so nothing but the job's own bound wakes tpd's supervising
        # thread, idle until the job came: the job must arm it when it is sent. (The same as a
        # NCCL group whose ranks all wait in a collective for one that is stuck.)
        in_, out, bound_ms = 32, 2 * 20, 500
        wpath, W, b = self.layer(out, in_, seed=82)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", bound_ms,
                              "--restart-backoff-ms", 300, name="allstopped")
        x = np.random.default_rng(2).standard_normal((3, in_)).astype(np.float32)
        self.assert_close(self.forward(d, x, name="before"), x, W, b, TOL, "before the stop")
        before = d.worker_pids()
        for pid in before.values():
            self.stop_worker(pid)
        t0 = time.monotonic()
        res = self.forward_bg(d, x, "stuck", "--timeout", "20000").wait(timeout=30)
        took = time.monotonic() - t0
        self.assertEqual(res.rc, 1, "%r" % res)
        self.assertIn("UNAVAILABLE", one_line_error(self, res))
        self.assertLess(took, 5.0, "failed only after %.2f s: the bound is %d ms" % (took,
                                                                                    bound_ms))
        self.assertRegex(d.log(), r"warn(?:ing)?: worker ranks 0, 1 did not finish job \d+ ")
        self.assertEqual(wait_gone(list(before.values())), [], "the stopped workers were kept")
        d.wait_ready(timeout=20)
        self.assert_close(self.forward(d, x, name="after"), x, W, b, TOL, "after the restart")
        print("every rank stopped: the request failed after %.2f s (bound %d ms)" % (took,
                                                                                    bound_ms))
        d.stop()


class TestNothingWaitsOnAStoppedRank(HungCase):

    # one row per job, 256 slots: more jobs than a control socket holds (about 160)
    FULL = ("--slots", 256, "--max-batch", 1, "--batch-delay-us", 0, "--log-level", "debug")

    def send_all(self, d, model, xs):
        """Sends every row of xs as its own request over 4 connections, none waiting for another;
        -> (results, semaphore released once per answer); results gets (i, result, error)."""
        clients = [self.triton(d) for _ in range(4)]
        results, done = [], threading.Semaphore(0)

        def callback(i, result, error):
            results.append((i, result, error))
            done.release()

        for i, x in enumerate(xs):
            inp = tgrpc.InferInput("input", [1, x.shape[0]], "FP32")
            inp.set_data_from_numpy(x[None, :])
            clients[i % 4].async_infer(model, [inp], lambda result, error, i=i: callback(
                i, result, error), client_timeout=60)
        return results, done

    def test_full_control_socket_blocks_nothing(self):
        in_, out, nreq, bound_ms = 16, 2 * 12, 320, 2000
        wpath, W, b = self.layer(out, in_, seed=82)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", bound_ms,
                              "--restart-backoff-ms", 200, *self.FULL, name="full")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        victim = d.worker_pids()[1]
        self.stop_worker(victim)
        xs = np.random.default_rng(2).standard_normal((nreq, in_)).astype(np.float32)
        t0 = time.monotonic()
        results, done = self.send_all(d, model, xs)
        probe = self.triton(d)
        slowest, answered = 0.0, 0
        while answered < nreq and time.monotonic() - t0 < 30:
            t = time.monotonic()
            try:
                probe.is_server_ready(client_timeout=3)
            except tgrpc.InferenceServerException as e:
                self.fail("ServerReady did not answer within 3 s while a rank was stopped: %s\n%s"
                          % (e, d.log_tail()))
            slowest = max(slowest, time.monotonic() - t)
            while done.acquire(blocking=False):
                answered += 1
            time.sleep(0.02)
        self.assertEqual(answered, nreq, "%d of %d requests unanswered after 30 s\n%s" % (
            nreq - answered, nreq, d.log_tail()))
        took = time.monotonic() - t0
        codes = {}
        for _, _, error in results:
            key = "OK" if error is None else error.status()
            codes[key] = codes.get(key, 0) + 1
        self.assertEqual(set(codes), {"StatusCode.UNAVAILABLE"}, "outcomes %s" % codes)
        self.assertIn("worker rank 1 is behind: its control socket is full", d.log(),
                      "the socket never filled: the test does not test the backlog")
        m = HUNG_RE.search(d.log())
        self.assertIsNotNone(m, "no warning naming the stopped rank\n" + d.log_tail())
        self.assertEqual(m.group(1), "1", m.group(0))
        self.assertEqual(wait_gone([victim]), [], "the stopped worker was not killed")
        d.wait_ready(timeout=20)
        self.assert_close(self.forward(d, xs[:3], name="after"), xs[:3], W, b, TOL,
                          "after the restart")
        print("full control socket: %d requests answered in %.2f s (%s); slowest ServerReady "
              "%.3f s" % (nreq, took, codes, slowest))
        d.stop()

    def test_jobs_waiting_in_tpd_are_sent_in_order(self):
        # both ranks stopped for a while, well within the bound: more jobs than their sockets
        # hold pile up in tpd; once they go on, every request gets its own right answer
        in_, out, nreq = 16, 2 * 12, 320
        wpath, W, b = self.layer(out, in_, seed=87)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", 10000, *self.FULL,
                              name="backlog")
        model = os.path.basename(wpath)[:-len(".safetensors")]
        pids = d.worker_pids()
        for pid in pids.values():
            self.stop_worker(pid)
        xs = np.random.default_rng(3).standard_normal((nreq, in_)).astype(np.float32)
        results, done = self.send_all(d, model, xs)
        deadline = time.monotonic() + 20
        while d.log().count("is behind: its control socket is full") < 2:
            self.assertLess(time.monotonic(), deadline, "the sockets never filled\n" +
                            d.log_tail())
            time.sleep(0.02)
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
        for _ in range(nreq):
            self.assertTrue(done.acquire(timeout=30), "requests unanswered\n" + d.log_tail())
        for i, result, error in sorted(results, key=lambda r: r[0]):
            self.assertIsNone(error, "request %d: %s" % (i, error))
            self.assert_close(result.as_numpy("output"), xs[i:i + 1], W, b, TOL, "request %d" % i)
        self.assertIsNone(HUNG_RE.search(d.log()), "ranks that went on taken for hung")
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        d.stop()

    def test_sigterm_while_a_rank_is_stopped(self):
        in_, out = 32, 2 * 16
        wpath, W, b = self.layer(out, in_, seed=83)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", 1000, "--log-level",
                              "debug", name="term")
        pids = list(d.worker_pids().values())
        self.stop_worker(pids[1])
        x = np.ones((3, in_), np.float32)
        procs = [self.forward_bg(d, x, "t%d" % i, "--timeout", "60000") for i in range(2)]
        deadline = time.monotonic() + 10
        while d.count(ACCEPTED_RE) < 2:
            self.assertLess(time.monotonic(), deadline, "requests not accepted\n" + d.log_tail())
            time.sleep(0.01)
        took = d.stop(timeout=STOP_TIMEOUT)
        for p in procs:
            res = p.wait(timeout=30)
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("UNAVAILABLE", one_line_error(self, res))
        self.assertEqual(wait_gone(pids), [], "workers left after tpd exited")
        print("SIGTERM with a stopped rank: tpd exited 0 in %.2f s" % took)


class TestLongJob(HungCase):

    def test_long_job_is_not_hung(self):
        in_, out, rows, floor_ms = 4096, 2 * 2048, 1024, 100
        wpath, W, b = self.layer(out, in_, seed=84)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", floor_ms, "--max-batch",
                              rows, "--slots", 1, "--log-level", "debug", name="long")
        pids = d.worker_pids()
        rng = np.random.default_rng(3)
        for i in range(2):
            x = rng.standard_normal((rows, in_)).astype(np.float32)
            self.assert_close(self.forward(d, x, name="long%d" % i), x, W, b, TOL, "job %d" % i)
        times = [float(ms) for r, ms in JOB_MS_RE.findall(d.log()) if int(r) == rows]
        self.assertEqual(len(times), 4, "job times not in the log\n" + d.log_tail())
        self.assertGreater(max(times), floor_ms, "no job took longer than the %d ms floor "
                           "(slowest %.1f ms): this machine does not test the rule" % (
                               floor_ms, max(times)))
        self.assertIsNone(HUNG_RE.search(d.log()), "a legitimate job declared hung\n" +
                          d.log_tail())
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        print("long jobs: %d rows in %s ms with --job-timeout-ms %d, none declared hung" % (
            rows, ["%.0f" % t for t in times], floor_ms))
        d.stop()


class TestFlag(HungCase):

    def test_bad_values_are_refused(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        base = [tpdtest.TPD, "--weights", seed, "--listen", "unix:" + self.path("x.sock"),
                "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
        for bad in ("abc", "-1", "1.5", "", "50", "99", "3600001", "10s"):
            with self.subTest(value=bad):
                res = run(base + ["--job-timeout-ms", bad], timeout=30)
                self.assertEqual(res.rc, 64, repr(res))
                self.assertIn("--job-timeout-ms", res.err, repr(res))
                self.assertIn("'%s'" % bad, res.err, repr(res))
        conf = self.path("t.conf")
        with open(conf, "w") as f:
            f.write("job-timeout-ms = 50\n")
        res = run(base + ["--config", conf], timeout=30)
        self.assertEqual(res.rc, 78, repr(res))
        self.assertIn("%s:1: key 'job-timeout-ms'" % conf, res.err, repr(res))
        res = run([tpdtest.TPD, "--help"], timeout=30)
        self.assertIn("--job-timeout-ms", res.out)

    def test_zero_turns_the_check_off(self):
        in_, out = 16, 2 * 8
        wpath, W, b = self.layer(out, in_, seed=85)
        d = self.start_daemon(wpath, "--cpu", 2, "--job-timeout-ms", 0, "--log-level", "debug",
                              name="off")
        pids = d.worker_pids()
        x = np.ones((2, in_), np.float32)
        os.kill(pids[1], signal.SIGSTOP)
        try:
            p = self.forward_bg(d, x, "off", "--timeout", "30000")
            deadline = time.monotonic() + 10
            while d.count(ACCEPTED_RE) < 1:
                self.assertLess(time.monotonic(), deadline, "not accepted\n" + d.log_tail())
                time.sleep(0.01)
            time.sleep(1.5)
            if p.proc.poll() is not None:
                self.fail("the request ended while its rank was stopped: %r" % p.wait())
        finally:
            os.kill(pids[1], signal.SIGCONT)
        res = p.wait(timeout=30)
        self.assertEqual(res.rc, 0, repr(res))
        self.assert_close(np.load(self.path("off.out.npy")), x, W, b, TOL, "after SIGCONT")
        self.assertEqual(d.worker_pids(), pids, "workers restarted with the check off")
        d.stop()


class TestStoppedWhileLoading(HungCase):

    def test_rank_stopped_while_loading_on_a_restart(self):
        wpath, W, b = self.layer(2 * 12, 16, seed=86)
        real = os.path.join(os.path.dirname(tpdtest.TPD), "tpd-worker")
        wrapper = self.path("stop.sh")
        with open(wrapper, "w") as f:
            f.write("""#!/bin/sh
# rank 1 stops itself before it loads, on its second start only
rank=$(echo "$@" | sed -n 's/.*--rank \\([0-9]*\\).*/\\1/p')
n=$(ls "%(dir)s" | grep -c "^start-$rank-")
touch "%(dir)s/start-$rank-$n"
if [ "$rank" = 1 ] && [ "$n" = 1 ]; then
    echo "test wrapper: rank 1 stops itself before loading" >&2
    kill -STOP $$
fi
exec "%(real)s" "$@"
""" % {"dir": self.tmp, "real": real})
        os.chmod(wrapper, 0o755)
        d = self.start_daemon(wpath, "--cpu", 2, "--worker", wrapper, "--job-timeout-ms", 500,
                              "--restart-backoff-ms", 100, name="load")
        x = np.ones((2, 16), np.float32)
        self.assert_close(self.forward(d, x, name="first"), x, W, b, TOL, "first group")
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        t0 = time.monotonic()
        while not LOAD_RE.search(d.log()):
            self.assertLess(time.monotonic() - t0, 15, "no load timeout 15 s after the restart\n"
                            + d.log_tail())
            self.assertTrue(d.running(), "tpd exited\n" + d.log_tail())
            time.sleep(0.05)
        m = LOAD_RE.search(d.log())
        self.assertEqual(m.group(1), "1", m.group(0))
        self.assertIn("test wrapper: rank 1 stops itself", d.log())
        d.wait_ready(timeout=20)
        self.assert_close(self.forward(d, x, name="again"), x, W, b, TOL, "after the restarts")
        print("stopped while loading: %s" % m.group(0))
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
