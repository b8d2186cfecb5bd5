"""ModelStreamInfer, the bidirectional stream that tritonclient's stream_infer and
perf_analyzer --streaming use: each request answered on the stream, in order of completion,
with its id; a request that fails answers error_message and the stream goes on.

* tritonclient.grpc: a stream of requests of 1 to 8 rows, one of them malformed; every good
  answer is checked against the float64 reference and matched by id, the bad one is an error
  that names the shape, and the stream then ends cleanly (stop_stream).
* A client that sends 60 requests at once, more than the 16 a stream may have running (batching
  holds them 0.2 s): each is answered, by a result or by an error that says to wait, none
  lost, and tpd serves on.
* A client that goes away mid-stream (the call cancelled with requests running): tpd cancels
  them, keeps its workers and serves the next client.
"""

import os
import queue
import sys
import threading
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, reference, rel_err  # noqa: E402

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

IN, OUT = 64, 40
MODEL = "s"


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
        self.d = self.start_daemon(self.wpath, "--cpu", 2, "--max-batch", 8)
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

    def test_more_than_may_run(self):
        # one-row requests wait up to 0.2 s for a batch of 64 rows to fill, so that a stream's
        # sixteen are soon running
        self.d.stop()
        self.d = self.start_daemon(self.wpath, "--cpu", 2, "--max-batch", 64,
                                   "--batch-delay-us", 200000, name="slowbatch")
        ch = grpc.insecure_channel(self.d.addr)
        self.addCleanup(ch.close)
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=pb.ModelStreamInferResponse.FromString)
        xs = [self.rng.standard_normal((1, IN)).astype(np.float32) for _ in range(60)]
        answers = list(stream(iter([request(x, "q%d" % i) for i, x in enumerate(xs)]),
                              timeout=60))
        self.assertEqual(len(answers), 60, "every request gets one answer")
        ok, busy = 0, 0
        for a in answers:
            if a.error_message:
                self.assertIn("running already", a.error_message)
                busy += 1
                continue
            i = int(a.infer_response.id[1:])
            y = np.frombuffer(a.infer_response.raw_output_contents[0], np.float32).reshape(1, OUT)
            self.check(y, xs[i], a.infer_response.id)
            ok += 1
        self.assertGreater(ok, 0)
        self.assertGreater(busy, 0, "no request found sixteen running")
        print("60 requests sent at once on one stream: %d answered, %d told to wait" % (ok, busy))
        self.assertTrue(self.d.running())
        self.d.stop()

    def test_client_goes_away(self):
        pids = self.d.worker_pids()
        for round_ in range(5):
            ch = grpc.insecure_channel(self.d.addr)
            stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                      request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=pb.ModelStreamInferResponse.FromString)
            more = threading.Event()

            def requests():
                for i in range(12):
                    yield request(self.rng.standard_normal((8, IN)).astype(np.float32), str(i))
                more.wait(10)  # the stream stays open, requests running, until cancelled

            call = stream(requests(), timeout=60)
            next(call)  # one answer came: requests are running
            call.cancel()
            more.set()
            ch.close()
        self.assertEqual(self.d.worker_pids(), pids, "a worker died")
        x = self.rng.standard_normal((3, IN)).astype(np.float32)
        client = tgrpc.InferenceServerClient(url=self.d.addr)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        self.check(client.infer(MODEL, [inp]).as_numpy("output"), x, "after the cancels")
        client.close()
        self.d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
