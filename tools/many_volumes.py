#!/usr/bin/python3
"""Many volumes written at once: the regression check for issue 13's stalled stream.

Starts a `blkmirror mirror` and a replicating `blkmirror primary` on this machine with N
volumes (sparse files in a temporary directory), waits until every volume replicates (the
initial copies are done), then runs one fio (nbd engine) with one job per volume, all at once
(default 64 KiB random writes, QD4, 90 s). Every INTERVAL seconds it samples
`blkmirror status --json` of both daemons and prints one line: volumes up, max lag, max QUIC RTT,
stalls and reconnects summed. A volume is FLAGGED when its acknowledged set (`acked_set`) has
not moved for STALL seconds while it has lag (lag_bytes > 0), and when its status shows a stall
(`stalls` > 0) or a reconnect after fio started (reconnects while the initial copies ran are
reported apart, as setup_reconnects). After fio it waits (up to --drain seconds) for every
volume's lag to reach 0, then prints a per-volume table of the worst volumes and a summary.

Exit status: 0 when no volume was flagged, stalled, reconnected or failed to drain; 1 otherwise;
2 on a setup failure. Everything it started is stopped and the temporary directory removed
(unless --keep), also on Ctrl-C.

Usage (as root or not; fio with the nbd engine must be installed):
    /usr/bin/python3 tools/many_volumes.py                 # 128 volumes of 128 MiB, 64 KiB random writes QD4, 90 s
    /usr/bin/python3 tools/many_volumes.py -n 32 --runtime 30
    BLKMIRROR=/path/to/blkmirror tools/many_volumes.py --json-out run.json

Options worth knowing: --rw write (sequential), --size, --journal-size, --link-rate/--rtt
(passed to both daemons), --stacks DIR (on the first flagged stall, save `gdb thread apply all
bt` of both daemons there), --threads (print the busiest threads of both daemons each sample),
--no-wait-copy (start fio while the initial copies still run).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_bin():
    if os.environ.get("BLKMIRROR"):
        return os.environ["BLKMIRROR"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release/blkmirror")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disk_stats(path):
    """(writes completed, sectors written, ms spent writing, flushes, ms flushing) of the disk
    holding `path` (/proc/diskstats), or None."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/diskstats") as f:
            for line in f:
                x = line.split()
                if int(x[0]) == os.major(dev) and int(x[1]) == os.minor(dev):
                    return (int(x[7]), int(x[9]), int(x[10]),
                            int(x[18]) if len(x) > 18 else 0, int(x[19]) if len(x) > 19 else 0)
    except (OSError, ValueError, IndexError):
        pass
    return None


SYSCALLS = {74: "fsync", 75: "fdatasync", 18: "pwrite", 296: "pwritev", 426: "io_uring_enter", 202: "futex",
            7: "poll", 232: "epoll_wait", 0: "read", 1: "write", 17: "pread"}


def syscalls_of(pid, prefixes):
    """How many threads whose name starts with one of `prefixes` are in each system call now."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                if not name.startswith(prefixes):
                    continue
                with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                    first = f.read().split()[0]
                key = f"{name.split('-')[0]}:{SYSCALLS.get(int(first), first) if first.isdigit() else first}"
                out[key] = out.get(key, 0) + 1
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return out


def udp_errors():
    """The host's UDP error counters (/proc/net/snmp): datagrams dropped for full buffers."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}
    except (OSError, IndexError, ValueError):
        return {}


class Run:
    def __init__(self, args):
        self.a = args
        self.procs = []  # (name, Popen), stopped in reverse order
        self.tmp = None
        self.aborted = None

    # ---- processes -------------------------------------------------------------------------

    def start(self, name, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        self.procs.append((name, p))
        return p

    def cleanup(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) ignored SIGTERM for 15 s: killed")
                p.kill()
                p.wait()
        self.procs.clear()
        if self.tmp and not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp:
            log(f"kept {self.tmp}")

    def alive(self):
        for name, p in self.procs:
            if name != "fio" and p.poll() is not None:
                raise SystemExit(f"{name} exited ({p.returncode}); see its log in {self.tmp}")

    def status(self, ctl):
        out = subprocess.run([self.a.bin, "status", "--control", ctl, "--json"], capture_output=True,
                             text=True, timeout=30)
        return {v["name"]: v for v in json.loads(out.stdout)["volumes"]}

    # ---- setup -----------------------------------------------------------------------------

    def setup(self):
        a = self.a
        base = a.dir or None
        self.tmp = tempfile.mkdtemp(prefix="blkmirror-many-", dir=base)
        pki = os.path.join(self.tmp, "pki")
        subprocess.run([a.bin, "certs", "init", "--dir", pki], check=True, capture_output=True)
        for n in ("primary", "mirror"):
            subprocess.run([a.bin, "certs", "issue", "--dir", pki, n], check=True, capture_output=True)
        self.names = [f"v{i:03d}" for i in range(a.volumes)]
        port = free_port()
        self.sock = os.path.join(self.tmp, "nbd.sock")
        self.pctl = os.path.join(self.tmp, "pstate/control.sock")
        self.mctl = os.path.join(self.tmp, "mstate/control.sock")

        def tls(me, peer):
            return ["--ca", f"{pki}/ca.crt", "--cert", f"{pki}/{me}.crt", "--key", f"{pki}/{me}.key",
                    "--peer-name", peer]

        link = ["--link-rate", a.link_rate, "--rtt", str(a.rtt)]
        mvols, pvols = [], []
        for n in self.names:
            mvols += ["--volume", f"{n}={self.tmp}/m-{n}.img,size={a.size}"]
            pvols += ["--volume", f"{n}={self.tmp}/p-{n}.img,size={a.size}"]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.mlog = os.path.join(self.tmp, "mirror.log")
        self.plog = os.path.join(self.tmp, "primary.log")
        self.mirror = self.start("mirror", [a.bin, "mirror", "--listen", f"127.0.0.1:{port}", *mvols, "--state-dir",
                                            f"{self.tmp}/mstate", *tls("mirror", "primary"), *link],
                                 stderr=open(self.mlog, "w"), env=env)
        self.primary = self.start("primary", [a.bin, "primary", *pvols, "--nbd-unix", self.sock, "--state-dir",
                                              f"{self.tmp}/pstate", "--mirror", f"127.0.0.1:{port}",
                                              "--journal-size", a.journal_size, *tls("primary", "mirror"), *link],
                                  stderr=open(self.plog, "w"), env=env)
        log(f"{a.volumes} volumes of {a.size} in {self.tmp}; mirror pid {self.mirror.pid}, primary pid "
            f"{self.primary.pid}")
        t0 = time.time()
        while True:
            self.alive()
            try:
                if os.path.exists(self.sock):
                    p = self.status(self.pctl)
                    m = self.status(self.mctl)
                    up = sum(1 for v in p.values() if v["state"] == "replicating" and v["link"] == "up")
                    cons = sum(1 for v in m.values() if v["consistent"])
                    if not a.wait_copy or (up == len(self.names) and cons == len(self.names)):
                        break
            except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
                pass
            if time.time() - t0 > a.setup_timeout:
                raise SystemExit(f"not every volume replicating after {a.setup_timeout} s")
            time.sleep(1)
        log(f"every volume replicating after {time.time() - t0:.1f} s")

    # ---- the run ---------------------------------------------------------------------------

    def fio(self):
        a = self.a
        cmd = ["fio", "--thread", "--group_reporting", "--output-format=json", f"--output={self.tmp}/fio.json",
               "--ioengine=nbd", f"--rw={a.rw}", f"--bs={a.bs}", f"--iodepth={a.iodepth}", "--time_based",
               f"--runtime={a.runtime}", f"--size={a.size}", "--randrepeat=0"]
        for n in self.names:
            cmd += [f"--name={n}", f"--uri=nbd+unix:///{n}?socket={self.sock}"]
        return self.start("fio", cmd, stdout=subprocess.DEVNULL, stderr=open(f"{self.tmp}/fio.err", "w"))

    def thread_cpu(self, pid):
        """{tid: (name, cpu ticks, ns waiting on a run queue)} of a process."""
        out = {}
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        s = f.read()
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        wait_ns = int(f.read().split()[1])
                    name = s[s.index("(") + 1:s.rindex(")")]
                    fields = s[s.rindex(")") + 2:].split()
                    out[tid] = (name, int(fields[11]) + int(fields[12]), wait_ns)
                except (OSError, ValueError, IndexError):
                    pass
        except OSError:
            pass
        return out

    def busiest(self, label, pid, before, after, secs):
        hz = os.sysconf("SC_CLK_TCK")
        rows = []
        for tid, (name, t, w) in after.items():
            b = before.get(tid, (name, 0, 0))
            d = t - b[1]
            if d > 0:
                rows.append((d / hz / secs * 100, name, tid))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        # The tokio workers are the first threads named "repl" (the runtime starts them first):
        # their CPU and their time waiting for a CPU on a run queue.
        workers = sorted((int(t) for t, v in after.items() if v[0] == "repl"))[:2]
        ws = []
        for t in workers:
            n, c, w = after[str(t)]
            b = before.get(str(t), (n, c, w))
            ws.append(f"{t} cpu {(c - b[1]) / hz / secs * 100:.0f}% runq-wait {(w - b[2]) / 1e9 / secs * 100:.0f}%")
        log(f"  {label}: {len(after)} threads, {total:.0f} % CPU; tokio workers: {'; '.join(ws)}; busiest: " +
            ", ".join(f"{n}/{t} {c:.0f}%" for c, n, t in rows[:5]))

    def save_stacks(self, why):
        d = self.a.stacks
        if not d or getattr(self, "stacks_saved", False):
            return
        self.stacks_saved = True
        os.makedirs(d, exist_ok=True)
        for name, p in (("primary", self.primary), ("mirror", self.mirror)):
            path = os.path.join(d, f"{name}-{p.pid}-{int(time.time())}.txt")
            with open(path, "w") as f:
                f.write(f"# {why}\n")
                f.flush()
                subprocess.run(["gdb", "-batch", "-p", str(p.pid), "-ex", "thread apply all bt"], stdout=f,
                               stderr=subprocess.STDOUT, timeout=300)
            log(f"  stacks of the {name} saved in {path}")

    def renice_repl(self):
        """Experiment (--renice-repl): give this run's daemons' "repl" threads (tokio workers and
        blocking pool) another nice value, to test whether they are starved of CPU."""
        for p in (self.primary, self.mirror):
            try:
                tids = os.listdir(f"/proc/{p.pid}/task")
            except OSError:
                continue
            repl = []
            for tid in tids:
                try:
                    with open(f"/proc/{p.pid}/task/{tid}/comm") as f:
                        if f.read().strip() == "repl":
                            repl.append(int(tid))
                except OSError:
                    pass
            # The tokio workers are the first two (the runtime starts them first).
            for tid in sorted(repl)[:2] if self.a.renice_workers_only else repl:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, self.a.renice_repl)
                except OSError:
                    pass

    def sample_loop(self, fio):
        a = self.a
        track = {n: {"acked": None, "moved": time.time(), "max_lag": 0.0, "max_lag_bytes": 0, "max_rtt": 0.0,
                     "flagged": [], "stalls": 0, "reconnects": 0, "mreconnects": 0, "last_error": "",
                     "mirror_error": ""} for n in self.names}
        t0 = time.time()
        drain_started = None
        drained_at = None
        cpu = {}
        udp0 = udp_errors()
        while True:
            self.alive()
            now = time.time()
            if a.renice_repl is not None:
                self.renice_repl()
            if a.threads:
                cpu_now = {n: (p.pid, self.thread_cpu(p.pid)) for n, p in (("primary", self.primary),
                                                                            ("mirror", self.mirror))}
            try:
                p = self.status(self.pctl)
                m = self.status(self.mctl)
            except (OSError, ValueError, subprocess.TimeoutExpired) as e:
                log(f"status failed: {e}")
                time.sleep(a.interval)
                continue
            st_time = time.time() - now
            maxlag, maxrtt, up, lagging, blocked = 0.0, 0.0, 0, 0, 0
            flagged_now = []
            for n in self.names:
                v, mv, t = p[n], m[n], track[n]
                lag_s = v["lag_seconds"] or 0.0
                lag_b = v["lag_bytes"] or 0
                rtt = (v.get("quic") or {}).get("rtt_ms") or 0.0
                up += v["link"] == "up"
                lagging += lag_b > 0
                maxlag, maxrtt = max(maxlag, lag_s), max(maxrtt, rtt)
                t["max_lag"] = max(t["max_lag"], lag_s)
                t["max_lag_bytes"] = max(t["max_lag_bytes"], lag_b)
                t["max_rtt"] = max(t["max_rtt"], rtt)
                # Counted from the first sample on: reconnects while the initial copies ran are
                # reported apart (setup_reconnects).
                t.setdefault("base", (v["stalls"], v["reconnects"], mv["reconnects"]))
                t["setup_reconnects"] = t["base"][1]
                t["stalls"] = v["stalls"] - t["base"][0]
                t["reconnects"] = v["reconnects"] - t["base"][1]
                t["mreconnects"] = mv["reconnects"] - t["base"][2]
                if v["last_error"]:
                    t["last_error"] = v["last_error"]
                if mv["last_error"]:
                    t["mirror_error"] = mv["last_error"]
                q = v.get("quic") or {}
                t["cur"] = (v["link"], lag_s, v["acked_set"], rtt, q.get("cwnd"), q.get("mtu"))
                t.setdefault("series", []).append(
                    [round(now - t0, 1), v["link"] == "up", v["acked_set"], round(lag_s, 1), lag_b, round(rtt),
                     q.get("cwnd"), v["stalls"], v["reconnects"], mv["acked_set"], mv["applied_set"]])
                # A congestion window smaller than one datagram: quinn sends nothing more.
                if q.get("cwnd") and q.get("mtu") and q["cwnd"] < q["mtu"] and v["link"] == "up":
                    t["cwnd_below_mtu"] = t.get("cwnd_below_mtu", 0) + 1
                    blocked += 1
                if v["acked_set"] != t["acked"] or lag_b == 0:
                    t["acked"], t["moved"] = v["acked_set"], now
                still = now - t["moved"]
                if still >= a.stall:
                    flagged_now.append(n)
                    if not t["flagged"] or t["flagged"][-1][1] < now - a.interval * 1.5:
                        t["flagged"].append([round(now - t0), round(now - t0)])
                    t["flagged"][-1][1] = round(now - t0)
            stalls = sum(track[n]["stalls"] for n in self.names)
            lost = sum((v.get("quic") or {}).get("lost_packets", 0) for v in p.values())
            cong = sum((v.get("quic") or {}).get("congestion_events", 0) for v in p.values())
            udp = udp_errors()
            udp_d = {k: udp[k] - udp0.get(k, 0) for k in udp}
            reconn = sum(track[n]["reconnects"] for n in self.names)
            phase = "fio" if fio.poll() is None else "drain"
            log(f"t={now - t0:5.0f}s {phase}: up {up}/{len(self.names)}, lagging {lagging}, max lag "
                f"{maxlag:7.2f} s, max rtt {maxrtt:8.1f} ms, stalls {stalls}, reconnects {reconn}"
                f", cwnd<mtu {blocked}, quic lost {lost} congestion events {cong}, UDP drops since start "
                f"rcvbuf {udp_d.get('RcvbufErrors', 0)} sndbuf {udp_d.get('SndbufErrors', 0)}"
                f" (status took {st_time:.1f} s)")
            if flagged_now:
                log(f"  FLAGGED {len(flagged_now)} volumes (acked_set still >= {a.stall:.0f} s with lag); first ones:")
            for n in flagged_now[:a.show_flagged]:
                link, lag_s, acked, rtt, cwnd, mtu = track[n]["cur"]
                log(f"    {n}: acked_set {acked} still for {now - track[n]['moved']:.0f} s, link {link}, "
                    f"lag {lag_s:.1f} s, rtt {rtt:.1f} ms, cwnd {cwnd} mtu {mtu}, stalls {p[n]['stalls']}, last_error "
                    f"{p[n]['last_error'][:120]!r}")
            if flagged_now:
                self.save_stacks(f"flagged at t={now - t0:.0f}s: {flagged_now}")
            if a.threads and cpu:
                for n in ("primary", "mirror"):
                    self.busiest(n, cpu_now[n][0], cpu[n][1], cpu_now[n][1], now - cpu["t"])
                d = disk_stats(self.tmp)
                if d and cpu.get("disk"):
                    b = cpu["disk"]
                    w = d[0] - b[0]
                    f = d[3] - b[3]
                    log(f"  disk: {(d[1] - b[1]) * 512 / (1 << 20) / (now - cpu['t']):.0f} MiB/s written, "
                        f"{w / (now - cpu['t']):.0f} writes/s, avg write {((d[2] - b[2]) / w) if w else 0:.1f} ms, "
                        f"{f} flushes avg {((d[4] - b[4]) / f) if f else 0:.1f} ms")
                st = syscalls_of(self.mirror.pid, ("sync-", "redo-", "apply-"))
                log("  mirror pipeline threads now in: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items())))
            if a.threads:
                cpu = dict(cpu_now, t=now, disk=disk_stats(self.tmp))
            free = shutil.disk_usage(self.tmp).free
            if free < a.min_free_gib * (1 << 30):
                log(f"ABORT: only {free / (1 << 30):.1f} GiB free on {self.tmp} (--min-free-gib {a.min_free_gib})")
                self.aborted = "disk space"
                break
            if fio.poll() is not None:
                if drain_started is None:
                    drain_started = now
                    log(f"fio ended ({fio.returncode}); waiting up to {a.drain} s for every lag to reach 0")
                if lagging == 0:
                    drained_at = now
                    break
                if now - drain_started > a.drain:
                    break
            time.sleep(max(0.0, a.interval - (time.time() - now)))
        return track, (drained_at - drain_started) if drained_at else None

    def peak_rss(self):
        """Peak resident memory (VmHWM, MiB) of both daemons, read before they stop."""
        out = {}
        for name, p in (("primary", self.primary), ("mirror", self.mirror)):
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            out[name] = int(line.split()[1]) // 1024
            except (OSError, ValueError):
                pass
        return out

    def report(self, track, drain_secs):
        a = self.a
        fio_bw = None
        try:
            with open(f"{self.tmp}/fio.json") as f:
                txt = f.read()
            j = json.loads(txt[txt.index("{"):])
            w = j["jobs"][0]["write"]
            fio_bw = (w["bw_bytes"] / (1 << 20), w["iops"])
        except (OSError, ValueError, KeyError, IndexError):
            pass
        worst = sorted(self.names, key=lambda n: (-(track[n]["stalls"] + len(track[n]["flagged"])),
                                                  -track[n]["max_lag"]))
        print(f"\n{'volume':8} {'max_lag_s':>9} {'max_lag_MiB':>11} {'max_rtt_ms':>10} {'stalls':>6} {'reconn':>6} "
              f"{'m_reconn':>8} {'cwnd<mtu':>8}  flagged(t_from-t_to)  last_error")
        for n in worst[:a.show]:
            t = track[n]
            print(f"{n:8} {t['max_lag']:9.1f} {t['max_lag_bytes'] / (1 << 20):11.1f} {t['max_rtt']:10.1f} "
                  f"{t['stalls']:6} {t['reconnects']:6} {t['mreconnects']:8} {t.get('cwnd_below_mtu', 0):8}  "
                  f"{','.join(f'{x}-{y}' for x, y in t['flagged']) or '-':20}  "
                  f"{(t['last_error'] or t['mirror_error'])[:100]}")
        bad = [n for n in self.names if track[n]["flagged"] or track[n]["stalls"] or track[n]["reconnects"]]
        summary = {
            "volumes": a.volumes, "size": a.size, "rw": a.rw, "bs": a.bs, "iodepth": a.iodepth,
            "runtime": a.runtime,
            "fio_mib_s": round(fio_bw[0], 1) if fio_bw else None,
            "fio_iops": round(fio_bw[1]) if fio_bw else None,
            "max_lag_s": round(max(t["max_lag"] for t in track.values()), 2),
            "max_rtt_ms": round(max(t["max_rtt"] for t in track.values()), 1),
            "stalls": sum(t["stalls"] for t in track.values()),
            "reconnects": sum(t["reconnects"] for t in track.values()),
            "setup_reconnects": sum(t.get("setup_reconnects", 0) for t in track.values()),
            "flagged_volumes": [n for n in self.names if track[n]["flagged"]],
            "cwnd_below_mtu_volumes": [n for n in self.names if track[n].get("cwnd_below_mtu")],
            "drain_s": round(drain_secs, 1) if drain_secs is not None else None,
        }
        summary["aborted"] = self.aborted
        summary["peak_rss_mib"] = self.peak_rss()
        print("\nsummary: " + json.dumps(summary))
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"summary": summary, "volumes": track}, f, indent=1, default=str)
        ok = not bad and drain_secs is not None and not self.aborted
        print("RESULT: " + ("PASS" if ok else
                            f"FAIL ({len(bad)} volumes stalled, flagged or reconnected"
                            f"{'; lag did not drain' if drain_secs is None else ''}"
                            f"{'; aborted: ' + self.aborted if self.aborted else ''})"))
        return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--volumes", type=int, default=128)
    ap.add_argument("--size", default="128M", help="size of each volume (sparse)")
    ap.add_argument("--rw", default="randwrite", help="fio --rw (randwrite, write, ...)")
    ap.add_argument("--bs", default="64k")
    ap.add_argument("--iodepth", type=int, default=4)
    ap.add_argument("--runtime", type=int, default=90, help="fio seconds")
    ap.add_argument("--interval", type=float, default=5, help="seconds between status samples")
    ap.add_argument("--stall", type=float, default=30, help="acked_set still this long with lag: flagged")
    ap.add_argument("--drain", type=float, default=180, help="seconds to wait for lag 0 after fio")
    ap.add_argument("--journal-size", default="128M",
                    help="per volume (the daemon's default is 1G: 128 of those can fill a disk)")
    ap.add_argument("--link-rate", default="1G")
    ap.add_argument("--rtt", default="30")
    ap.add_argument("--dir", help="where the temporary directory goes (default $TMPDIR)")
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--no-wait-copy", dest="wait_copy", action="store_false")
    ap.add_argument("--setup-timeout", type=float, default=600)
    ap.add_argument("--threads", action="store_true", help="print the busiest threads each sample")
    ap.add_argument("--stacks", help="save gdb stacks of both daemons here at the first flagged stall")
    ap.add_argument("--show", type=int, default=12, help="volumes in the final table")
    ap.add_argument("--show-flagged", type=int, default=5, help="flagged volumes printed per sample")
    ap.add_argument("--min-free-gib", type=float, default=8,
                    help="stop the run when the temporary directory's file system has less free space")
    ap.add_argument("--renice-repl", type=int, help="experiment: nice value for the daemons' repl threads")
    ap.add_argument("--renice-workers-only", action="store_true", help="with --renice-repl: the tokio workers only")
    ap.add_argument("--json-out")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, images)")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        print(f"no blkmirror binary at {a.bin} (cargo build --release, or set BLKMIRROR)", file=sys.stderr)
        return 2
    run = Run(a)
    # Ctrl-C or SIGTERM: clean up like a normal end.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run.setup()
        fio = run.fio()
        log(f"fio: {a.volumes} jobs, {a.rw} {a.bs} QD{a.iodepth}, {a.runtime} s (pid {fio.pid})")
        track, drain = run.sample_loop(fio)
        fio.wait()
        return 0 if run.report(track, drain) else 1
    except KeyboardInterrupt:
        log("interrupted")
        return 1
    except SystemExit as e:
        log(f"setup failed: {e}")
        return 2
    finally:
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
