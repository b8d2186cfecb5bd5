"""`cmake --install` into a temporary DESTDIR: the files land where a packager and systemd expect
them, the installed unit points at the installed tpd, and the installed tpd finds its installed
tpd-worker (it looks beside itself) and serves correct answers.

Needs TP_BUILD_DIR (the configured build tree; ctest sets it).
"""

import os
import re
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import Daemon, TpdTestCase, make_layer  # noqa: E402

BUILD_DIR = os.environ.get("TP_BUILD_DIR", "")


class TestInstall(TpdTestCase):

    def install(self, prefix):
        self.assertTrue(BUILD_DIR and os.path.isfile(os.path.join(BUILD_DIR, "CMakeCache.txt")),
                        "TP_BUILD_DIR=%r is not a configured build tree" % BUILD_DIR)
        root = self.path("root")
        env = dict(os.environ, DESTDIR=root)
        p = subprocess.run(["cmake", "--install", BUILD_DIR, "--prefix", prefix], env=env,
                           capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        return root

    def test_install_layout_and_installed_tpd_finds_its_worker(self):
        root = self.install("/usr")
        expect = ["usr/bin/tpd", "usr/bin/tpd-worker", "usr/bin/tpclient",
                  "usr/lib/systemd/system/tpd.service", "usr/lib/sysusers.d/tpd.conf",
                  "usr/share/doc/tpd/tpd.conf.example", "usr/share/doc/tpd/README.md"]
        for rel in expect:
            self.assertTrue(os.path.isfile(os.path.join(root, rel)), "not installed: " + rel)
        for rel in expect[:3]:
            self.assertTrue(os.access(os.path.join(root, rel), os.X_OK), rel + " not executable")
        with open(os.path.join(root, "usr/lib/systemd/system/tpd.service")) as f:
            unit = f.read()
        self.assertRegex(unit, r"(?m)^ExecStart=/usr/bin/tpd ")
        self.assertRegex(unit, r"(?m)^Type=notify$")

        # the installed tpd, without --worker, starts the installed tpd-worker
        wpath = self.path("inst.safetensors")
        W, b = make_layer(wpath, 14, 10, bias=True, seed=9)
        installed = os.path.join(root, "usr/bin/tpd")
        d = Daemon(self.tmp, wpath, ["--cpu", 2], name="installed")
        d.argv[0] = installed
        self.daemons.append(d)
        self.addCleanup(d.kill)
        d.start()
        for pid in d.worker_pids().values():
            exe = os.readlink("/proc/%d/exe" % pid)
            self.assertEqual(exe, os.path.join(root, "usr/bin/tpd-worker"))
        x = np.random.default_rng(8).standard_normal((3, 10)).astype(np.float32)
        self.assert_close(self.forward(d, x), x, W, b, 1e-5, "installed tpd")
        d.stop()

    def test_unit_follows_the_install_prefix(self):
        root = self.install("/opt/tpd")
        with open(os.path.join(root, "opt/tpd/lib/systemd/system/tpd.service")) as f:
            unit = f.read()
        self.assertRegex(unit, r"(?m)^ExecStart=/opt/tpd/bin/tpd --gpus 0,1$")
        self.assertIn("file:/opt/tpd/share/doc/tpd/README.md", unit)
        self.assertTrue(os.path.isfile(os.path.join(root, "opt/tpd/bin/tpd-worker")))


if __name__ == "__main__":
    unittest.main(verbosity=2)
