"""Helpers shared by the Python benchmarks (repl.py, wan.py): logging, waiting on daemons,
asking their status, stopping them."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/blkmirror")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(f"error: {msg}")
    sys.exit(1)


def status(control):
    """The first volume of a daemon's status document."""
    out = subprocess.run([BIN, "status", "--control", control, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["volumes"][0]


def wait_for(what, pred, timeout=120.0, procs=()):
    """Poll `pred` every 100 ms; die if a watched process exits or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                die(f"{' '.join(map(str, p.args[:6]))} exited ({p.returncode}) while waiting for {what}")
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError, IndexError, subprocess.CalledProcessError):
            pass
        time.sleep(0.1)
    die(f"timed out after {timeout} s waiting for {what}")


def stop(p):
    """SIGTERM, then SIGKILL after 10 s."""
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
