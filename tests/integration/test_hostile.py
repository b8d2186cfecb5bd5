"""tpd against hostile or careless peers. In every test a well-behaved client (loadgen.Load:
tritonclient connections, every answer checked against the float64 NumPy reference) keeps
running meanwhile, and must get only correct answers.

(a) SIGHUP (a terminal hangup, `kill -HUP`, a careless `systemctl kill -s HUP`): tpd logs it and
    keeps serving with the same workers; calls in flight are answered; HTTP and gRPC readiness
    agree; SIGTERM then drains and removes the unix socket.
(b) workers start with default signal dispositions and an empty signal mask, although tpd
    ignores SIGPIPE and blocks its stop signals and SIGHUP.
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
from tpdtest import (TpdTestCase, make_layer, one_line_error, reference, rel_err,  # noqa: E402
                     tpclient)

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS, MAX_BATCH = 32, 24, 2, 64
MODEL = "hostile"


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
            time.sleep(0.3)
            self.assertTrue(d.running(), "tpd died of SIGHUP %d\n%s" % (i, d.log_tail()))
        mark = time.monotonic()
        self.assertTrue(ld.wait_ok(10, since=mark), "no answers after SIGHUP\n" + d.log_tail())
        deadline = time.monotonic() + 5
        while d.count(r"SIGHUP") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(d.count(r"tpd: notice: SIGHUP"), 3, "one notice per SIGHUP\n" +
                         d.log_tail())
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
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
            self.assertEqual(ign, 0, "rank %d pid %d starts with signals ignored: %s" % (
                rank, pid, signal_names(ign)))
            self.assertEqual(blk, 0, "rank %d pid %d starts with signals blocked: %s" % (
                rank, pid, signal_names(blk)))
        self.finish(d, ld)
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
