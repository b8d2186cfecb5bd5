"""ModelStreamInfer, the bidirectional stream that tritonclient's stream_infer and
perf_analyzer --streaming use: each request answered on the stream, in order of completion,
with its id; a request that fails answers error_message and the stream goes on.

* tritonclient.grpc: a stream of requests of 1 to 8 rows, one of them malformed; every good
  answer is checked against the float64 reference and matched by id, the bad one is an error
  that names the shape, and the stream then ends cleanly (stop_stream).
* A client that sends 60 requests at once, more than the 16 a stream may have running (the
  workers stopped meanwhile): 44 are answered at once with an error that says to wait, the 16
  with their results once the workers go on, none lost, and tpd serves on.
* A client that goes away mid-stream (the call cancelled with its 12 requests taken, the
  workers stopped, 8 of them queued): tpd cancels them, keeps its workers and serves the next
  client.
"""

import os
import queue
import re
import sys
import threading
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import (ACCEPTED_RE, TpdTestCase, make_layer, reference, rel_err,  # noqa: E402
                     wait_for)

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

IN, OUT = 64, 40
MODEL = "s"
CANCELLED_RE = r"tpd: debug: request '\d+' failed: call cancelled"


def request(x, rid):
    r = pb.ModelInferRequest(model_name=MODEL, id=rid)
    t = r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return r


class TestStream(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path(MODEL + ".safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, seed=4)
        self.d = self.start_daemon(self.wpath, "--cpu", 2, "--max-batch", 8, "--log-level",
                                   "debug")
        self.rng = np.random.default_rng(3)

    def check(self, y, x, what):
        ref, mag = reference(x, self.W, self.b)
        self.assertLessEqual(rel_err(y, ref, mag), 1e-5, what)

    def test_tritonclient_stream(self):
        results = queue.Queue()
        client = tgrpc.InferenceServerClient(url=self.d.addr)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        xs = {}
        for i, rows in enumerate([1, 3, 8, 2, 5, 1, 7]):
            x = self.rng.standard_normal((rows, IN)).astype(np.float32)
            xs["r%d" % i] = x
            inp = tgrpc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer(MODEL, [inp], request_id="r%d" % i)
            if i == 3:  # a malformed one in the middle
                bad = tgrpc.InferInput("input", [2, IN + 1], "FP32")
                bad.set_data_from_numpy(np.zeros((2, IN + 1), np.float32))
                client.async_stream_infer(MODEL, [bad], request_id="bad")
        got, errors = {}, []
        for _ in range(len(xs) + 1):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(str(error))
                continue
            rid = result.get_response().id
            got[rid] = result.as_numpy("output")
        client.stop_stream()
        client.close()
        self.assertEqual(sorted(got), sorted(xs))
        for rid, y in got.items():
            self.check(y, xs[rid], rid)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(str(IN + 1), errors[0])
        self.assertTrue(self.d.running())
        self.d.stop()

    def stream(self, ch):
        return ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=pb.ModelStreamInferResponse.FromString)

    def test_more_than_may_run(self):
        # the workers are stopped: the stream's first sixteen requests are taken and wait,
        # the other 44 are told at once to wait; then the workers go on and the sixteen are
        # answered
        ch = grpc.insecure_channel(self.d.addr)
        self.addCleanup(ch.close)
        xs = [self.rng.standard_normal((1, IN)).astype(np.float32) for _ in range(60)]
        answers = []
        with self.d.workers_stopped():
            call = self.stream(ch)(iter([request(x, "q%d" % i) for i, x in enumerate(xs)]),
                                   timeout=60)
            for a in call:
                answers.append(a)
                if len(answers) == 44:
                    break
        answers += list(call)
        self.assertEqual(len(answers), 60, "every request gets one answer")
        ok, busy = 0, 0
        for k, a in enumerate(answers):
            if a.error_message:
                self.assertIn("running already", a.error_message)
                self.assertLess(k, 44, "told to wait after the workers went on")
                busy += 1
                continue
            i = int(a.infer_response.id[1:])
            y = np.frombuffer(a.infer_response.raw_output_contents[0], np.float32).reshape(1, OUT)
            self.check(y, xs[i], a.infer_response.id)
            ok += 1
        self.assertEqual((ok, busy), (16, 44), "sixteen run, the rest are told to wait")
        self.assertTrue(self.d.running())
        self.d.stop()

    def test_client_goes_away(self):
        # each round, a stream's 12 requests are taken while the workers are stopped, and its
        # client goes away: every one of them is cancelled
        pids = self.d.worker_pids()
        for round_ in range(5):
            ch = grpc.insecure_channel(self.d.addr)
            more = threading.Event()

            def requests():
                for i in range(12):
                    yield request(self.rng.standard_normal((8, IN)).astype(np.float32), str(i))
                more.wait(10)  # the stream stays open, requests running, until cancelled

            accepted = self.d.count(ACCEPTED_RE)
            cancelled = self.d.count(CANCELLED_RE)
            with self.d.workers_stopped():
                call = self.stream(ch)(requests(), timeout=60)
                wait_for(lambda: self.d.count(ACCEPTED_RE) == accepted + 12, 30,
                         "round %d: 12 requests taken" % round_, self.d)
                call.cancel()
                more.set()
                ch.close()
                # the 8 beyond the 4 slots wait in the queue, and leave it with the cancel
                wait_for(lambda: self.d.count(CANCELLED_RE) >= cancelled + 8, 30,
                         "round %d: the queued requests cancelled" % round_, self.d)
        self.assertEqual(self.d.worker_pids(), pids, "a worker died")
        x = self.rng.standard_normal((3, IN)).astype(np.float32)
        client = tgrpc.InferenceServerClient(url=self.d.addr)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        self.check(client.infer(MODEL, [inp]).as_numpy("output"), x, "after the cancels")
        client.close()
        self.d.stop()
        # the 8 queued of each round at least; the 4 in the stopped workers' jobs are marked
        # cancelled by the same pass, just after them
        m = re.search(r"scheduler: .* (\d+) cancelled", self.d.log())
        self.assertIsNotNone(m, self.d.log_tail())
        self.assertGreaterEqual(int(m.group(1)), 40, "the queued requests of the gone clients "
                                "were not all cancelled\n" + self.d.log_tail())
        self.assertLessEqual(int(m.group(1)), 60, self.d.log_tail())

if __name__ == "__main__":
    unittest.main(verbosity=2)
