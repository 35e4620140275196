#!/usr/bin/python3
"""WAN benchmark (make bench-wan): blkmirror over an emulated 1,000 km link, beside TCP.

On tools/wan-sim (namespaces bm-pri 10.99.0.1 and bm-mir 10.99.0.2), all in one run:
  0. the emulator's own ceiling: iperf3 TCP through it with no delay, loss or rate limit;
  1. the link (BENCH_RATE_MBIT, RTT 20 ms, loss 0.1 %, 50 ms queue):
     peers: iperf3 TCP single stream with Cubic; nbdcopy from a local image to a qemu-nbd at
     the far side over TCP;
  2. blkmirror (primary in bm-pri, mirror in bm-mir): bulk 2 GiB written through NBD,
     incompressible, alternating with iperf3 TCP BBR for BENCH_ROUNDS rounds (medians), then
     2:1 compressible; effective rate = bytes made durable at the mirror per second (from the
     first write until the primary's lag is 0);
  3. steady: writes at 50 % of the link for 60 s; lag (RPO) p50 / p99 / max;
  4. outage: the link cut for 30 s during the steady load; seconds from the end of the cut until
     the lag is under 1 s;
  5. outage longer than the journal: the primary restarted with a 64 MiB journal, the same cut
     under the same load: the journal folds into the dirty map and writes go on; seconds from
     the end of the cut until the dirty regions are resynced and the lag is under 1 s, the
     dirty bytes against the resync's bytes and the bytes on the wire meanwhile;
     the mirror is compared with the primary afterwards.
Prints a table, writes target/bench/wan.json and target/bench/wan.svg (throughput and lag),
and appends one line to benches/history/wan.jsonl (commit, machine, figures).

Environment: BENCH_RATE_MBIT (500), BENCH_BULK (2G), BENCH_STEADY_SECS (60), BENCH_CUT_SECS (30),
BENCH_NBDCOPY (256M), BENCH_ROUNDS (3), BENCH_DIR (target/bench/tmp), BENCH_SKIP_BUILD (0),
BENCH_HISTORY (benches/history).
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import BIN, append_history, die, git_commit, log, machine, status, stop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = int(os.environ.get("BENCH_RATE_MBIT", "500"))
RTT_MS = 20
LOSS = 0.001
QUEUE_MS = 50
BULK = os.environ.get("BENCH_BULK", "2G")
STEADY_SECS = int(os.environ.get("BENCH_STEADY_SECS", "60"))
CUT_SECS = int(os.environ.get("BENCH_CUT_SECS", "30"))
NBDCOPY = os.environ.get("BENCH_NBDCOPY", "256M")
# TCP BBR and the incompressible bulk run this many times, alternating; medians are reported.
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DIR = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "target/bench/tmp")))
OUT = os.path.join(ROOT, "target/bench")
WAN = [os.path.join(ROOT, "tools/wan-sim")]
PRI, MIR = "bm-pri", "bm-mir"
PRI_IP, MIR_IP = "10.99.0.1", "10.99.0.2"
PORT = 7788
VOL_SIZE = "4G"
# The journal of the overflow case (5): far less than the cut's writes at half the link rate.
SMALL_JOURNAL = "64M"


def status_any(control):
    """The first volume's status, whatever `status` exits with (6: not replicating)."""
    out = subprocess.run([BIN, "status", "--control", control, "--json"], capture_output=True, text=True)
    return json.loads(out.stdout)["volumes"][0]


def size_bytes(s):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    return int(s[:-1]) << units[s[-1]] if s[-1] in units else int(s)


def ns(name, *cmd):
    return ["ip", "netns", "exec", name, *cmd]


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def wan(*args):
    return run([*WAN, *args], capture_output=True, text=True)


def iperf(seconds, *extra):
    """Mbit/s received by the far side of one TCP stream from bm-pri to bm-mir."""
    server = subprocess.Popen(ns(MIR, "iperf3", "-s", "-1", "-B", MIR_IP), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = run(ns(PRI, "iperf3", "-c", MIR_IP, "-t", str(seconds), "-J", *extra), capture_output=True, text=True)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.wait(10)


class Sampler(threading.Thread):
    """Samples the primary's status every 200 ms: time, sent and wire bytes, lag, QUIC counters."""

    def __init__(self, control):
        super().__init__(daemon=True)
        self.control = control
        self.samples = []
        self.marks = []
        self.stopped = threading.Event()
        self.t0 = time.time()

    def mark(self, label):
        self.marks.append((time.time() - self.t0, label))

    def run(self):
        while not self.stopped.is_set():
            try:
                v = status(self.control)
                self.samples.append((time.time() - self.t0, v["sent_bytes"], v["wire_bytes"], v["lag_seconds"],
                                     v["lag_bytes"], v["quic"]["sent_packets"], v["quic"]["lost_packets"]))
            except (subprocess.CalledProcessError, KeyError, ValueError):
                pass
            time.sleep(0.2)

    def between(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]


def make_data(path, size, compressible):
    """Random data, or 2:1 compressible (each 4 KiB: 2 KiB random, 2 KiB zeroes)."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    chunk = 64 << 20
    if compressible:
        block = b"".join(os.urandom(2048) + bytes(2048) for _ in range(chunk // 4096))
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(block if compressible else os.urandom(chunk))


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def svg(samples, marks, path, rate):
    """Throughput (shipped Mbit/s, raw and on the wire) and lag over time."""
    if len(samples) < 3:
        return
    w, h, pad = 1000, 420, 50
    pts = []
    for a, b in zip(samples, samples[1:]):
        dt = b[0] - a[0]
        if dt > 0:
            pts.append((b[0], (b[1] - a[1]) * 8 / dt / 1e6, (b[2] - a[2]) * 8 / dt / 1e6, b[3]))
    tmax = max(p[0] for p in pts) or 1
    ymax = max(rate * 2.2, max(p[1] for p in pts), 1)
    lmax = max(2.0, max(p[3] for p in pts))
    X = lambda t: pad + (w - 2 * pad) * t / tmax
    Y = lambda v: h - pad - (h / 2 - pad) * v / ymax
    L = lambda v: h / 2 - pad / 2 - (h / 2 - pad) * v / lmax
    line = lambda f, col: "<polyline fill='none' stroke='%s' stroke-width='1.2' points='%s'/>" % (
        col, " ".join(f"{X(p[0]):.1f},{f(p):.1f}" for p in pts))
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' "
             f"font-size='11'>", "<rect width='100%' height='100%' fill='white'/>",
             f"<text x='{pad}' y='16'>lag (s, max {lmax:.1f})</text>",
             f"<text x='{pad}' y='{h / 2 + 14:.0f}'>shipped Mbit/s: raw (blue), on the wire (green); "
             f"link {rate} Mbit/s (grey)</text>",
             f"<line x1='{pad}' x2='{w - pad}' y1='{Y(rate):.1f}' y2='{Y(rate):.1f}' stroke='#aaa' "
             f"stroke-dasharray='4'/>",
             line(lambda p: L(p[3]), "#c33"), line(lambda p: Y(p[1]), "#36c"), line(lambda p: Y(p[2]), "#3a3")]
    for t, label in marks:
        parts.append(f"<line x1='{X(t):.1f}' x2='{X(t):.1f}' y1='20' y2='{h - pad}' stroke='#999' "
                     f"stroke-width='0.5'/><text x='{X(t) + 2:.1f}' y='{h - pad + 14}' "
                     f"transform='rotate(30 {X(t) + 2:.1f},{h - pad + 14})'>{label}</text>")
    parts.append(f"<text x='{w - pad}' y='{h - 8}' text-anchor='end'>seconds (total {tmax:.0f})</text></svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    for tool in ("iperf3", "nbdcopy", "qemu-nbd", "fio", "ip", "cmp"):
        if not shutil.which(tool):
            die(f"{tool} not found")
    if os.geteuid() != 0:
        die("needs root (network namespaces)")
    commit = git_commit()  # before the build: the tree may change while the benchmark runs
    if os.environ.get("BENCH_SKIP_BUILD") != "1":
        log("cargo build --release")
        run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    os.makedirs(DIR, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bm-wan-", dir="/tmp")
    res = {"link_mbit": RATE, "rtt_ms": RTT_MS, "loss": LOSS, "queue_ms": QUEUE_MS}
    procs = []
    wan("down")
    try:
        # 0. The emulator's ceiling.
        wan("up", "--rtt-ms", "0", "--loss", "0", "--rate-mbit", "100000", "--queue-ms", "50")
        res["emulator_ceiling_mbit"] = round(iperf(8), 1)
        log(f"emulator ceiling (TCP, no delay/loss/limit): {res['emulator_ceiling_mbit']} Mbit/s")
        # 1. The link, and the TCP peers on it.
        wan("set", "--rtt-ms", str(RTT_MS), "--loss", str(LOSS), "--rate-mbit", str(RATE), "--queue-ms",
            str(QUEUE_MS))
        res["tcp_iperf_mbit"] = round(iperf(15, "-C", "cubic"), 1)
        log(f"iperf3 TCP cubic: {res['tcp_iperf_mbit']} Mbit/s")
        src = os.path.join(DIR, "wan-nbdcopy.bin")
        far = os.path.join(DIR, "wan-far.img")
        make_data(src, size_bytes(NBDCOPY), False)
        run(["truncate", "-s", "0", far])
        run(["truncate", "-s", NBDCOPY, far])
        # nbdcopy gets the namespace's default controller (Debian's is Cubic; a sandbox may
        # inherit another and forbid changing it): try Cubic, and record what was used.
        for n in (PRI, MIR):
            run(ns(n, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=cubic"), check=False, capture_output=True)
        res["nbdcopy_tcp_cc"] = run(ns(PRI, "sysctl", "-n", "net.ipv4.tcp_congestion_control"),
                                    capture_output=True, text=True).stdout.strip()
        q = subprocess.Popen(ns(MIR, "qemu-nbd", "-f", "raw", "-x", "v", "--bind", MIR_IP, "--port", "10809",
                                "--persistent", far), stderr=subprocess.DEVNULL)
        procs.append(q)
        time.sleep(1)
        t = time.time()
        run(ns(PRI, "nbdcopy", src, f"nbd://{MIR_IP}:10809/v"))
        res["nbdcopy_tcp_mbit"] = round(size_bytes(NBDCOPY) * 8 / (time.time() - t) / 1e6, 1)
        stop(q)
        log(f"nbdcopy over TCP: {res['nbdcopy_tcp_mbit']} Mbit/s")

        # 2. blkmirror across the link.
        pki = os.path.join(tmp, "pki")
        run([BIN, "certs", "init", "--dir", pki], capture_output=True)
        for n in ("primary", "mirror"):
            run([BIN, "certs", "issue", "--dir", pki, n], capture_output=True)
        pimg, mimg = os.path.join(DIR, "wan-primary.img"), os.path.join(DIR, "wan-mirror.img")
        for img in (pimg, mimg):
            if os.path.exists(img):
                os.unlink(img)
        tls = lambda me, peer: ["--ca", f"{pki}/ca.crt", "--cert", f"{pki}/{me}.crt", "--key", f"{pki}/{me}.key",
                                "--peer-name", peer]
        link = ["--link-rate", f"{RATE}M", "--rtt", str(RTT_MS)]
        mirror = subprocess.Popen(ns(MIR, BIN, "mirror", "--listen", f"{MIR_IP}:{PORT}", "--volume",
                                     f"v={mimg},size={VOL_SIZE}", "--state-dir", f"{tmp}/ms", *tls("mirror", "primary"),
                                     *link), stderr=open(f"{tmp}/mirror.log", "w"))
        procs.append(mirror)
        sock = f"{tmp}/p.sock"
        def start_primary(journal):
            p = subprocess.Popen(ns(PRI, BIN, "primary", "--volume", f"v={pimg},size={VOL_SIZE}", "--nbd-unix", sock,
                                    "--state-dir", f"{tmp}/ps", "--mirror", f"{MIR_IP}:{PORT}", "--journal-size",
                                    journal, *tls("primary", "mirror"), *link),
                                 stderr=open(f"{tmp}/primary.log", "a"))
            procs.append(p)
            return p

        primary = start_primary("6G")
        daemons = (mirror, primary)
        pctl, mctl = f"{tmp}/ps/control.sock", f"{tmp}/ms/control.sock"
        wait_for("the mirror to be consistent", lambda: status(mctl)["consistent"], 300, daemons)
        sampler = Sampler(pctl)
        sampler.start()
        uri = f"nbd+unix:///v?socket={sock}"
        bulk = size_bytes(BULK)

        def bulk_write(label, compressible):
            """Mbit/s made durable at the mirror for one bulk write, and the QUIC counters' change."""
            data = os.path.join(DIR, f"wan-bulk-{'c' if compressible else 'r'}.bin")
            make_data(data, bulk, compressible)
            q0 = status(pctl)["quic"]
            sampler.mark(label)
            t = time.time()
            run(["nbdcopy", data, uri])
            wait_for("lag 0 after the bulk write", lambda: status(pctl)["lag_bytes"] == 0, 1800, daemons)
            secs = time.time() - t
            q1 = status(pctl)["quic"]
            mbit = bulk * 8 / secs / 1e6
            log(f"bulk {'2:1 compressible' if compressible else 'incompressible'}: {mbit:.1f} Mbit/s effective "
                f"({secs:.1f} s, UDP payload {q1['mtu']} bytes)")
            return mbit, q1["sent_packets"] - q0["sent_packets"], q1["lost_packets"] - q0["lost_packets"]

        # TCP BBR and our incompressible bulk side by side: alternating rounds on the same
        # link (our daemons sit idle while iperf3 runs), medians of each.
        bbr, inc, sent, lost = [], [], 0, 0
        for r in range(1, ROUNDS + 1):
            try:
                bbr.append(iperf(15, "-C", "bbr"))
                log(f"round {r}: iperf3 TCP bbr: {bbr[-1]:.1f} Mbit/s")
            except subprocess.CalledProcessError:
                log("iperf3 -C bbr failed (no tcp_bbr module?)")
            mbit, s_, l_ = bulk_write(f"incompressible {r}" if ROUNDS > 1 else "incompressible", False)
            inc.append(mbit)
            sent, lost = sent + s_, lost + l_
        res["tcp_bbr_mbit"] = round(statistics.median(bbr), 1) if bbr else None
        res["tcp_bbr_mbit_samples"] = [round(x, 1) for x in bbr]
        res["incompressible_mbit"] = round(statistics.median(inc), 1)
        res["incompressible_mbit_samples"] = [round(x, 1) for x in inc]
        res["packets_lost_ratio"] = round(lost / max(sent, 1), 5)
        res["compressible_effective_mbit"] = round(bulk_write("compressible", True)[0], 1)

        # 3. Steady load at half the link rate; 4. the same with a cut.
        rate_bytes = RATE * 1_000_000 // 8 // 2
        fio = lambda secs: subprocess.Popen(
            ["fio", "--name=steady", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k", "--iodepth=4",
             f"--rate={rate_bytes}", "--time_based", f"--runtime={secs}", "--size=1G", "--refill_buffers",
             "--output-format=terse"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sampler.mark("steady")
        t0 = sampler.samples[-1][0]
        f = fio(STEADY_SECS)
        f.wait()
        lags = [s[3] for s in sampler.between(t0 + 2, t0 + STEADY_SECS)]
        res["rpo_p50_ms"] = round(1000 * percentile(lags, 0.5), 1)
        res["rpo_p99_ms"] = round(1000 * percentile(lags, 0.99), 1)
        res["rpo_max_ms"] = round(1000 * max(lags or [0]), 1)
        log(f"steady 50 %: RPO p50 {res['rpo_p50_ms']} ms, p99 {res['rpo_p99_ms']} ms, max {res['rpo_max_ms']} ms")
        f = fio(CUT_SECS + 70)
        time.sleep(10)
        sampler.mark(f"cut {CUT_SECS}s")
        wan("cut", "--secs", str(CUT_SECS))
        cut_end = time.time() - sampler.t0 + CUT_SECS
        time.sleep(CUT_SECS + 1)
        sampler.mark("link back")
        wait_for("lag under 1 s after the cut",
                 lambda: any(s[0] > cut_end and s[3] < 1.0 for s in sampler.samples), 600, daemons)
        back = next(s[0] for s in sampler.samples if s[0] > cut_end and s[3] < 1.0)
        res["catchup_s"] = round(back - cut_end, 1)
        log(f"catch-up after a {CUT_SECS} s cut: {res['catchup_s']} s")
        f.wait()
        wait_for("lag 0", lambda: status(pctl)["lag_bytes"] == 0, 600, daemons)
        sampler.stopped.set()
        sampler.join()
        res["reconnects"] = status(pctl)["reconnects"]

        # 5. The same cut with a journal far smaller than what it writes meanwhile.
        stop(primary)
        primary = start_primary(SMALL_JOURNAL)
        daemons = (mirror, primary)
        wait_for("the restarted primary replicating", lambda: status(pctl)["state"] == "replicating", 120, daemons)
        f = fio(CUT_SECS + 70)
        time.sleep(10)
        wan("cut", "--secs", str(CUT_SECS))
        cut_end = time.time() + CUT_SECS
        dirty, waited, folds = 0, False, 0
        while time.time() < cut_end:
            v = status_any(pctl)
            dirty = max(dirty, v["dirty_bytes"])
            waited = waited or v["journal_full"]
            folds = v["journal_folds"]
            time.sleep(0.2)
        wire0 = status_any(pctl)["wire_bytes"]
        resync_total = 0

        def caught_up():
            nonlocal resync_total
            v = status_any(pctl)
            copy = v["initial_copy"] or {}
            if copy.get("kind") == "dirty":
                resync_total = max(resync_total, copy["total_bytes"])
            lag = v["lag_seconds"]
            return v["state"] == "replicating" and v["dirty_bytes"] == 0 and lag is not None and lag < 1.0

        wait_for("the dirty regions resynced and the lag under 1 s", caught_up, 900, daemons)
        res["overflow_catchup_s"] = round(time.time() - cut_end, 1)
        res["overflow_journal"] = SMALL_JOURNAL
        res["overflow_folds"] = folds
        res["overflow_writes_waited"] = waited
        res["overflow_dirty_mb"] = round(dirty / 2**20, 1)
        res["overflow_resync_mb"] = round(resync_total / 2**20, 1)
        res["overflow_wire_mb"] = round((status_any(pctl)["wire_bytes"] - wire0) / 2**20, 1)
        log(f"cut of {CUT_SECS} s with a {SMALL_JOURNAL} journal: {folds} folds, writes waited: {waited}, "
            f"{res['overflow_dirty_mb']} MiB dirty, resync {res['overflow_resync_mb']} MiB, "
            f"{res['overflow_wire_mb']} MiB on the wire until caught up in {res['overflow_catchup_s']} s")
        f.wait()
        wait_for("lag 0", lambda: status(pctl)["lag_bytes"] == 0, 600, daemons)
        stop(primary)
        stop(mirror)
        run([BIN, "recover", "--volume", f"v={mimg}", "--state-dir", f"{tmp}/ms"], capture_output=True)
        res["mirror_identical"] = run(["cmp", "-s", pimg, mimg], check=False).returncode == 0
        svg(sampler.samples, sampler.marks, os.path.join(OUT, "wan.svg"), RATE)
    finally:
        for p in procs:
            stop(p)
        wan("down")
    res["logs"] = tmp
    with open(os.path.join(OUT, "wan.json"), "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    link = res["link_mbit"]
    print()
    print(f"WAN benchmark: wan-sim {link} Mbit/s, RTT {RTT_MS} ms, loss {LOSS * 100:.1f} %, queue {QUEUE_MS} ms")
    rows = [
        ("emulator ceiling (iperf3 TCP, no delay/loss/limit)", res["emulator_ceiling_mbit"], "Mbit/s"),
        ("iperf3 TCP Cubic, single stream", res["tcp_iperf_mbit"], "Mbit/s"),
        (f"iperf3 TCP BBR, single stream (median of {ROUNDS})", res["tcp_bbr_mbit"], "Mbit/s"),
        (f"nbdcopy to qemu-nbd over TCP ({res['nbdcopy_tcp_cc']})", res["nbdcopy_tcp_mbit"], "Mbit/s"),
        (f"blkmirror bulk, incompressible, durable (median of {ROUNDS})", res["incompressible_mbit"], "Mbit/s"),
        ("blkmirror bulk, 2:1 compressible (effective)", res["compressible_effective_mbit"], "Mbit/s"),
        ("QUIC packets lost / sent (bulk)", res["packets_lost_ratio"], ""),
        ("RPO at 50 % load p50 / p99 / max", f"{res['rpo_p50_ms']} / {res['rpo_p99_ms']} / {res['rpo_max_ms']}", "ms"),
        (f"catch-up after a {CUT_SECS} s cut", res["catchup_s"], "s"),
        (f"same cut, {SMALL_JOURNAL} journal: catch-up (resync)", res["overflow_catchup_s"], "s"),
        ("  dirty / resync / on the wire meanwhile",
         f"{res['overflow_dirty_mb']} / {res['overflow_resync_mb']} / {res['overflow_wire_mb']}", "MiB"),
        ("  journal folds / writes waited", f"{res['overflow_folds']} / {res['overflow_writes_waited']}", ""),
        ("mirror byte-identical afterwards", res["mirror_identical"], ""),
    ]
    for name, v, unit in rows:
        print(f"  {name:<52} {v!s:>18} {unit}")
    inc = res["incompressible_mbit"]
    print()
    print(f"  incompressible / link        {inc / link:.2f}   (target >= 0.90)")
    if res["tcp_bbr_mbit"]:
        print(f"  incompressible / TCP BBR     {inc / res['tcp_bbr_mbit']:.2f}   (target >= 1.0)")
    print(f"  incompressible / TCP Cubic   {inc / max(res['tcp_iperf_mbit'], 0.1):.1f}   (target >= 10)")
    print(f"  compressible / link          {res['compressible_effective_mbit'] / link:.2f}   (target >= 1.7)")
    print(f"written {OUT}/wan.json and {OUT}/wan.svg")
    append_history("wan", res, commit, machine(DIR))
    if not res["mirror_identical"]:
        die("the mirror differs from the primary")


if __name__ == "__main__":
    main()
