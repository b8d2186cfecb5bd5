"""Triton's perf_analyzer (C++ client, tritonclient 2.51.0's build: scripts/perf-analyzer.sh)
against tpd, for about a second per mode: plain gRPC, gRPC with system shared memory (which
once crashed perf_analyzer: Triton's C++ client wants one raw_output_contents entry per output),
--streaming (ModelStreamInfer, where it once hung), and -i http (the REST API with binary
tensors).

In each mode perf_analyzer must exit 0 and print its client and server sections; the server's
numbers come from tpd's ModelStatistics over the same window, so they must agree with the
client's: successful requests within twice the concurrency of its request count (requests in
flight at either edge of the window), or 1% of it (the statistics calls themselves take a moment
off the window's edges), inferences = requests x batch, executions no more than
requests (plus those whose answers fall after the window). Over the whole run tpd's own metrics
must have counted at least what perf_analyzer reported, and no failure.

TP_PERF_ANALYZER names the program (scripts/test.sh sets it); without it this test fails and says
so: a test of a client that is not there is not skipped in silence.
"""

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, free_tcp_port, make_layer  # noqa: E402

PA = os.environ.get("TP_PERF_ANALYZER", "")
IN, OUT, BATCH = 256, 384, 4
MODEL = "pa"


def number(text, label):
    m = re.search(r"%s: ([0-9.]+)" % re.escape(label), text)
    if not m:
        raise AssertionError("no '%s' in perf_analyzer's output:\n%s" % (label, text))
    return float(m.group(1))


class TestPerfAnalyzer(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.assertTrue(PA and os.access(PA, os.X_OK),
                        "TP_PERF_ANALYZER is %r: configure with -DTP_PERF_ANALYZER=$(scripts/"
                        "perf-analyzer.sh), as scripts/test.sh does" % PA)

    def run_pa(self, addr, *args, protocol="grpc", timeout=60):
        argv = [PA, "-m", MODEL, "-i", protocol, "-u", addr, "-b", str(BATCH),
                "--shape", "input:%d" % IN, "--measurement-interval", "500", "-s", "50"]
        p = subprocess.run(argv + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        return p.returncode, p.stdout

    def check_window(self, out, concurrency, what):
        client = number(out, "Request count")
        server = out[out.index("Server:"):]
        ok = number(server, "Successful request count")
        self.assertGreater(client, 0, what)
        # up to concurrency requests in flight at each of the window's two edges, and those
        # answered while perf_analyzer's statistics calls were on their way (its server counts
        # are taken by calls of their own, a millisecond or so off the window's edges: at 5000
        # requests/s, a few requests)
        slack = max(2 * concurrency, int(0.01 * client) + 1)
        self.assertLessEqual(abs(ok - client), slack, "%s: server %d, client %d" % (
            what, ok, client))
        self.assertEqual(number(server, "Inference count"), ok * BATCH, what)
        # a job is counted when it ends, its requests when they are answered: up to the
        # concurrency of jobs may end inside the window with their answers after it
        self.assertLessEqual(number(server, "Execution count"), ok + concurrency, what)
        self.assertRegex(server, r"compute infer [0-9]+ usec", what)
        return client

    def test_modes(self):
        wpath = self.path(MODEL + ".safetensors")
        make_layer(wpath, OUT, IN, seed=3)
        port = free_tcp_port()
        addr = "127.0.0.1:%d" % port
        d = self.start_daemon(wpath, "--cpu", 2, "--max-batch", 16, listen=addr)
        http = d.http_addr()
        reported = 0
        for what, conc, extra in (
                ("grpc", 1, []),
                ("grpc, concurrency 2", 2, []),
                ("grpc + system shared memory", 2,
                 ["--shared-memory", "system", "--output-shared-memory-size",
                  str(BATCH * OUT * 4)]),
                ("grpc streaming (ModelStreamInfer)", 2, ["--streaming"]),
                ("http", 1, []),
                ("http, concurrency 2", 2, [])):
            proto = "http" if what.startswith("http") else "grpc"
            rc, out = self.run_pa(http if proto == "http" else addr, "--concurrency-range",
                                  "%d:%d" % (conc, conc), *extra, protocol=proto)
            self.assertEqual(rc, 0, "%s: perf_analyzer exit %d:\n%s\n%s" % (what, rc, out,
                                                                           d.log_tail()))
            reported += self.check_window(out, conc, what)
            print("perf_analyzer %s: %s infer/sec, p50 %s usec" % (
                what, number(out, "Throughput"), number(out, "p50 latency")))
        self.assertGreaterEqual(d.metric("nv_inference_request_success"), reported)
        self.assertEqual(d.metric("nv_inference_request_failure"), 0)
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
