"""tpd's life: draining on SIGTERM, a worker killed under it, command-line errors, client errors.

(a) SIGTERM drain: 8 forwards of a big layer in flight (the workers stopped until the drain has
    begun); SIGTERM once tpd has accepted them; every client gets its correct answer, tpd exits
    0, workers gone, the unix socket removed, nothing new left in /dev/shm. SIGINT drains the same way.
(b) Worker death: kill -9 one worker; tpd turns not-ready, a forward fails with UNAVAILABLE,
    the worker group is restarted after --restart-backoff-ms and serves correct answers again.
(c) tpd command-line errors: exit 64 for a bad command line or layout, 1 for a start that
    fails, each naming what is wrong; --help and --version.
(d) tpclient errors: nothing listening, missing input file, unknown command.
"""

import os
import re
import signal
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import (ACCEPTED_RE, TpdTestCase, make_layer, one_line_error,  # noqa: E402
                     reference, rel_err, run, shm_entries, tpclient, wait_gone)

import tritonclient.grpc as tgrpc  # noqa: E402

TOL = 1e-5


class TestDrain(TpdTestCase):

    def test_sigterm_drains_in_flight_requests(self):
        # 2 MiB in and out per request: under gRPC's default 4 MiB message limit
        in_, out, rows, clients = 2048, 2048, 256, 8
        wpath = self.path("big.safetensors")
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=1)
        shm_before = shm_entries()
        # the workers are stopped on purpose until the drain has begun: not a hung job
        d = self.start_daemon(wpath, "--cpu", 2, "--slots", 2, "--job-timeout-ms", 0,
                              "--log-level", "debug", name="drain")
        pids = list(d.worker_pids().values())
        self.assertEqual(len(pids), 2, d.log_tail())
        rng = np.random.default_rng(5)
        jobs = []
        for i in range(clients):
            x = rng.standard_normal((rows, in_)).astype(np.float32)
            np.save(self.path("x%d.npy" % i), x)
            jobs.append(x)
        # SIGTERM once tpd has accepted all of them, the workers stopped so that every one is
        # still in flight however fast the machine; they go on once the drain has begun
        with d.workers_stopped():
            procs = [d.client_bg("forward", self.path("x%d.npy" % i), "-o",
                                 self.path("y%d.npy" % i)) for i in range(clients)]
            for p in procs:
                self.addCleanup(p.kill)
            tpdtest.wait_for(lambda: d.count(ACCEPTED_RE) == clients, 60,
                             "%d accepted requests" % clients, d)
            t0 = time.monotonic()
            d.send(signal.SIGTERM)
            tpdtest.wait_for(lambda: d.count(r"draining %d requests" % clients) == 1, 20,
                             "the drain of all %d" % clients, d)
            self.assertTrue(d.running(), "tpd exited with requests in flight")
        self.assertEqual(d.wait_exit(60), 0, d.log_tail())
        took = time.monotonic() - t0
        print("drain: SIGTERM with %d requests in flight; tpd exited 0 in %.2f s" % (
            clients, took))
        for i, (x, p) in enumerate(zip(jobs, procs)):
            res = p.wait(timeout=60)
            self.assertEqual(res.rc, 0, "client %d failed across the drain: %r\n%s" % (
                i, res, d.log_tail()))
            ref, mag = reference(x, W, b)
            err = rel_err(np.load(self.path("y%d.npy" % i)), ref, mag)
            self.assertLessEqual(err, TOL, "client %d: relative error %.3g" % (i, err))

        self.assertEqual(wait_gone(pids), [], "workers still alive after tpd exited")
        self.assertFalse(os.path.exists(d.sock), "unix socket %s left behind" % d.sock)
        self.assertEqual(sorted(shm_entries() - shm_before), [], "new entries in /dev/shm")

    def test_sigint_drains(self):
        wpath = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        d = self.start_daemon(wpath, "--cpu", 2, name="sigint")
        pids = list(d.worker_pids().values())
        x = np.load(os.path.join(tpdtest.SEED_DIR, "seed.x.npy"))
        t = tpdtest.read_safetensors(wpath)
        self.assert_close(self.forward(d, x), x, t["weight"], t["bias"], TOL, "seed")
        d.stop(signal.SIGINT)
        self.assertEqual(wait_gone(pids), [], "workers still alive after SIGINT")
        self.assertFalse(os.path.exists(d.sock), "unix socket left behind")


class TestWorkerDeath(TpdTestCase):

    def test_worker_killed_then_restarted(self):
        in_, out = 64, 48
        wpath = self.path("wd.safetensors")
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=8)
        # the backoff is the window in which the checks below see the group down: wide enough
        # for a few sanitized tpclient starts on a busy machine
        d = self.start_daemon(wpath, "--cpu", 2, "--restart-backoff-ms", 6000, name="death")
        before = d.worker_pids()
        self.assertEqual(sorted(before), [0, 1], d.log_tail())
        rng = np.random.default_rng(3)
        x = rng.standard_normal((7, in_)).astype(np.float32)
        self.assert_close(self.forward(d, x, name="before"), x, W, b, TOL, "before the kill")

        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        self.assertTrue(client.is_server_ready())

        victim = before[1]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # not ready within 5 s
        while True:
            h = d.client("health", "--timeout", "2000", timeout=10)
            if h.rc == 3:
                break
            self.assertIn(h.rc, (0,), "health during the outage: %r" % h)
            self.assertLess(time.monotonic() - t_kill, 5.0,
                            "still ready 5 s after a worker was killed\n" + d.log_tail())
            time.sleep(0.05)
        t_unready = time.monotonic() - t_kill
        self.assertFalse(client.is_server_ready(), "tritonclient: server still ready")
        self.assertTrue(client.is_server_live(), "tritonclient: server not live while restarting")
        self.assertIn("ready: false", h.out, repr(h))

        # a forward now fails, UNAVAILABLE
        np.save(self.path("xdown.npy"), x)
        res = d.client("forward", self.path("xdown.npy"), "-o", self.path("ydown.npy"),
                       "--timeout", "5000", timeout=20)
        self.assertEqual(res.rc, 1, "forward while a worker is down: %r" % res)
        line = one_line_error(self, res)
        self.assertIn("unavailable", line.lower(), repr(res))
        self.assertRegex(d.log(), r"warning: worker rank 1 .*(exited|killed)",
                         "no warning about the dead worker\n" + d.log_tail())

        # back within ~20 s, a new group, correct answers
        d.wait_ready(timeout=20)
        t_ready = time.monotonic() - t_kill
        after = d.worker_pids()
        self.assertEqual(sorted(after), [0, 1])
        for rank in (0, 1):
            self.assertNotEqual(after[rank], before[rank],
                                "rank %d was not restarted (the group is rebuilt)" % rank)
        self.assertEqual(wait_gone(before.values()), [], "old workers left running")
        self.assertTrue(client.is_server_ready())
        for i in range(3):
            xi = rng.standard_normal((1 + 20 * i, in_)).astype(np.float32)
            self.assert_close(self.forward(d, xi, name="after%d" % i), xi, W, b, TOL,
                              "after the restart, batch %d" % xi.shape[0])
        print("worker death: not ready after %.2f s, ready again after %.2f s" % (
            t_unready, t_ready))
        self.assertGreaterEqual(t_ready, 5.0, "restarted sooner than --restart-backoff-ms 6000")
        d.stop()


class TestCommandLine(TpdTestCase):

    def tpd(self, *args, listen=True):
        argv = [tpdtest.TPD] + [str(a) for a in args]
        if listen:
            argv += ["--listen", "unix:" + self.path("cli.sock"), "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
        return run(argv, timeout=30)

    def test_fewer_outputs_than_ranks(self):
        # 12 outputs split over 5 ranks unevenly (tests/integration/test_checkpoints.py serves
        # that exactly); over 13 ranks one rank would own no row: a usage error
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        res = self.tpd("--weights", seed, "--cpu", 13)
        self.assertEqual(res.rc, 64, repr(res))
        self.assertRegex(res.err, r"(?<!\d)12(?!\d)", "message lacks out = 12: %r" % res)
        self.assertRegex(res.err, r"(?<!\d)13 ranks", "message lacks 13 ranks: %r" % res)

    def test_missing_weights(self):
        res = self.tpd("--cpu", 2)
        self.assertEqual(res.rc, 64, repr(res))
        self.assertIn("weights", res.err.lower(), repr(res))

    def test_bad_flags(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        for args in (["--no-such-flag"], ["--cpu", "0"], ["--cpu", "two"],
                     ["--log-level", "loud"], ["--max-batch", "-3"]):
            with self.subTest(args=args):
                res = self.tpd("--weights", seed, *args)
                self.assertEqual(res.rc, 64, repr(res))
                self.assertTrue(res.err.strip(), "no message: %r" % res)

    def test_nonexistent_weights(self):
        missing = self.path("no-such-dir/missing.safetensors")
        res = self.tpd("--weights", missing)
        self.assertEqual(res.rc, 1, repr(res))
        self.assertIn(missing, res.err, "message does not name the file: %r" % res)

    def test_not_safetensors(self):
        junk = self.path("junk.safetensors")
        with open(junk, "wb") as f:
            f.write(b"\xff" * 100)
        res = self.tpd("--weights", junk)
        self.assertEqual(res.rc, 1, repr(res))
        self.assertIn("junk.safetensors", res.err, repr(res))

    def test_unknown_tensor_names(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        for flag in ("--bias", "--weight"):
            with self.subTest(flag=flag):
                res = self.tpd("--weights", seed, flag, "nosuch")
                self.assertNotEqual(res.rc, 0, repr(res))
                self.assertIn("nosuch", res.err, repr(res))

    def test_help_and_version(self):
        res = self.tpd("--help", listen=False)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("--weights", res.out + res.err, repr(res))
        res = self.tpd("--version", listen=False)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertRegex(res.out + res.err, r"\d+\.\d+", repr(res))


class TestClientErrors(TpdTestCase):

    def test_nothing_listening(self):
        sock = "unix:" + self.path("nobody.sock")
        for args in (["health"], ["forward", os.path.join(tpdtest.SEED_DIR, "seed.x.npy")]):
            with self.subTest(args=args):
                t0 = time.monotonic()
                res = tpclient("--server", sock, "--timeout", "3000", *args, timeout=30)
                self.assertEqual(res.rc, 1, repr(res))
                one_line_error(self, res)
                self.assertLess(time.monotonic() - t0, 15, "took too long to give up")

    def test_input_errors(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        d = self.start_daemon(seed, name="cerr")
        with self.subTest("missing input file"):
            missing = self.path("missing.npy")
            res = d.client("forward", missing, "-o", self.path("y.npy"))
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("missing.npy", one_line_error(self, res))
        with self.subTest("input with the wrong width"):
            np.save(self.path("wide.npy"), np.zeros((2, 9), np.float32))
            res = d.client("forward", self.path("wide.npy"), "-o", self.path("y.npy"))
            self.assertEqual(res.rc, 1, repr(res))
            one_line_error(self, res)
        with self.subTest("unknown model"):
            res = d.client("forward", os.path.join(tpdtest.SEED_DIR, "seed.x.npy"),
                           "--model", "nosuch")
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("nosuch", one_line_error(self, res))
        with self.subTest("unknown command"):
            res = d.client("frobnicate")
            self.assertIn(res.rc, (1, 64), repr(res))
            text = (res.out + res.err).lower()
            # a usage text, or at least a message naming the bad command and the valid ones
            self.assertTrue("usage" in text or all(
                w in text for w in ("frobnicate", "forward", "health", "metadata")),
                "no usage: %r" % res)
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
