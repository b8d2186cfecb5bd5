"""benchutil.py -- what the benchmark scripts share: the machine's CPU, and stopping a tpd they
started."""

import os
import signal
import subprocess


def stop_tpd(p, error):
    """SIGTERM to the tpd process p (None: nothing to stop); its exit status (it drains, stops
    its workers and exits 0). One that does not stop within 60 s is killed, with its process
    group when it leads one, and error (an exception class) is raised."""
    if p is None:
        return 0
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                p.kill()
            p.wait()
            raise error("tpd did not stop within 60 s of SIGTERM")
    return p.returncode


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo ("unknown" where it says none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        "unknown")
    except OSError:
        return "unknown"
