#!/usr/bin/env python3
"""test_gpu_cli -- `tpd --gpus` start errors and flag checks. Runs everywhere, never skips:

  * on a machine without a usable GPU (or a build without the CUDA backend), `tpd --gpus 0`
    must exit 1 before serving, with one clear error line that says there is no usable GPU
    and why (the driver's own message), and leave no worker behind; in both gather modes and
    with two ranks;
  * on a machine with GPUs, a device index that does not exist must fail the same way;
  * flags that cannot go together exit 64 with a message naming them.
"""
import os
import re
import time
import unittest

import gputest
from gputest import Daemon, run

gputest.require_programs()
NGPUS, PROBE_TEXT = gputest.probe()


class TestGpuStartErrors(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.layer = gputest.write_layer(os.path.join(cls.dir, "l"), 24, 12)

    def start_fails(self, *args, expect, rc_expected=1):
        d = Daemon(self.dir, "start%d" % int(time.monotonic() * 1e6), "--weights", self.layer,
                   *args)
        try:
            rc = d.proc.wait(timeout=120)
        finally:
            d.kill()
        log = d.log()
        self.assertEqual(rc, rc_expected, "tpd %s: exit %s, expected %d:\n%s" % (
            args, rc, rc_expected, log))
        last = [l for l in log.splitlines() if l.strip()][-1]
        if rc_expected == 1:
            self.assertRegex(last, r"tpd: error: starting workers: rank \d+: ", log)
        self.assertRegex(last, expect, log)
        self.assertNotIn("ready: serving", log)
        for rank, pid in gputest.worker_pids(log).items():
            self.assertFalse(gputest.alive(pid), "worker rank %d (pid %d) left running" % (
                rank, pid))
        return last

    @unittest.skipIf(NGPUS > 0, "GPUs are visible here: " + PROBE_TEXT)
    def test_no_gpu(self):
        for args in (["--gpus", "0"], ["--gpus", "0", "--gather", "host"],
                     ["--gpus", "0,1"], ["--gpus", "0,0", "--gather", "host"]):
            with self.subTest(args=args):
                t0 = time.monotonic()
                rc, expect = 1, r"no usable GPU: \S.*"
                if not gputest.GPU_PROBE:
                    # a build without the CUDA backend: the worker says so, and without NCCL
                    # tpd refuses the NCCL gather up front (exit 64)
                    rc, expect = (1, r"no cuda backend") if "host" in args else (
                        None, r"no cuda backend|--gather nccl .*needs NCCL")
                if rc is None:
                    res = run([gputest.TPD, "--weights", self.layer, "--listen",
                               "unix:" + os.path.join(self.dir, "n.sock"), "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"] + args)
                    rc = 64 if res.rc == 64 else 1
                last = self.start_fails(*args, expect=expect, rc_expected=rc)
                print("%s -> %s (%.2f s)" % (" ".join(args), last, time.monotonic() - t0))

    @unittest.skipIf(NGPUS == 0, "no GPU visible: " + PROBE_TEXT)
    def test_missing_device(self):
        for args in (["--gpus", str(NGPUS)], ["--gpus", "0,%d" % (NGPUS + 3), "--gather", "host"]):
            with self.subTest(args=args):
                self.start_fails(*args, expect=r"no GPU %d: %d visible" % (
                    int(args[1].split(",")[-1]), NGPUS))


class TestGpuFlags(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.layer = gputest.write_layer(os.path.join(cls.dir, "l"), 24, 12)

    def test_usage_errors(self):
        cases = [
            (["--gpus", "0", "--cpu", "2"], r"--gpus and --cpu are exclusive"),
            (["--gpus", "0,0"], r"device 0 twice.*--gather host"),
            (["--gpus", "1,2,1", "--gather", "nccl"], r"device 1 twice"),
            (["--gpus", "x"], r"--gpus takes device indices.*'x'"),
            (["--gpus", "0,,1"], r"--gpus takes device indices"),
            (["--gpus", "-1"], r"--gpus takes device indices"),
            (["--gpus", "0", "--gather", "ring"], r"--gather takes nccl or host, got 'ring'"),
            (["--gpus", "0", "--dtype", "fp8"], r"--dtype takes fp32, fp16 or bf16, got 'fp8'"),
            (["--gpus", "0", "--dtype", "bf16", "--tf32"], r"--tf32 applies to --dtype fp32"),
            (["--dtype", "fp16"], r"--dtype needs --gpus"),
            (["--gpus", "0", "--io-dtype", "fp8"], r"--io-dtype takes fp32, fp16 or bf16, got 'fp8'"),
            (["--tf32"], r"--tf32 needs --gpus"),
            (["--gather", "nccl"], r"--gather nccl needs --gpus"),
            # 12 rows split over 5 ranks unevenly are served; 13 ranks would leave one without a row
            (["--gpus", ",".join(map(str, range(13))), "--gather", "host"],
             r"12 outputs cannot be split: 12 is fewer than 13 ranks"),
        ]
        for args, pattern in cases:
            with self.subTest(args=args):
                res = run([gputest.TPD, "--weights", self.layer, "--listen",
                           "unix:" + os.path.join(self.dir, "u.sock"), "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"] + args,
                          timeout=60)
                self.assertEqual(res.rc, 64, repr(res))
                self.assertRegex(res.err, pattern, repr(res))

    def test_help(self):
        res = run([gputest.TPD, "--help"])
        self.assertEqual(res.rc, 0, repr(res))
        for flag in ("--gpus LIST", "--gather nccl|host", "--dtype fp32|fp16|bf16", "--tf32",
                     "--io-dtype fp32|fp16|bf16"):
            self.assertIn(flag, res.out)

    def test_gather_host_with_cpu_is_fine(self):
        # the cpu backend always gathers through the host: saying so is not an error
        d = Daemon(self.dir, "cpuhost", "--weights", self.layer, "--cpu", "2", "--gather", "host")
        try:
            d.wait_ready(timeout=60)
            x = gputest.write_x(os.path.join(self.dir, "x.npy"), 5, 24)
            gputest.verify(d, x, self.layer, 1e-5)
            self.assertEqual(d.stop(), 0)
        finally:
            d.kill()


if __name__ == "__main__":
    unittest.main(verbosity=2)
