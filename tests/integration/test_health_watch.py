"""grpc.health.v1.Health/Watch, as a load balancer or grpcurl watches it: a server stream that
says the status at once and then every change.

* A watch of "" (and of "inference.GRPCInferenceService") starts with SERVING; a worker killed
  with SIGKILL makes it say NOT_SERVING, then SERVING again once the group is back, and nothing
  in between repeats itself.
* A watch of an unknown service says SERVICE_UNKNOWN and stays open, as the health protocol
  says.
* Watches that clients cancel, 30 of them, leave tpd serving and watching (and, under ASan,
  nothing leaked).
* SIGTERM with watches open: each is told NOT_SERVING and ends with UNAVAILABLE at once, and
  tpd exits 0 without waiting out the 30 s drain grace for them.
"""

import os
import queue
import signal
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer  # noqa: E402

import grpc  # noqa: E402

SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


def encode_request(service):
    data = service.encode()
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def decode_status(msg):
    """HealthCheckResponse{status}: one enum field, number 1 (0 is left out)."""
    if msg == b"":
        return 0
    if len(msg) != 2 or msg[:1] != b"\x08":
        raise AssertionError("unexpected health response %r" % msg)
    return msg[1]


class Watcher:
    """One Watch on its own thread; every status it receives goes into a queue, and then the
    stream's end (its status code) as ("end", code)."""

    def __init__(self, channel, service=""):
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=lambda m: m,
                                     response_deserializer=lambda m: m)
        self.stream = watch(encode_request(service))
        self.q = queue.Queue()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            for msg in self.stream:
                self.q.put(decode_status(msg))
            self.q.put(("end", grpc.StatusCode.OK))
        except grpc.RpcError as e:
            self.q.put(("end", e.code()))

    def next(self, timeout=30):
        return self.q.get(timeout=timeout)

    def cancel(self):
        self.stream.cancel()
        self.thread.join(10)


class TestHealthWatch(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("w.safetensors")
        make_layer(self.wpath, 48, 32, seed=2)

    def channel(self, d):
        ch = grpc.insecure_channel(d.addr)
        self.addCleanup(ch.close)
        return ch

    def test_changes_are_told(self):
        d = self.start_daemon(self.wpath, "--cpu", 2, "--restart-backoff-ms", 100)
        ch = self.channel(d)
        w = Watcher(ch)
        w2 = Watcher(ch, "inference.GRPCInferenceService")
        self.assertEqual(w.next(), SERVING)
        self.assertEqual(w2.next(), SERVING)
        unknown = Watcher(ch, "no.such.Service")
        self.assertEqual(unknown.next(), SERVICE_UNKNOWN)
        before = d.worker_pids()
        os.kill(before[1], signal.SIGKILL)
        self.assertEqual(w.next(), NOT_SERVING, d.log_tail())
        self.assertEqual(w.next(), SERVING, d.log_tail())
        self.assertEqual(w2.next(), NOT_SERVING)
        self.assertEqual(w2.next(), SERVING)
        self.assertNotEqual(d.worker_pids()[1], before[1])
        # the unknown service heard nothing more, and is still open
        with self.assertRaises(queue.Empty):
            unknown.next(timeout=0.5)
        for x in (w, w2, unknown):
            x.cancel()
        # cancelled watches are gone from tpd's list: another kill reaches only a new one
        for _ in range(30):
            Watcher(ch).cancel()
        w3 = Watcher(ch)
        self.assertEqual(w3.next(), SERVING)
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        self.assertEqual(w3.next(), NOT_SERVING)
        self.assertEqual(w3.next(), SERVING)
        w3.cancel()
        d.stop()

    def test_drain_ends_watches(self):
        d = self.start_daemon(self.wpath, "--cpu", 1)
        ch = self.channel(d)
        watchers = [Watcher(ch) for _ in range(3)]
        for w in watchers:
            self.assertEqual(w.next(), SERVING)
        t0 = time.monotonic()
        d.send(signal.SIGTERM)
        for w in watchers:
            self.assertEqual(w.next(), NOT_SERVING)
            self.assertEqual(w.next(), ("end", grpc.StatusCode.UNAVAILABLE))
        self.assertEqual(d.wait_exit(), 0, d.log_tail())
        took = time.monotonic() - t0
        self.assertLess(took, 10, "the drain waited for the watches")
        print("SIGTERM with 3 watches open: told NOT_SERVING, ended UNAVAILABLE, tpd exited 0 "
              "in %.2f s" % took)


if __name__ == "__main__":
    unittest.main(verbosity=2)
