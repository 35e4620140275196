#!/usr/bin/python3
"""Replication benchmark (make bench-repl).

fio's nbd engine against `blkmirror primary` replicating to a `blkmirror mirror` on this
machine, and against `qemu-nbd --cache=none --aio=io_uring` (no replication) in the same run,
alternating. Workloads: 1 MiB sequential write QD16 and 4 KiB random write QD32. While fio runs,
the primary's status is sampled every 100 ms for the lag (age of the oldest write the mirror has
not made durable). After each blkmirror run the benchmark waits for lag 0 and checks that the
mirror is byte-identical to the primary. Peak RSS (VmHWM) of both daemons is recorded.

Every client byte is written to this machine's disk three times (the primary's volume, the
mirror's redo log, the mirror's volume) where qemu-nbd writes it once, so the benchmark also
measures, in the same run: the disk's own direct-write rate (fio, 1 MiB QD16) and the bytes the
disk wrote per client byte in each run; and, before the servers start, the rate of 4 KiB random
direct writes into each server's own image (this virtual disk's random-write rate differs 2-3x
between files, with how their blocks were first written: docs/TUNING.md). A second pair runs beside the first with the mirror's
volume and state in RAM (/dev/shm), as when the mirror has its own disks: what replication costs
the primary, apart from the mirror sharing its disk. The ratio against qemu-nbd (the issue's
target) is the first pair's. A third pair, like the first, runs its mirror with `--history 1h`
and its primary with `--on-journal-full block` (clients wait for a mirror that falls behind,
rather than going on at local speed once the journal folds): what keeping a history costs (the
mirror reads and saves every block a set overwrites), as a ratio against the first pair in the
same rounds and as history bytes per client byte.

Every run starts from a quiet disk: the benchmark syncs and pauses BENCH_SETTLE seconds first.
A sequential run writes up to 15 GiB as fast as this shared virtual disk takes it, and the next
run should not pay for its write-back.

Environment: BENCH_SECS (15), BENCH_ROUNDS (3), BENCH_SIZE (2G), BENCH_DIR (target/bench/tmp),
BENCH_SETTLE (3), BENCH_SKIP_BUILD (0), BENCH_HISTORY (benches/history). Output: a table on
stdout, target/bench/repl.json, and one line appended to benches/history/repl.jsonl (commit,
machine, figures).
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
import time

from benchlib import BIN, append_history, die, git_commit, log, machine, status, stop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECS = int(os.environ.get("BENCH_SECS", "15"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SETTLE = float(os.environ.get("BENCH_SETTLE", "3"))
SIZE = os.environ.get("BENCH_SIZE", "2G")
DIR = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(ROOT, "target/bench/tmp")))
OUT = os.path.join(ROOT, "target/bench/repl.json")
WORKLOADS = [
    ("seq_write_1m_qd16", "write", "1M", 16, "MiB/s"),
    ("rand_write_4k_qd32", "randwrite", "4k", 32, "IOPS"),
]


def status_any(control):
    """The first volume of a daemon's status, replicating or not (status exits 6 when not)."""
    out = subprocess.run([BIN, "status", "--control", control, "--json"], capture_output=True, text=True)
    return json.loads(out.stdout)["volumes"][0]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbd_ready(sock):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(sock)
        return s.recv(8) == b"NBDMAGIC"


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def make_backing(path):
    """Preallocated and fully written with direct I/O, so every server writes into allocated
    blocks, and blocks alike (see `random_write_iops`)."""
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["fallocate", "-l", SIZE, path], check=True)
    fio_direct(path, "--rw=write", "--bs=1M", "--iodepth=16", f"--size={SIZE}")


def fio(uri, rw, bs, qd, out):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
           "--time_based", f"--runtime={SECS}", "--norandommap", "--randrepeat=0", "--output-format=json",
           f"--output={out}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fio_write_stats(text, where):
    """The write statistics of fio's JSON report `text` (fio may print notes before it)."""
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job["error"]:
        die(f"fio error {job['error']} in {where}")
    return job["write"]


def fio_job(out):
    return fio_write_stats(open(out).read(), out)


def fio_direct(filename, *args):
    """fio with direct I/O through io_uring on `filename`, run to the end: its write statistics."""
    out = subprocess.run(["fio", "--name=disk", "--ioengine=io_uring", "--direct=1", f"--filename={filename}",
                          "--output-format=json", *args], check=True, capture_output=True, text=True).stdout
    return fio_write_stats(out, f"fio on {filename}")


def fio_value(out, unit):
    w = fio_job(out)
    return w["bw"] / 1024 if unit == "MiB/s" else w["iops"]


def settle():
    """Let the previous run's writes drain before the next one is timed."""
    os.sync()
    time.sleep(SETTLE)


def disk_written(path):
    """Bytes written so far to the block device holding `path` (sysfs counts 512-byte sectors)."""
    dev = os.stat(path).st_dev
    with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
        return int(f.read().split()[6]) * 512


def disk_write_rate(path):
    """The disk's own direct-write rate (MiB/s): fio 1 MiB QD16 for 8 s on a scratch file."""
    scratch = os.path.join(path, "disk-rate.tmp")
    try:
        return fio_direct(scratch, "--rw=write", "--bs=1M", "--iodepth=16", "--size=2G", "--time_based",
                          "--runtime=8")["bw"] / 1024
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def random_write_iops(image):
    """4 KiB random direct writes QD32 for 5 s into `image` itself (IOPS). On this virtual disk,
    blocks first written through the page cache take them 2-3x slower than blocks first written
    with direct I/O, even after a direct rewrite (docs/TUNING.md, "The images are made alike"),
    so the random ratio is read against the rate of the very images the servers write."""
    return fio_direct(image, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--time_based", "--runtime=5",
                      "--norandommap", "--randrepeat=0")["iops"]


class Pair:
    """A mirror and a replicating primary on this machine, fresh state each time."""

    def __init__(self, tmp, img_p, img_m, mirror_state, mirror_extra=(), primary_extra=()):
        self.tmp = tmp
        os.makedirs(tmp, exist_ok=True)
        pki = os.path.join(tmp, "pki")
        if not os.path.exists(pki):
            subprocess.run([BIN, "certs", "init", "--dir", pki], check=True, capture_output=True)
            for n in ("primary", "mirror"):
                subprocess.run([BIN, "certs", "issue", "--dir", pki, n], check=True, capture_output=True)
        shutil.rmtree(os.path.join(tmp, "pstate"), ignore_errors=True)
        shutil.rmtree(mirror_state, ignore_errors=True)
        self.mstate = mirror_state
        port = free_port()
        self.sock = os.path.join(tmp, "p.sock")
        self.pctl = os.path.join(tmp, "pstate/control.sock")
        self.mctl = os.path.join(mirror_state, "control.sock")
        tls = lambda me, peer: ["--ca", f"{pki}/ca.crt", "--cert", f"{pki}/{me}.crt", "--key", f"{pki}/{me}.key",
                                "--peer-name", peer]
        self.mlog = open(os.path.join(tmp, "mirror.log"), "a")
        self.plog = open(os.path.join(tmp, "primary.log"), "a")
        self.mirror = subprocess.Popen([BIN, "mirror", "--listen", f"127.0.0.1:{port}", "--volume", f"v={img_m}",
                                        "--state-dir", mirror_state, *tls("mirror", "primary"), *mirror_extra],
                                       stderr=self.mlog)
        self.primary = subprocess.Popen([BIN, "primary", "--volume", f"v={img_p}", "--nbd-unix", self.sock,
                                         "--state-dir", os.path.join(tmp, "pstate"), "--mirror", f"127.0.0.1:{port}",
                                         "--rtt", "1", "--link-rate", "40G", *tls("primary", "mirror"),
                                         *primary_extra], stderr=self.plog)
        procs = (self.mirror, self.primary)
        wait_for("the primary's NBD socket", lambda: nbd_ready(self.sock), procs=procs)
        wait_for("the initial copy", lambda: status(self.mctl)["consistent"], timeout=1800, procs=procs)

    def stop(self):
        stop(self.primary)
        stop(self.mirror)


def main():
    for tool in ("fio", "qemu-nbd", "fallocate", "cmp"):
        if not shutil.which(tool):
            die(f"{tool} not found")
    commit = git_commit()  # before the build: the tree may change while the benchmark runs
    if os.environ.get("BENCH_SKIP_BUILD") != "1":
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    os.makedirs(DIR, exist_ok=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bm-repl-", dir="/tmp")
    ram = tempfile.mkdtemp(prefix="bm-repl-", dir="/dev/shm")
    img_p, img_m, img_q, img_p2, img_p3, img_m3 = (
        os.path.join(DIR, n) for n in ("repl-primary.img", "repl-mirror.img", "repl-qemu.img", "repl-primary2.img",
                                       "repl-primary3.img", "repl-mirror3.img"))
    img_m2 = os.path.join(ram, "repl-mirror.img")
    kinds = ["blkmirror", "blkmirror_mirror_in_ram", "blkmirror_history", "qemu_nbd"]
    history_per_client = {w[0]: [] for w in WORKLOADS}
    history_folds = {w[0]: 0 for w in WORKLOADS}
    samples = {w[0]: {k: [] for k in kinds} for w in WORKLOADS}
    written = {w[0]: {k: [] for k in kinds} for w in WORKLOADS}
    lags = {w[0]: [] for w in WORKLOADS}
    rss = {"primary": 0, "mirror": 0, "qemu_nbd": 0}
    identical = True
    try:
        log(f"preparing backing files ({SIZE} each in {DIR}, one in {ram})")
        # The mirror's image is made like the others, not copied from the primary's (a copy
        # goes through the page cache: see `random_write_iops`); the initial copy, not timed,
        # then makes it the primary's twin.
        for img in (img_p, img_m, img_q, img_p2, img_p3, img_m3):
            make_backing(img)
        shutil.copyfile(img_p2, img_m2)  # in RAM, how blocks were first written does not matter
        disk_rate = disk_write_rate(DIR)
        log(f"this disk writes {disk_rate:.0f} MiB/s (fio, direct, 1 MiB QD16)")
        # Before the pairs start: the initial copy rewrites the mirror from the primary anyway.
        image_iops = {k: random_write_iops(img) for k, img in
                      (("primary", img_p), ("mirror", img_m), ("qemu_nbd", img_q))}
        log("4 KiB random writes into the images themselves (fio, direct, QD32), IOPS: " +
            ", ".join(f"{k} {v:.0f}" for k, v in image_iops.items()))
        pairs = {"blkmirror": Pair(os.path.join(tmp, "disk"), img_p, img_m, os.path.join(tmp, "disk/mstate")),
                 "blkmirror_mirror_in_ram": Pair(os.path.join(tmp, "ram"), img_p2, img_m2, os.path.join(ram, "mstate")),
                 "blkmirror_history": Pair(os.path.join(tmp, "hist"), img_p3, img_m3, os.path.join(tmp, "hist/mstate"),
                                           # The oldest points give way at the cap (the
                                           # volume's size): a bench writes far more than
                                           # that within the hour, and `wait` would pause.
                                           ("--history", "1h", "--history-full", "drop-oldest"),
                                           # Clients wait for a mirror that falls behind (a
                                           # journal that folded would let them go on at
                                           # local speed): the rate is replication's.
                                           ("--on-journal-full", "block"))}
        for r in range(1, ROUNDS + 1):
            order = kinds if r % 2 else kinds[::-1]
            for name, rw, bs, qd, unit in WORKLOADS:
                for kind in order:
                    out = os.path.join(tmp, f"{name}.{kind}.{r}.json")
                    settle()
                    before = disk_written(DIR)
                    if kind == "qemu_nbd":
                        qsock = os.path.join(tmp, "q.sock")
                        q = subprocess.Popen(["qemu-nbd", "--cache=none", "--aio=io_uring", "-f", "raw",
                                              f"--socket={qsock}", "-x", "v", "--persistent", "--shared=8", img_q])
                        wait_for("qemu-nbd", lambda: nbd_ready(qsock), procs=(q,))
                        f = fio(f"nbd+unix:///v?socket={qsock}", rw, bs, qd, out)
                        if f.wait() != 0:
                            die(f"fio against qemu-nbd failed: {f.stderr.read().decode()}")
                        rss["qemu_nbd"] = max(rss["qemu_nbd"], peak_rss_kib(q.pid))
                        stop(q)
                    else:
                        pair = pairs[kind]
                        hist_before = (status_any(pair.mctl).get("history") or {}).get("appended_bytes", 0)
                        folds_before = status_any(pair.pctl).get("journal_folds", 0)
                        f = fio(f"nbd+unix:///v?socket={pair.sock}", rw, bs, qd, out)
                        while f.poll() is None:
                            try:
                                lag = status(pair.pctl)["lag_seconds"]
                                if kind == "blkmirror":
                                    lags[name].append(lag)
                            except (subprocess.CalledProcessError, KeyError, ValueError):
                                pass
                            time.sleep(0.1)
                        if f.returncode != 0:
                            die(f"fio against blkmirror failed: {f.stderr.read().decode()}")
                        wait_for("lag 0", lambda: status(pair.pctl)["lag_bytes"] == 0, timeout=600,
                                 procs=(pair.primary, pair.mirror))
                        # And applied: the disk's bytes of this run are all written by then (a
                        # mirror slower to apply would push them into the next run's count).
                        wait_for("the mirror applied", lambda: status(pair.mctl)["applied_set"]
                                 == status(pair.mctl)["acked_set"], timeout=600, procs=(pair.primary, pair.mirror))
                        time.sleep(0.5)
                        if kind == "blkmirror":
                            rss["primary"] = max(rss["primary"], peak_rss_kib(pair.primary.pid))
                            rss["mirror"] = max(rss["mirror"], peak_rss_kib(pair.mirror.pid))
                    client = fio_job(out)["io_bytes"]
                    written[name][kind].append((disk_written(DIR) - before) / max(client, 1))
                    if kind == "blkmirror_history":
                        # What this run saved, whatever retention freed meanwhile (blocks that
                        # held zeroes cost a record, not their length).
                        hist_after = (status_any(pair.mctl).get("history") or {}).get("appended_bytes", 0)
                        history_per_client[name].append((hist_after - hist_before) / max(client, 1))
                        history_folds[name] += status_any(pair.pctl).get("journal_folds", 0) - folds_before
                    v = fio_value(out, unit)
                    samples[name][kind].append(v)
                    log(f"  round {r} {name} {kind}: {v:.1f} {unit}, disk wrote {written[name][kind][-1]:.2f} "
                        f"bytes per client byte")
        for pair in pairs.values():
            pair.stop()
        log("recover the mirrors and compare them with their primaries")
        for pair, prim, mirr in ((pairs["blkmirror"], img_p, img_m), (pairs["blkmirror_mirror_in_ram"], img_p2, img_m2),
                                 (pairs["blkmirror_history"], img_p3, img_m3)):
            subprocess.run([BIN, "recover", "--volume", f"v={mirr}", "--state-dir", pair.mstate],
                           check=True, capture_output=True)
            identical &= subprocess.run(["cmp", "-s", prim, mirr]).returncode == 0
    finally:
        for img in (img_p, img_m, img_q, img_p2, img_m2, img_p3, img_m3):
            if os.path.exists(img) and os.environ.get("BENCH_KEEP") != "1":
                os.unlink(img)
        shutil.rmtree(ram, ignore_errors=True)

    doc = {"workloads": {}, "rss_kib": rss, "rounds": ROUNDS, "runtime_s": SECS, "mirror_identical": identical,
           "disk_write_mib_s": round(disk_rate, 1),
           "image_random_write_iops": {k: round(v) for k, v in image_iops.items()}, "logs": tmp}
    print()
    print(f"replication benchmark: median of {ROUNDS} round(s) x {SECS} s; fio nbd engine; mirror on this machine")
    print(f"{'workload':<20} | {'unit':<5} | {'blkmirror+repl':>14} | {'qemu-nbd':>10} | {'ratio':>6} | "
          f"{'lag p50 ms':>10} | {'lag p99 ms':>10} | {'lag max ms':>10}")
    print("-" * 104)
    med = lambda xs: statistics.median(xs) if xs else 0.0
    for name, _rw, _bs, _qd, unit in WORKLOADS:
        bm = med(samples[name]["blkmirror"])
        ram_bm = med(samples[name]["blkmirror_mirror_in_ram"])
        qn = med(samples[name]["qemu_nbd"])
        lag = sorted(lags[name]) or [0.0]
        p = lambda q: 1000 * lag[min(len(lag) - 1, int(q * len(lag)))]
        doc["workloads"][name] = {"blkmirror": round(bm, 1), "qemu_nbd": round(qn, 1), "ratio": round(bm / qn, 3),
                                  "unit": unit, "lag_p50_ms": round(p(0.5), 1), "lag_p99_ms": round(p(0.99), 1),
                                  "lag_max_ms": round(1000 * lag[-1], 1), "lag_samples": len(lags[name]),
                                  "samples": samples[name],
                                  "blkmirror_mirror_in_ram": round(ram_bm, 1),
                                  "ratio_mirror_in_ram": round(ram_bm / qn, 3),
                                  "disk_bytes_per_client_byte": {k: round(med(v), 2) for k, v in written[name].items()},
                                  "blkmirror_history": round(med(samples[name]["blkmirror_history"]), 1),
                                  "history_vs_without": round(med(samples[name]["blkmirror_history"]) / max(bm, 1e-9), 3),
                                  "history_bytes_per_client_byte": round(med(history_per_client[name]), 2),
                                  "history_journal_folds": history_folds[name]}
        print(f"{name:<20} | {unit:<5} | {bm:>14.1f} | {qn:>10.1f} | {bm / qn:>6.2f} | {p(0.5):>10.1f} | "
              f"{p(0.99):>10.1f} | {1000 * lag[-1]:>10.1f}")
    print()
    print("the same primary, its mirror's volume and state in RAM (the mirror on its own disks):")
    for name, _rw, _bs, _qd, unit in WORKLOADS:
        w = doc["workloads"][name]
        print(f"{name:<20} | {unit:<5} | {w['blkmirror_mirror_in_ram']:>14.1f} | {w['qemu_nbd']:>10.1f} | "
              f"{w['ratio_mirror_in_ram']:>6.2f}")
    print()
    print("the first pair again with the mirror keeping a history (--history 1h; its primary with "
          "--on-journal-full block, so that clients wait for a mirror that falls behind):")
    for name, _rw, _bs, _qd, unit in WORKLOADS:
        w = doc["workloads"][name]
        print(f"{name:<20} | {unit:<5} | {w['blkmirror_history']:>14.1f} | against without: "
              f"{w['history_vs_without']:>5.2f} | history bytes per client byte: {w['history_bytes_per_client_byte']}"
              f" | journal folds: {w['history_journal_folds']}")
    print()
    print(f"this disk alone writes {disk_rate:.0f} MiB/s (fio, direct, 1 MiB QD16); bytes it wrote per client byte "
          "(median): " + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in
                                                             doc["workloads"][name]["disk_bytes_per_client_byte"].items())
                                  for name, *_ in WORKLOADS))
    print("4 KiB random writes into the images themselves (fio, direct, QD32): " +
          ", ".join(f"{k} {v:.0f} IOPS" for k, v in image_iops.items()))
    print(f"peak RSS KiB: primary {rss['primary']}, mirror {rss['mirror']}, qemu-nbd {rss['qemu_nbd']}")
    print(f"mirrors byte-identical to their primaries after the run: {identical}")
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"written {OUT}")
    append_history("repl", doc, commit, machine(DIR))
    if not identical:
        die("a mirror differs from its primary")


if __name__ == "__main__":
    main()
