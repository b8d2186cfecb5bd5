"""The KServe v2 REST API (--http-listen), as its clients use it.

* NVIDIA's tritonclient.http, sync and asyncio: binary tensors (its default) and JSON, 2-D and
  3-D inputs, on the seed case that PyTorch computed (checked against its float64 answer) and on
  a layer whose 3 ranks split 1000 outputs unevenly; ids echoed; shared memory for the input and
  the output; statistics equal to what gRPC's ModelStatistics says.
* curl for every endpoint: server and model metadata (the same parameters as gRPC's), health,
  model readiness, config, stats, repository index, system and CUDA shared memory; unknown
  paths 404, wrong methods 405, errors as {"error": ...} JSON with Triton's status codes.
* FP16 on the wire: binary in and out; JSON data refused, both ways, with a message that says
  to use binary data.
* Compression as tritonclient.http does it (gzip and deflate, request and answer, binary and
  JSON); an answer compressed only when Accept-Encoding asks; a gzip bomb refused with 413
  before it costs memory.
* Hostile clients: broken JSON, wrong shapes and counts, lying binary_data_size and
  Inference-Header-Content-Length, bad UTF-8 and \\u0000, nesting, unknown, false or broken
  encodings, unsupported parameters -- each gets 400 with its reason; a 1 GiB Content-Length is refused with 413 before
  its body is read (tpd's memory does not grow); truncated bodies and connections that stall in
  their headers cost nothing, and bodies count against --max-queue-mb as their bytes arrive,
  not as announced: after all of it, the same workers answer correctly at once.
* A client that closes its connection while its request waits: the request leaves the queue,
  counted as cancelled, as a cancelled gRPC call does; the others are answered.
* Triton's timeout parameter (microseconds): 0 or a generous one is no bound; a request that
  waits behind long jobs for longer than its timeout fails with 504, and the others are answered.
* The drain: 8 inferences accepted (the workers stopped) before SIGTERM are all answered, right;
  tpd then exits 0.
"""

import asyncio
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import (TpdTestCase, make_layer, reference, rel64, rel_err,  # noqa: E402
                     seed_case)

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
import tritonclient.http.aio as thttp_aio  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS = 48, 1000, 3  # 1000 = 334 + 333 + 333


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


class RestCase(TpdTestCase):

    def http(self, d):
        addr = d.http_addr()
        c = thttp.InferenceServerClient(addr)
        self.addCleanup(c.close)
        return c

    def raw(self, d, method, path, body=None, headers=None, timeout=20):
        """(status, headers, body bytes) of one request on a connection of its own."""
        host, port = d.http_addr().rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def curl(self, d, path, method="GET", data=None):
        """(status, parsed JSON body or None) through curl."""
        argv = ["curl", "-s", "-S", "-o", "-", "-w", "\n%{http_code}", "-X", method,
                "http://" + d.http_addr() + path]
        if data is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", data]
        res = subprocess.run(argv, capture_output=True, timeout=30)
        self.assertEqual(res.returncode, 0, res.stderr)
        body, _, code = res.stdout.rpartition(b"\n")
        return int(code), (json.loads(body) if body.strip() else None)

    def check_error(self, status, headers, body, want_status, needle):
        self.assertEqual(status, want_status, body)
        self.assertEqual(headers.get("Content-Type"), "application/json", headers)
        msg = json.loads(body)["error"]
        self.assertIn(needle, msg)
        return msg


class TestTritonHttp(RestCase):

    def test_seed_case_binary_and_json(self):
        wpath, x, W, b, y64 = seed_case("mlp-up")
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "m")
        c = self.http(d)
        self.assertTrue(c.is_server_live())
        self.assertTrue(c.is_server_ready())
        self.assertTrue(c.is_model_ready("m"))
        for binary in (True, False):
            with self.subTest(binary=binary):
                inp = thttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = thttp.InferRequestedOutput("output", binary_data=binary)
                r = c.infer("m", [inp], outputs=[out], request_id="seed-%d" % binary)
                self.assertEqual(r.get_response()["id"], "seed-%d" % binary)
                self.assertLessEqual(rel64(r.as_numpy("output"), y64), TOL)
                # binary data carries no "data"; JSON carries no binary_data_size
                o = r.get_response()["outputs"][0]
                self.assertEqual("parameters" in o, binary, o)
                self.assertEqual("data" in o, not binary, o.keys())
        # no outputs named: tritonclient asks for binary_data_output
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        self.assertLessEqual(rel64(c.infer("m", [inp]).as_numpy("output"), y64), TOL)
        y = np.load(wpath.replace(".safetensors", ".y.npy"))
        self.assertLessEqual(rel64(c.infer("m", [inp]).as_numpy("output"), y.astype(np.float64)),
                             1e-5)

    def test_uneven_split_3d_and_async(self):
        wpath = self.path("lin.safetensors")
        W, b = make_layer(wpath, OUT, IN, seed=3)
        d = self.start_daemon(wpath, "--cpu", RANKS, "--model", "lin", "--max-batch", 32)
        c = self.http(d)
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, 5, IN)).astype(np.float32)
        for binary in (True, False):
            inp = thttp.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            y = c.infer("lin", [inp], outputs=[thttp.InferRequestedOutput(
                "output", binary_data=binary)]).as_numpy("output")
            self.assertEqual(y.shape, (2, 5, OUT))
            ref, mag = reference(x.reshape(10, IN), W, b)
            self.assertLessEqual(rel_err(y.reshape(10, OUT), ref, mag), TOL)

        xs = [rng.standard_normal((rows, IN)).astype(np.float32) for rows in (1, 7, 3, 32, 2, 9)]

        async def many():
            ac = thttp_aio.InferenceServerClient(d.http_addr())
            try:
                async def one(i, xi):
                    inp = thttp_aio.InferInput("input", list(xi.shape), "FP32")
                    inp.set_data_from_numpy(xi, binary_data=i % 2 == 0)
                    r = await ac.infer("lin", [inp], request_id="a%d" % i, outputs=[
                        thttp_aio.InferRequestedOutput("output", binary_data=i % 2 == 0)])
                    return r.get_response()["id"], r.as_numpy("output")
                self.assertTrue(await ac.is_server_ready())
                return await asyncio.gather(*[one(i, xi) for i, xi in enumerate(xs)])
            finally:
                await ac.close()

        for i, (rid, y) in enumerate(asyncio.run(many())):
            self.assertEqual(rid, "a%d" % i)
            ref, mag = reference(xs[i], W, b)
            self.assertLessEqual(rel_err(y, ref, mag), TOL, "async request %d" % i)

    def test_compression(self):
        # tritonclient.http's own compression, both ways, for binary and JSON tensors
        wpath = self.path("lin.safetensors")
        W, b = make_layer(wpath, OUT, IN, seed=6)
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "lin", "--max-batch", 16)
        c = self.http(d)
        x = np.random.default_rng(9).standard_normal((4, IN)).astype(np.float32)
        ref, mag = reference(x, W, b)
        for req in (None, "gzip", "deflate"):
            for resp in (None, "gzip", "deflate"):
                for binary in (True, False):
                    with self.subTest(request=req, response=resp, binary=binary):
                        inp = thttp.InferInput("input", list(x.shape), "FP32")
                        inp.set_data_from_numpy(x, binary_data=binary)
                        out = thttp.InferRequestedOutput("output", binary_data=binary)
                        r = c.infer("lin", [inp], outputs=[out],
                                    request_compression_algorithm=req,
                                    response_compression_algorithm=resp)
                        self.assertLessEqual(rel_err(r.as_numpy("output"), ref, mag), TOL)
        # the answer is compressed only when asked, and says so
        body = json.dumps({"inputs": [{"name": "input", "shape": [4, IN], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        status, h, raw = self.raw(d, "POST", "/v2/models/lin/infer", gzip.compress(body),
                                  {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
        self.assertEqual((status, h.get("Content-Encoding")), (200, "gzip"), raw[:200])
        y = np.array(json.loads(gzip.decompress(raw))["outputs"][0]["data"], np.float32)
        self.assertLessEqual(rel_err(y.reshape(4, OUT), ref, mag), TOL)
        status, h, raw = self.raw(d, "POST", "/v2/models/lin/infer", zlib.compress(body),
                                  {"Content-Encoding": "deflate",
                                   "Accept-Encoding": "gzip;q=0, identity"})
        self.assertEqual((status, h.get("Content-Encoding")), (200, None), raw[:200])
        json.loads(raw)
        # a bomb: 100 MB of zeros in 100 KB, far past this model's body limit
        bomb = gzip.compress(b'{"inputs": [' + b" " * 100_000_000 + b"]}", 9)
        self.assertLess(len(bomb), 200_000)
        rss0 = rss_kib(d.proc.pid)
        status, h, raw = self.raw(d, "POST", "/v2/models/lin/infer", bomb,
                                  {"Content-Encoding": "gzip"})
        self.check_error(status, h, raw, 413, "decompresses to more than")
        self.assertLess(rss_kib(d.proc.pid) - rss0, 64 << 10, "tpd grew for a refused bomb")
        r = c.infer("lin", [inp])
        self.assertLessEqual(rel_err(r.as_numpy("output"), ref, mag), TOL)

    def test_shared_memory(self):
        wpath = self.path("lin.safetensors")
        W, b = make_layer(wpath, OUT, IN, seed=5)
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "lin", "--max-batch", 8)
        c = self.http(d)
        rng = np.random.default_rng(2)
        x = rng.standard_normal((4, IN)).astype(np.float32)
        tag = "tpdrest%d" % os.getpid()
        hin = shm.create_shared_memory_region("in", "/%s-in" % tag, 64 + x.nbytes)
        self.addCleanup(shm.destroy_shared_memory_region, hin)
        hout = shm.create_shared_memory_region("out", "/%s-out" % tag, 4 * OUT * 4)
        self.addCleanup(shm.destroy_shared_memory_region, hout)
        shm.set_shared_memory_region(hin, [x], offset=64)
        c.register_system_shared_memory("in", "/%s-in" % tag, 64 + x.nbytes)
        c.register_system_shared_memory("out", "/%s-out" % tag, 4 * OUT * 4)
        status = c.get_system_shared_memory_status()
        self.assertEqual(sorted(r["name"] for r in status), ["in", "out"], status)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("in", x.nbytes, offset=64)
        out = thttp.InferRequestedOutput("output", binary_data=False)
        out.set_shared_memory("out", 4 * OUT * 4)
        r = c.infer("lin", [inp], outputs=[out])
        o = r.get_output("output")  # as Triton answers: no data, and no binary data
        self.assertEqual(o["shape"], [4, OUT])
        self.assertNotIn("data", o)
        self.assertNotIn("parameters", o)
        y = shm.get_contents_as_numpy(hout, np.float32, [4, OUT])
        ref, mag = reference(x, W, b)
        self.assertLessEqual(rel_err(y, ref, mag), TOL)
        # a region too small for the output is refused
        small = thttp.InferRequestedOutput("output")
        small.set_shared_memory("out", 4 * OUT * 4, offset=4)
        with self.assertRaises(InferenceServerException) as e:
            c.infer("lin", [inp], outputs=[small])
        self.assertIn("400", str(e.exception))
        c.unregister_system_shared_memory("in")
        self.assertEqual([r["name"] for r in c.get_system_shared_memory_status()], ["out"])
        c.unregister_system_shared_memory()
        self.assertEqual(c.get_system_shared_memory_status(), [])
        # CUDA shared memory: tpd takes none; unregistering all of it is no error
        c.unregister_cuda_shared_memory()
        self.assertEqual(c.get_cuda_shared_memory_status(), [])

    def test_fp16_on_the_wire(self):
        wpath = self.path("lin.safetensors")
        W, b = make_layer(wpath, OUT, IN, seed=9)
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "h", "--io-dtype", "fp16")
        c = self.http(d)
        x = np.random.default_rng(3).standard_normal((3, IN)).astype(np.float16)
        inp = thttp.InferInput("input", list(x.shape), "FP16")
        inp.set_data_from_numpy(x)
        y = c.infer("h", [inp]).as_numpy("output")
        self.assertEqual(y.dtype, np.float16)
        ref, mag = reference(x.astype(np.float32), W, b)
        self.assertLessEqual(rel_err(y.astype(np.float32), ref, mag), 2e-3)
        # JSON data carries no FP16: both ways, refused before the job
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, IN], "datatype": "FP16",
                                       "data": [0.5] * IN}]})
        self.check_error(*self.raw(d, "POST", "/v2/models/h/infer", body), 400, "binary")
        inp = thttp.InferInput("input", list(x.shape), "FP16")
        inp.set_data_from_numpy(x)
        with self.assertRaises(InferenceServerException) as e:
            c.infer("h", [inp], outputs=[thttp.InferRequestedOutput("output", binary_data=False)])
        self.assertIn("binary_data", str(e.exception))


class TestEndpoints(RestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("lin.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, seed=11)
        self.d = self.start_daemon(self.wpath, "--cpu", RANKS, "--model", "lin", "--max-batch",
                                   16, "--batch-delay-us", 0)

    def test_curl_every_endpoint(self):
        d = self.d
        code, j = self.curl(d, "/v2")
        self.assertEqual(code, 200)
        self.assertEqual(j["name"], "tpd")
        self.assertIn("binary_tensor_data", j["extensions"])
        self.assertEqual(self.curl(d, "/v2/health/live"), (200, {"live": True}))
        self.assertEqual(self.curl(d, "/v2/health/ready"), (200, {"ready": True}))
        self.assertEqual(self.curl(d, "/v2/models/lin/ready"), (200, {"name": "lin", "ready": True}))
        self.assertEqual(self.curl(d, "/v2/models/lin/versions/1/ready")[0], 200)
        code, meta = self.curl(d, "/v2/models/lin")
        self.assertEqual(code, 200)
        self.assertEqual(meta["inputs"], [{"name": "input", "datatype": "FP32", "shape": [-1, IN]}])
        self.assertEqual(meta["outputs"][0]["shape"], [-1, OUT])
        g = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(g.close)
        self.assertEqual(meta["versions"], g.get_model_metadata("lin", as_json=True)["versions"])
        # the same parameters as gRPC's metadata (tpclient prints them), as bare values
        shown = tpdtest.metadata(d)
        for k, v in meta["parameters"].items():
            self.assertEqual(str(v).lower(), shown[k].strip().lower(), k)
        self.assertEqual(meta["parameters"]["shard_rows"], "334,333,333")
        self.assertEqual(self.curl(d, "/v2/models/lin/versions/1")[1], meta)
        self.assertEqual(self.curl(d, "/v2/models/l%69n")[1], meta)  # percent escapes decoded
        code, cfg = self.curl(d, "/v2/models/lin/config")
        self.assertEqual(code, 200)
        self.assertEqual(cfg["max_batch_size"], 16)
        self.assertEqual(cfg["input"][0]["dims"], [IN])
        self.assertEqual(cfg["input"][0]["data_type"], "TYPE_FP32")
        # an inference through curl, JSON both ways
        x = np.random.default_rng(1).standard_normal((2, IN)).astype(np.float32)
        body = json.dumps({"id": "c1", "inputs": [{"name": "input", "shape": [2, IN],
                                                   "datatype": "FP32", "data": x.ravel().tolist()}]})
        code, r = self.curl(d, "/v2/models/lin/infer", "POST", body)
        self.assertEqual(code, 200, r)
        self.assertEqual(r["id"], "c1")
        self.assertEqual(r["model_name"], "lin")
        y = np.array(r["outputs"][0]["data"], np.float32).reshape(r["outputs"][0]["shape"])
        ref, mag = reference(x, self.W, self.b)
        self.assertLessEqual(rel_err(y, ref, mag), TOL)
        # statistics: REST's and gRPC's are the same numbers
        code, st = self.curl(d, "/v2/models/lin/stats")
        self.assertEqual(code, 200)
        gst = g.get_inference_statistics("lin", as_json=True)["model_stats"][0]
        ms = st["model_stats"][0]
        self.assertEqual(ms["inference_count"], 2)
        self.assertEqual(str(ms["inference_count"]), gst["inference_count"])
        self.assertEqual(str(ms["inference_stats"]["success"]["count"]),
                         gst["inference_stats"]["success"]["count"])
        self.assertEqual(ms["batch_stats"][0]["batch_size"], 2)
        self.assertEqual(self.curl(d, "/v2/models/stats")[1]["model_stats"][0]["name"], "lin")
        code, idx = self.curl(d, "/v2/repository/index", "POST", "")
        self.assertEqual((code, idx), (200, [{"name": "lin", "version": "1", "state": "READY"}]))
        self.assertEqual(self.curl(d, "/v2/repository/index", "POST", '{"ready": true}')[0], 200)
        self.assertEqual(self.curl(d, "/v2/repository/index", "POST", '{"ready": 1}')[0], 400)
        # shared memory: an unknown object, an unknown region
        code, e = self.curl(d, "/v2/systemsharedmemory/region/r/register", "POST",
                            '{"key": "/no-such-tpd-object", "offset": 0, "byte_size": 64}')
        self.assertEqual(code, 404, e)
        self.assertEqual(self.curl(d, "/v2/systemsharedmemory/region/r/status")[0], 404)
        self.assertEqual(self.curl(d, "/v2/systemsharedmemory/status"), (200, []))
        self.assertEqual(self.curl(d, "/v2/systemsharedmemory/region/r/register", "POST",
                                   '{"key": 5}')[0], 400)
        self.assertEqual(self.curl(d, "/v2/systemsharedmemory/unregister", "POST", "")[0], 200)
        self.assertEqual(self.curl(d, "/v2/cudasharedmemory/status"), (200, []))
        self.assertEqual(self.curl(d, "/v2/cudasharedmemory/region/g/register", "POST",
                                   '{"raw_handle": {"b64": ""}, "device_id": 0, '
                                   '"byte_size": 8}')[0], 501)
        # what is not there, and the wrong method
        for path, method, want in (("/v2/models/other", "GET", 404),
                                   ("/v2/models/lin/versions/2", "GET", 404),
                                   ("/v2/models/lin/versions/2/infer", "POST", 404),
                                   ("/v2/nothing", "GET", 404), ("/metrics", "GET", 404),
                                   ("/v2/models/lin%00x", "GET", 404),  # no NUL cuts it short
                                   # quoted in the error, cut at 64 bytes inside a character:
                                   # still UTF-8, so the JSON parses
                                   ("/v2/models/x" + "%C3%A9" * 40, "GET", 404),
                                   ("/v2/models/lin/infer", "GET", 405),
                                   ("/v2/health/ready", "POST", 405),
                                   ("/v2/models/lin", "DELETE", 405)):
            with self.subTest(path=path, method=method):
                code, e = self.curl(d, path, method, "" if method == "POST" else None)
                self.assertEqual(code, want, e)
                self.assertIn("error", e)

    def test_hostile_bodies(self):
        d = self.d
        before = d.worker_pids()
        path = "/v2/models/lin/infer"

        def infer_json(**over):
            t = {"name": "input", "shape": [1, IN], "datatype": "FP32", "data": [0.25] * IN}
            t.update(over)
            return json.dumps({"inputs": [t]})

        xb = np.ones((1, IN), np.float32).tobytes()
        hdr = json.dumps({"parameters": {"binary_data_output": True},
                          "inputs": [{"name": "input", "shape": [1, IN], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(xb)}}]}).encode()
        bin_headers = {"Inference-Header-Content-Length": str(len(hdr)),
                       "Content-Type": "application/octet-stream"}
        cases = [
            ("broken JSON", b'{"inputs": [', {}, "not valid JSON"),
            ("trailing junk", infer_json().encode() + b" x", {}, "not valid JSON"),
            ("not an object", b"[1, 2]", {}, "JSON object"),
            ("no inputs", b"{}", {}, "'inputs'"),
            ("two inputs", json.dumps({"inputs": [json.loads(infer_json())["inputs"][0]] * 2})
             .encode(), {}, "expected 1 input"),
            ("wrong shape", infer_json(shape=[1, IN + 1]).encode(), {}, "last dim"),
            ("shape not integers", infer_json(shape=[1.5, IN]).encode(), {}, "not an integer"),
            ("too few numbers", infer_json(data=[1.0] * (IN - 1)).encode(), {}, "fp32_contents"),
            ("not numbers", infer_json(data=["a"] * IN).encode(), {}, "not a number"),
            ("too deep", infer_json(data=[[[[[[0.5]]]]]]).encode(), {}, "deeper"),
            ("out of FP32 range", infer_json(data=[1e39] * IN).encode(), {}, "range"),
            ("wrong datatype", infer_json(datatype="INT8").encode(), {}, "datatype"),
            ("bad UTF-8", b'{"id": "\xff", "inputs": []}', {}, "UTF-8"),
            ("NUL escape", b'{"id": "a\\u0000b", "inputs": []}', {}, "\\u0000"),
            ("classification", json.dumps({"inputs": json.loads(infer_json())["inputs"],
                                           "outputs": [{"name": "output", "parameters": {
                                               "classification": 3}}]}).encode(), {},
             "classification"),
            ("bad timeout", json.dumps({"parameters": {"timeout": "soon"},
                                        "inputs": json.loads(infer_json())["inputs"]}).encode(),
             {}, "timeout"),
            ("brotli", infer_json().encode(), {"Content-Encoding": "br"}, "Content-Encoding"),
            ("gzip header, plain body", infer_json().encode(), {"Content-Encoding": "gzip"},
             "compressed"),
            ("gzip cut short", gzip.compress(infer_json().encode())[:-9],
             {"Content-Encoding": "gzip"}, "compressed"),
            ("gzip and junk after it", gzip.compress(infer_json().encode()) + b"junk",
             {"Content-Encoding": "gzip"}, "compressed"),
            ("binary size beyond the body", hdr + xb[:-4], bin_headers, "binary_data_size"),
            ("bytes after the binary data", hdr + xb + b"\0\0\0\0", bin_headers, "after"),
            ("header length beyond the body", hdr + xb,
             dict(bin_headers, **{"Inference-Header-Content-Length": str(len(hdr) + len(xb) + 1)}),
             "Inference-Header-Content-Length"),
            ("header length not a number", hdr + xb,
             dict(bin_headers, **{"Inference-Header-Content-Length": "12abc"}),
             "Inference-Header-Content-Length"),
            ("binary without its header length", hdr + xb, {}, "JSON"),
        ]
        for what, body, headers, needle in cases:
            with self.subTest(what):
                self.check_error(*self.raw(d, "POST", path, body, headers), 400, needle)
        # a good binary request on the same terms is answered
        status, h, body = self.raw(d, "POST", path, hdr + xb, bin_headers)
        self.assertEqual(status, 200, body)
        n = int(h["Inference-Header-Content-Length"])
        y = np.frombuffer(body[n:], np.float32)
        ref, mag = reference(np.ones((1, IN), np.float32), self.W, self.b)
        self.assertLessEqual(rel_err(y.reshape(1, OUT), ref, mag), TOL)

        # 1 GiB announced: refused before a byte of it is read, and nothing allocated for it
        rss0 = rss_kib(d.proc.pid)
        host, port = d.http_addr().rsplit(":", 1)
        for _ in range(3):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1073741824\r\n\r\n" + b"x" * 1000)
            reply = s.recv(4096)
            s.close()
            self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply)
            self.assertIn(b"at most", reply)
        self.assertLess(rss_kib(d.proc.pid) - rss0, 64 << 10, "tpd grew for refused bodies")

        # truncated bodies and stalled headers hold nothing up
        stalled = []
        for i in range(20):
            s = socket.create_connection((host, int(port)), timeout=10)
            if i % 2:
                s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 5000\r\n\r\n{\"inputs\"")
            else:
                s.sendall(b"GET /v2/health/re")
            stalled.append(s)
        t0 = time.monotonic()
        c = self.http(d)
        x = np.random.default_rng(5).standard_normal((3, IN)).astype(np.float32)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        y = c.infer("lin", [inp]).as_numpy("output")
        self.assertLess(time.monotonic() - t0, 5.0)
        ref, mag = reference(x, self.W, self.b)
        self.assertLessEqual(rel_err(y, ref, mag), TOL)
        for s in stalled:
            s.close()
        self.assertEqual(d.worker_pids(), before, "a worker was restarted")
        # the failures are counted as failures
        st = c.get_inference_statistics("lin")["model_stats"][0]
        self.assertGreaterEqual(st["inference_stats"]["fail"]["count"], len(cases))
        self.assertTrue(d.running())

    def test_announced_bodies_cost_only_what_arrives(self):
        # bodies held at once are bounded by --max-queue-mb (1 MiB here), counted as they
        # arrive: clients that each announce almost all of it and send a few bytes take almost
        # none of it, and a 10 KB JSON request still fits
        d = self.start_daemon(self.wpath, "--cpu", 2, "--model", "lin", "--max-batch", 16,
                              "--max-queue-mb", 1, name="budget")
        host, port = d.http_addr().rsplit(":", 1)
        slow = []
        for _ in range(4):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1040000\r\n\r\n{\"inputs\": [")
            slow.append(s)
        time.sleep(0.2)
        c = self.http(d)
        x = np.random.default_rng(4).standard_normal((16, IN)).astype(np.float32)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        y = c.infer("lin", [inp]).as_numpy("output")
        ref, mag = reference(x, self.W, self.b)
        self.assertLessEqual(rel_err(y, ref, mag), TOL)
        for s in slow:
            s.close()

    def test_timeout_parameter(self):
        c = self.http(self.d)
        x = np.ones((2, IN), np.float32)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        # Triton's timeout is in microseconds: a generous one is no bound, and 0 is none
        for timeout in (0, 10_000_000):
            self.assertEqual(c.infer("lin", [inp], timeout=timeout).as_numpy("output").shape,
                             (2, OUT))

    def behind_long_jobs(self, name, *args):
        """A daemon of one slot with three jobs of 256 rows running or queued, and its workers
        stopped (SIGSTOP), so that they take as long as the test needs, however fast the
        machine -> (daemon, join), join() letting the workers go on, waiting for the jobs and
        checking their answers' shapes."""
        wpath = self.path("big.safetensors")
        make_layer(wpath, 2048, 2048, seed=2)
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "big", "--slots", 1,
                              "--batch-delay-us", 0, *args, name=name)
        big = np.ones((256, 2048), np.float32)
        done = []

        def long_job():
            cl = thttp.InferenceServerClient(d.http_addr())
            inp = thttp.InferInput("input", list(big.shape), "FP32")
            inp.set_data_from_numpy(big)
            done.append(cl.infer("big", [inp]).as_numpy("output").shape)
            cl.close()

        threads = [threading.Thread(target=long_job) for _ in range(3)]
        workers = list(d.worker_pids().values())
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        for t in threads:
            t.start()
        # all three taken: one dispatched to the stopped workers, two queued behind it
        tpdtest.wait_for(lambda: self.pending(d) == 2, 20, "two long jobs queued", d)

        def join():
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            for t in threads:
                t.join(60)
            self.assertEqual(done, [(256, 2048)] * 3)

        self.addCleanup(lambda: [os.kill(p, signal.SIGCONT) for p in workers if d.running()])
        return d, join

    def pending(self, d, model="big"):
        """Requests tpd holds in model's queue (nv_inference_pending_request_count)."""
        series = tpdtest.metric_series(d.scrape(), "nv_inference_pending_request_count")
        return series.get('model="%s",version="1"' % model, 0)

    def test_timeout_expires_in_the_queue(self):
        # a request that may wait 2 ms waits longer, behind the long jobs
        d, join = self.behind_long_jobs("slow")
        c = self.http(d)
        inp = thttp.InferInput("input", [1, 2048], "FP32")
        inp.set_data_from_numpy(np.ones((1, 2048), np.float32))
        with self.assertRaises(InferenceServerException) as e:
            c.infer("big", [inp], timeout=2000)
        self.assertIn("504", str(e.exception))
        join()
        self.assertEqual(c.infer("big", [inp]).as_numpy("output").shape, (1, 2048))

    def test_client_gone_is_cancelled(self):
        # requests whose clients close their connections while they wait behind the long jobs
        # leave the queue (counted as cancelled), and the others are answered
        d, join = self.behind_long_jobs("gone", "--log-level", "debug")
        host, port = d.http_addr().rsplit(":", 1)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 2048], "datatype": "FP32",
                                       "data": [0.5] * 2048}]}).encode()
        for _ in range(4):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v2/models/big/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                      b"\r\n\r\n" % len(body) + body)
            s.close()
        # each queued, then cancelled once its client was seen gone (its answer may never be
        # sent: the connection is closed)
        tpdtest.wait_for(lambda: d.count("went away: cancelled") == 4, 20, "4 requests cancelled",
                         d)
        join()
        self.assertTrue(d.running())
        d.stop()
        m = re.search(r"(\d+) cancelled", d.log())
        self.assertIsNotNone(m, d.log_tail())
        self.assertEqual(int(m.group(1)), 4, d.log_tail())

    def test_drain_answers_accepted_requests(self):
        # 8 inferences accepted while the workers are stopped, then SIGTERM: the drain answers
        # every one of them, right, and tpd exits 0
        d = self.start_daemon(self.wpath, "--cpu", RANKS, "--model", "lin", "--max-batch", 16,
                              "--batch-delay-us", 0, "--log-level", "debug", name="drain")
        host, port = d.http_addr().rsplit(":", 1)
        x = np.random.default_rng(8).standard_normal((16, IN)).astype(np.float32)
        results, errors = [], []

        def client(i):
            try:
                c = thttp.InferenceServerClient("%s:%s" % (host, port))
                inp = thttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                results.append(c.infer("lin", [inp]).as_numpy("output"))
                c.close()
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        with d.workers_stopped():
            for t in threads:
                t.start()
            tpdtest.wait_for(lambda: d.count(tpdtest.ACCEPTED_RE) == 8, 20,
                             "8 requests accepted", d)
            d.send(signal.SIGTERM)
            tpdtest.wait_for(lambda: d.count(r"draining 8 requests") == 1, 20,
                             "the drain of the 8", d)
        for t in threads:
            t.join(30)
        self.assertEqual(d.wait_exit(), 0, d.log_tail())
        self.assertEqual(errors, [])
        ref, mag = reference(x, self.W, self.b)
        self.assertEqual(len(results), 8)
        for y in results:
            self.assertLessEqual(rel_err(y, ref, mag), TOL)

if __name__ == "__main__":
    unittest.main()
