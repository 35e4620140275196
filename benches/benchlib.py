"""Helpers shared by the benchmarks: logging, waiting on daemons, asking their status, stopping
them (repl.py, wan.py), and the benchmark history that every run appends to (repl.py, wan.py
and nbd.sh, which calls `benchlib.py record`).

History: benches/history/BENCH.jsonl, one JSON object per line and per completed run:
  {"bench", "date" (ISO 8601, UTC), "commit" (short hash, "-dirty" when tracked files differ),
   "machine": {"cpus", "mem_gib", "kernel", "disk"}, "figures" (the run's report without the
   keys in NOT_FIGURES), "notes" (optional)}
Lines are appended, never rewritten (benches/history/README.md).
"""

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/blkmirror")
# BENCH_HISTORY overrides where the history files go (a scratch directory for trial runs).
HISTORY_DIR = os.environ.get("BENCH_HISTORY") or os.path.join(ROOT, "benches/history")
# Report keys that are not measurements: where the logs went, how the backing file was made.
NOT_FIGURES = ("logs", "backing")


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


def git_commit(root=ROOT):
    """HEAD's short hash, plus "-dirty" when tracked files differ from it; None outside a git
    checkout. benches/history/ is left out of the comparison: every run appends to it, and the
    next run of the same code must not call itself dirty for that."""
    # safe.directory: bench-wan runs as root in a checkout that root may not own.
    git = ["git", "-c", f"safe.directory={os.path.abspath(root)}", "-C", root]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benches/history"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changes else "")


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def disk_of(path):
    """What is known of the disk holding `path`: device, file system, size, and the request
    limits that decide how many disk requests a direct write becomes."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    sysdev = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    name = os.path.basename(os.path.realpath(sysdev)) if os.path.exists(sysdev) else f"{os.major(dev)}:{os.minor(dev)}"
    # A partition's queue limits are its parent disk's.
    queue = os.path.join(sysdev, "queue")
    if not os.path.isdir(queue):
        queue = os.path.join(sysdev, "..", "queue")
    fs = None
    best = ""
    real = os.path.realpath(path)
    for line in (_read("/proc/self/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and (real == fields[1] or real.startswith(fields[1].rstrip("/") + "/")) \
                and len(fields[1]) > len(best):
            best, fs = fields[1], fields[2]
    parts = [name + (f", {fs}" if fs else "")]
    sectors = _read(os.path.join(sysdev, "size"))
    if sectors and sectors.isdigit():
        parts.append(f"{int(sectors) * 512 / (1 << 30):.0f} GiB")
    for key in ("max_segments", "max_sectors_kb"):
        v = _read(os.path.join(queue, key))
        if v:
            parts.append(f"{key} {v}")
    return ", ".join(parts)


def machine(path=ROOT):
    """The machine a run measured: CPUs, memory, kernel, and the disk under `path`."""
    mem_kib = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {"cpus": os.cpu_count(), "mem_gib": round(mem_kib / (1 << 20), 1) if mem_kib else None,
            "kernel": platform.release(), "disk": disk_of(path)}


def figures(report):
    """A report's measurements: everything but NOT_FIGURES, under the report's own keys."""
    return {k: v for k, v in report.items() if k not in NOT_FIGURES}


def history_line(bench, report, commit, machine_info, notes=None, date=None):
    """One run as the history keeps it."""
    line = {"bench": bench,
            "date": date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "machine": machine_info, "figures": figures(report)}
    if notes:
        line["notes"] = notes
    return line


def append_history(bench, report, commit, machine_info, notes=None, history_dir=None, date=None):
    """Append one line for this run to HISTORY_DIR/BENCH.jsonl (made if missing), say so, and
    return the file's path. One write in append mode: earlier lines are never touched."""
    history_dir = history_dir or HISTORY_DIR
    os.makedirs(history_dir, exist_ok=True)
    path = os.path.join(history_dir, f"{bench}.jsonl")
    text = json.dumps(history_line(bench, report, commit, machine_info, notes, date), ensure_ascii=False) + "\n"
    with open(path, "a") as f:
        f.write(text)
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    log(f"history: appended this run to {shown}")
    return path


def main(argv):
    """`benchlib.py commit`: the commit as history lines record it (for nbd.sh, at its start).
    `benchlib.py record BENCH REPORT.json COMMIT DISK_PATH [NOTES]`: append the history line of
    a run whose report is written (for nbd.sh, at its end)."""
    if argv[:1] == ["commit"] and len(argv) == 1:
        print(git_commit() or "")
        return 0
    if argv[:1] == ["record"] and len(argv) in (5, 6):
        bench, report, commit, disk_path = argv[1:5]
        with open(report) as f:
            doc = json.load(f)
        append_history(bench, doc, commit or None, machine(disk_path), argv[5] if len(argv) == 6 else None)
        return 0
    print("usage: benchlib.py commit | benchlib.py record BENCH REPORT.json COMMIT DISK_PATH [NOTES]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
