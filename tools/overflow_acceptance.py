#!/usr/bin/python3
"""Acceptance of issue 14 (the overflow ladder, parts 1 and 2) with real processes at full scale.

"With the mirror away and a journal of 128 MiB, a client writes 2 GiB through NBD: the writes
finish at local speed, nothing hangs. The mirror comes back: the resync moves only the dirty
regions, and at every kill -9 of the mirror or the primary during it, `recover` leaves the
mirror a valid prefix state (tools/crashcheck.py); after quiesce it is byte-identical."

What it does, on this machine, in a temporary directory:

 1. Sparse volumes (default 4 GiB, so that 2 GiB of writes are not the whole disk), certificates
    (`blkmirror certs`), a `blkmirror mirror` and a `blkmirror primary --journal-size 128M`
    (`--on-journal-full track`, the default); waits until the primary replicates.
 2. Writes the first part of a seeded tools/workload.py plan (--pre-bytes) and waits until it is
    synced; stops the mirror (SIGTERM).
 3. The reference: the same stretch of the plan written to a standalone `blkmirror primary` (no
    mirror, same volume size, same client) is "local speed". Then, with the mirror away, the
    stretch is written to the replicating primary (~--outage-bytes): its time, MiB/s, the ratio
    to the reference, and the longest time the writer made no progress. Status must show
    `journal_tracking` true and `journal_folds` >= 1; `dirty_bytes` is printed.
 4. The mirror comes back. --rounds times: kill -9 the mirror while its `staged_resync` is
    non-null, `blkmirror recover` its volume and run tools/crashcheck.py (a prefix state no
    older than the part before the outage); start it, kill -9 the primary while the resync goes
    on, stop the mirror, recover and check again; start both. The kills are spread over the
    resync: kill k (from 0) waits until k/(2*rounds+1) of the dirty bytes the outage left are
    sent (what the current session has sent against its plan; `dirty_bytes` only shrinks as
    acknowledgements come back, which lags), and until the mirror has staged a set more than
    `recover` said it kept. A resync that ends before a kill could land fails the run.
 5. Waits until synced (lag 0, `dirty_bytes` 0), stops both, recovers, compares the images byte
    for byte and runs crashcheck on the mirror's image: it must hold every write.
 6. Prints a summary (bytes written in the outage, MiB/s against the reference, dirty bytes,
    resync bytes sent against dirty bytes, resync times, each kill's prefix) and appends one line
    to benches/history/acceptance-overflow.jsonl (benches/benchlib.py; BENCH_HISTORY=DIR sends
    it elsewhere; --no-history skips it).

Other checks on the way: every resync the primary reports is of kind "dirty", and no session
plans more than the dirty bytes the outage left (its log line "resync of the dirty regions
starts dirty_bytes=N"); the data bytes sent (status `sent_bytes`, summed over the primary's
lives) are within the sum of the sessions' plans; the primary's log has one "full copy starts"
(the initial copy) and no other; every `recover` says consistent; every daemon stopped with
SIGTERM exits 0. The summary's wire figures are after lz4 (`--compress`): the workload's blocks
are a repeated 64-byte pattern and compress about 50 to 1.

Exit status: 0 every check passed; 1 a check failed (or the run was interrupted); 2 setup
failure (no binary, no libnbd bindings, not enough free disk, a daemon that does not start).
Everything it started is stopped and the temporary directory removed (unless --keep), also on
Ctrl-C; after a failed check the daemons' logs are copied to a directory it names.

Run with Debian's python (libnbd bindings):
    make acceptance-overflow                       # builds the release binary first
    /usr/bin/python3 tools/overflow_acceptance.py  # defaults: 4G volume, 128M journal, 2G outage, 2 rounds
    /usr/bin/python3 tools/overflow_acceptance.py --outage-bytes 512M --volume-size 1G --rounds 1
    BLKMIRROR=/path/to/blkmirror tools/overflow_acceptance.py --json-out run.json
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
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(ROOT, "benches"))
import workload  # noqa: E402  (the plan: which write is how many bytes)

PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings workload.py needs
VOL = "vol1"
MIB = 1 << 20
GIB = 1 << 30

# The scale scripts' shared pieces: timestamped progress lines, the binary under test.
from many_volumes import default_bin, free_port, log  # noqa: E402


def built_here_bin():
    """The binary `make release` of this checkout builds (BLKMIRROR ignored)."""
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release/blkmirror")


def parse_size(text):
    """64M, 4G, 1T (powers of 1024), or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def size_arg(n):
    """A size as the daemons' flags take it (exact: K, M or G multiples)."""
    for unit, mult in (("G", GIB), ("M", MIB), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    raise ValueError(f"{n} is not a multiple of 1 KiB")


def mib(n):
    return n / MIB


def allocated_bytes(path):
    """Bytes the files under `path` take on disk (sparse files count what they hold)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except OSError:
                pass
    return total


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


class SetupError(Exception):
    """The run could not be set up: exit 2."""


class CheckFailed(Exception):
    """A check of the acceptance failed: exit 1."""


# ------------------------------------------------------------------------------------------
# Daemons
# ------------------------------------------------------------------------------------------

class Daemon:
    """One `blkmirror primary` or `mirror`: started, asked for status, stopped or killed by its
    own Popen only. `last` keeps the last status of its current process, so counters of a
    process that is killed are known up to its last sample."""

    def __init__(self, run, label, args, log_path, control, nbd_sock=None):
        self.run, self.label, self.args = run, label, args
        self.log_path, self.control, self.nbd_sock = log_path, control, nbd_sock
        self.p = None
        self.last = None
        self.starts = 0
        self.expected_up = False  # a process that exits meanwhile fails the check

    def running(self):
        return self.p is not None and self.p.poll() is None

    def start(self, setup=False):
        """Start and wait until its control socket answers (and its NBD socket, for a primary).
        A daemon that exits or never answers: SetupError during setup, CheckFailed later."""
        assert not self.running(), f"{self.label} is already running"
        err = SetupError if setup else CheckFailed
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} start {self.starts + 1} of {self.label} =====\n")
        logf = open(self.log_path, "a")
        env = dict(os.environ, BLKMIRROR_LOG=self.run.a.log_level)
        # A session of its own: Ctrl-C reaches this script only, which stops the daemons in order.
        self.p = subprocess.Popen([self.run.a.bin, *self.args], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=logf, env=env, start_new_session=True)
        logf.close()
        self.starts += 1
        self.last = None
        deadline = time.time() + 60
        while True:
            if self.p.poll() is not None:
                raise err(f"{self.label} exited during startup ({self.p.returncode}); its log:\n"
                          f"{tail(self.log_path, 20)}")
            if self.status() is not None and (self.nbd_sock is None or self.nbd_ready()):
                return
            if time.time() > deadline:
                raise err(f"{self.label} never became ready in 60 s; its log:\n{tail(self.log_path, 20)}")
            time.sleep(0.05)

    def nbd_ready(self):
        """The NBD socket answers a greeting; the probe leaves with NBD_OPT_ABORT, as the tests'
        probe does (a bare close would be logged as a client error)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(self.nbd_sock)
                greeting = recv_exact(s, 18)
                if greeting[:16] != b"NBDMAGICIHAVEOPT":
                    return False
                s.sendall((3).to_bytes(4, "big") + b"IHAVEOPT" + (2).to_bytes(4, "big") + bytes(4))
                try:
                    recv_exact(s, 20)
                except OSError:
                    pass
            return True
        except OSError:
            return False

    def status(self):
        """volumes[0] of the daemon's status document; None if it does not answer. Asked on the
        control socket directly: one line `status`, one JSON line back, the request and answer
        of `blkmirror status --json` (src/control.rs), without a process per sample, so the
        kills can be timed to a few tens of milliseconds of a resync."""
        if not self.running():
            return None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(self.control)
                s.sendall(b"status\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
            v = json.loads(buf)["volumes"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return None
        self.last = v
        return v

    def kill9(self):
        """kill -9 this process and reap it (at once: `last` is the wait's last sample)."""
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()
        log(f"{self.label}: kill -9 (pid {self.p.pid})")

    def stop(self, timeout=120):
        """SIGTERM; its exit status (None if it had to be killed after `timeout` s)."""
        if not self.running():
            return self.p.returncode if self.p else 0
        self.status()
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.label} (pid {self.p.pid}) ignored SIGTERM for {timeout} s: killed")
            self.p.kill()
            self.p.wait()
            return None

    def stop_ok(self, why):
        rc = self.stop()
        if rc != 0:
            raise CheckFailed(f"{self.label} exited with {rc} on SIGTERM ({why}); its log:\n"
                              f"{tail(self.log_path, 30)}")


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.a = args
        self.tmp = None
        self.daemons = []
        self.clients = []  # workload processes still running, stopped at cleanup
        self.report = {}
        self.rounds = []
        self.samples = {"kinds": set(), "planned_max": 0}
        self.after_outage = False  # from the mirror's return on, samples are kept and checked
        self.peak_disk = 0

    # ---- helpers ---------------------------------------------------------------------------

    def cleanup(self, keep_logs=False):
        for w in self.clients:
            if w.poll() is None:
                w.kill()
                w.wait()
        self.clients.clear()
        for d in reversed(self.daemons):
            if d.running():
                d.stop(timeout=30)
        if not self.tmp:
            return
        if keep_logs and not self.a.keep:
            dest = os.path.join(os.path.dirname(self.tmp),
                                f"blkmirror-acceptance-overflow-logs-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(dest, exist_ok=True)
            for name in os.listdir(self.tmp):
                if name.endswith((".log", ".out", ".jsonl", ".json")):
                    shutil.copy(os.path.join(self.tmp, name), dest)
            log(f"logs of this run kept in {dest}")
        if self.a.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def note_disk(self):
        self.peak_disk = max(self.peak_disk, allocated_bytes(self.tmp))
        free = shutil.disk_usage(self.tmp).free
        if free < self.a.min_free_gib * GIB:
            raise SetupError(f"only {free / GIB:.1f} GiB left free on {self.tmp} "
                             f"(--min-free-gib {self.a.min_free_gib}): stopped before the disk fills")

    def observe(self, m, p):
        """What every sample of the pair's status is checked for and kept (after the outage,
        each sample's resync figures go to samples.jsonl too: copied with the logs on failure)."""
        if self.after_outage:
            c = (p or {}).get("initial_copy") or {}
            self.trace.write(json.dumps({
                "t": round(time.monotonic() - self.t0, 3),
                "p": p and [p["state"], p["link"], p["dirty_bytes"], c.get("done_bytes"), c.get("total_bytes"),
                            p["sent_bytes"], p["acked_set"]],
                "m": m and [m["state"], m["link"], m["staged_resync"], m["acked_set"], m["applied_set"],
                            m["consistent"]]}) + "\n")
        if p and p.get("initial_copy") and self.after_outage:
            c = p["initial_copy"]
            self.samples["kinds"].add(c.get("kind"))
            self.samples["planned_max"] = max(self.samples["planned_max"], c.get("total_bytes") or 0)

    def wait(self, what, cond, timeout=None):
        """Poll the running daemons every --poll seconds until cond(mirror volume, primary volume)
        (None for a daemon that is not running); a daemon that dies, or the timeout, fails the
        check with the last status and logs."""
        timeout = timeout or self.a.timeout
        deadline = time.time() + timeout
        last_disk = 0
        while True:
            for d in (self.mirror, self.primary):
                if d.p is not None and d.p.poll() is not None and d.expected_up:
                    raise CheckFailed(f"{d.label} exited ({d.p.returncode}) while waiting for {what}; its log:\n"
                                      f"{tail(d.log_path, 30)}")
            m = self.mirror.status() if self.mirror.running() else None
            p = self.primary.status() if self.primary.running() else None
            self.observe(m, p)
            if cond(m, p):
                return m, p
            if time.time() - last_disk > 5:
                self.note_disk()
                last_disk = time.time()
            if time.time() > deadline:
                raise CheckFailed(
                    f"timed out after {timeout:.0f} s waiting for {what}\n--- mirror status ---\n"
                    f"{json.dumps(m, indent=1)}\n--- primary status ---\n{json.dumps(p, indent=1)}\n"
                    f"--- mirror log ---\n{tail(self.mirror.log_path)}--- primary log ---\n"
                    f"{tail(self.primary.log_path)}")
            time.sleep(self.a.poll)

    @staticmethod
    def synced(m, p):
        return (m is not None and p is not None and p["link"] == "up" and p["state"] == "replicating"
                and m["state"] == "replicating" and p["lag_bytes"] == 0 and p["initial_copy"] is None
                and m["consistent"] is True and m["acked_set"] == p["acked_set"]
                and m["applied_set"] == m["acked_set"])

    def start(self, d):
        d.expected_up = True
        d.start()

    def kill9(self, d):
        d.expected_up = False
        d.kill9()

    def stop_ok(self, d, why):
        d.expected_up = False
        d.stop_ok(why)

    # ---- setup -----------------------------------------------------------------------------

    def plan(self):
        """The seqs of the plan: 1..pre before the outage, pre+1..total during it."""
        a = self.a
        self.blocks = a.volume_size // a.block_size
        pre = total = None
        pre_bytes = outage = 0
        for seq, _start, run in workload.iter_plan(a.seed, self.blocks, a.max_run, 1 << 62):
            n = run * a.block_size
            if pre is None:
                pre_bytes += n
                if pre_bytes >= a.pre_bytes:
                    pre = seq
            else:
                outage += n
                if outage >= a.outage_bytes:
                    total = seq
                    break
        self.pre, self.total = pre, total
        self.pre_bytes, self.outage_bytes = pre_bytes, outage

    def setup(self):
        a = self.a
        if not os.access(a.bin, os.X_OK):
            raise SetupError(f"no blkmirror binary at {a.bin} (make release, or set BLKMIRROR)")
        probe = subprocess.run([PYTHON, "-c", "import nbd"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise SetupError(f"{PYTHON} cannot import nbd (the libnbd bindings, package python3-libnbd; "
                             f"tools/setup.sh): {probe.stderr.strip()}")
        if a.volume_size % a.block_size or a.volume_size % MIB:
            raise SetupError("--volume-size must be a multiple of 1 MiB and of --block-size")
        self.plan()
        if self.pre_bytes + self.outage_bytes > a.volume_size:
            log(f"note: the plan writes {mib(self.pre_bytes + self.outage_bytes):.0f} MiB to a "
                f"{mib(a.volume_size):.0f} MiB volume (overwrites)")
        base = a.dir or tempfile.gettempdir()
        # What this run may put on disk at its peak: both images, and either the reference's
        # image or the mirror's staged resync (each at most what the plan writes, or the volume),
        # the journal and its spares, and a margin.
        written = min(a.volume_size, self.pre_bytes + self.outage_bytes)
        need = 3 * written + 2 * a.journal_size + 1 * GIB
        free = shutil.disk_usage(base).free
        if free - need < a.min_free_gib * GIB:
            raise SetupError(f"not enough free disk in {base}: this run needs about {need / GIB:.1f} GiB "
                             f"and leaves --min-free-gib {a.min_free_gib} GiB free; {free / GIB:.1f} GiB are "
                             f"free (use --dir elsewhere, or smaller --outage-bytes / --volume-size)")
        self.tmp = tempfile.mkdtemp(prefix="blkmirror-acc-overflow-", dir=base)
        t = self.tmp
        pki = os.path.join(t, "pki")
        for cmd in (["certs", "init", "--dir", pki], ["certs", "issue", "--dir", pki, "primary"],
                    ["certs", "issue", "--dir", pki, "mirror"]):
            r = subprocess.run([a.bin, *cmd], capture_output=True, text=True)
            if r.returncode != 0:
                raise SetupError(f"blkmirror {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        port = free_port()
        size = size_arg(a.volume_size)
        self.primary_img, self.mirror_img = f"{t}/primary.img", f"{t}/mirror.img"
        self.mirror_state, self.primary_state = f"{t}/mirror-state", f"{t}/primary-state"
        self.sock = f"{t}/nbd.sock"
        self.uri = f"nbd+unix:///{VOL}?socket={self.sock}"

        def tls(me, peer):
            return ["--ca", f"{pki}/ca.crt", "--cert", f"{pki}/{me}.crt", "--key", f"{pki}/{me}.key",
                    "--peer-name", peer]

        self.mirror = Daemon(self, "mirror",
                             ["mirror", "--listen", f"127.0.0.1:{port}", "--volume",
                              f"{VOL}={self.mirror_img},size={size}", "--state-dir", self.mirror_state,
                              *tls("mirror", "primary")],
                             f"{t}/mirror.log", f"{self.mirror_state}/control.sock")
        primary_args = ["primary", "--volume", f"{VOL}={self.primary_img},size={size}", "--nbd-unix", self.sock,
                        "--state-dir", self.primary_state, "--mirror", f"127.0.0.1:{port}",
                        *tls("primary", "mirror"), "--journal-size", size_arg(a.journal_size),
                        "--on-journal-full", "track"]
        if a.dirty_region:
            primary_args += ["--dirty-region", a.dirty_region]
        if a.compress:
            primary_args += ["--compress", a.compress]
        self.primary = Daemon(self, "primary", primary_args, f"{t}/primary.log",
                              f"{self.primary_state}/control.sock", self.sock)
        self.daemons = [self.mirror, self.primary]
        for d in self.daemons:
            d.expected_up = True
            d.start(setup=True)
        self.after_outage = False
        log(f"in {t}: volume {size} sparse, journal {size_arg(a.journal_size)} (track); mirror pid "
            f"{self.mirror.p.pid}, primary pid {self.primary.p.pid}")
        try:
            self.wait("the initial copy done: link up, primary replicating, mirror consistent",
                      lambda m, p: m and p and p["link"] == "up" and p["state"] == "replicating"
                      and p["initial_copy"] is None and m["consistent"] is True)
        except CheckFailed as e:
            raise SetupError(str(e))
        # The same through the command line a script would use: exit 0 once it replicates.
        r = subprocess.run([a.bin, "status", "--control", self.primary.control, "--json"], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0 or json.loads(r.stdout)["volumes"][0]["state"] != "replicating":
            raise SetupError(f"blkmirror status --json exited {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")

    # ---- the workload ----------------------------------------------------------------------

    def workload(self, uri, first, last, label):
        """tools/workload.py writes seqs first..last of the plan at `uri`; returns (seconds,
        longest time without a new FLUSH in its log). A writer that stalls longer than
        --hang-seconds fails the check ("nothing hangs")."""
        a = self.a
        wlog = os.path.join(self.tmp, f"workload-{label}.jsonl")
        out = os.path.join(self.tmp, f"workload-{label}.out")
        cmd = [PYTHON, os.path.join(TOOLS, "workload.py"), "--uri", uri, "--seed", str(a.seed),
               "--writes", str(last), "--start-seq", str(first), "--blocks", str(self.blocks),
               "--block-size", str(a.block_size), "--max-run", str(a.max_run), "--log", wlog]
        t0 = time.monotonic()
        with open(out, "w") as f:
            w = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.clients.append(w)
        last_size, last_move, max_gap = -1, t0, 0.0
        while w.poll() is None:
            now = time.monotonic()
            try:
                size = os.path.getsize(wlog)
            except OSError:
                size = 0
            if size != last_size:
                last_size, last_move = size, now
            gap = now - last_move
            max_gap = max(max_gap, gap)
            if gap > a.hang_seconds:
                w.kill()
                w.wait()
                raise CheckFailed(f"workload {label}: no FLUSH completed for {gap:.0f} s (--hang-seconds): the "
                                  f"writer hangs; its output:\n{tail(out, 10)}\n--- primary log ---\n"
                                  f"{tail(self.primary.log_path)}")
            time.sleep(0.05)
        secs = time.monotonic() - t0
        max_gap = max(max_gap, time.monotonic() - last_move)
        self.clients.remove(w)
        if w.returncode != 0:
            raise CheckFailed(f"workload {label} (seqs {first}..{last}) exited {w.returncode}:\n{tail(out, 10)}")
        return secs, max_gap

    def crashcheck(self, min_seq, label):
        """tools/crashcheck.py on the mirror's image; its prefix, or CheckFailed."""
        a = self.a
        cmd = [PYTHON, os.path.join(TOOLS, "crashcheck.py"), "--image", self.mirror_img, "--seed", str(a.seed),
               "--writes", str(self.total), "--blocks", str(self.blocks), "--block-size", str(a.block_size),
               "--max-run", str(a.max_run), "--min-seq", str(min_seq), "--json"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        try:
            res = json.loads(r.stdout)
        except ValueError:
            res = {"ok": False, "reason": f"crashcheck printed {r.stdout!r} {r.stderr!r}"}
        if r.returncode != 0 or not res.get("ok"):
            raise CheckFailed(f"{label}: the mirror's image is not a prefix state no older than seq {min_seq}: "
                              f"{res.get('reason')}\n--- mirror log ---\n{tail(self.mirror.log_path)}")
        log(f"{label}: crashcheck OK, prefix {res['prefix']} ({time.monotonic() - t0:.0f} s)")
        return res["prefix"]

    def recover(self, label):
        r = subprocess.run([self.a.bin, "recover", "--volume", f"{VOL}={self.mirror_img}", "--state-dir",
                            self.mirror_state, "--json"], capture_output=True, text=True)
        try:
            rep = json.loads(r.stdout)[0]
        except (ValueError, IndexError, KeyError):
            raise CheckFailed(f"{label}: recover exited {r.returncode} and printed {r.stdout!r} {r.stderr!r}")
        if r.returncode != 0 or rep.get("consistent") is not True:
            raise CheckFailed(f"{label}: recover exited {r.returncode}, report {rep}")
        return rep

    # ---- steps -----------------------------------------------------------------------------

    def before_outage(self):
        log(f"step 2: seqs 1..{self.pre} of plan seed {self.a.seed} ({mib(self.pre_bytes):.0f} MiB, writes of "
            f"1..{self.a.max_run} blocks of {self.a.block_size} over {self.blocks} blocks), then synced")
        secs, _ = self.workload(self.uri, 1, self.pre, "before")
        self.wait("synced after the first part", self.synced)
        log(f"  written in {secs:.1f} s and synced; the mirror stops (SIGTERM)")
        self.stop_ok(self.mirror, "the outage begins")

    def reference(self):
        """The same stretch of the plan to a standalone primary (no mirror): local speed."""
        t = self.tmp
        ref = Daemon(self, "reference primary",
                     ["primary", "--volume", f"{VOL}={t}/reference.img,size={size_arg(self.a.volume_size)}",
                      "--nbd-unix", f"{t}/reference.sock", "--state-dir", f"{t}/reference-state"],
                     f"{t}/reference.log", f"{t}/reference-state/control.sock", f"{t}/reference.sock")
        ref.expected_up = True
        self.daemons.append(ref)
        try:
            ref.start(setup=True)
            log(f"step 3a: the reference: seqs {self.pre + 1}..{self.total} ({mib(self.outage_bytes):.0f} MiB) "
                f"to a standalone primary (no mirror)")
            secs, gap = self.workload(f"nbd+unix:///{VOL}?socket={t}/reference.sock", self.pre + 1, self.total,
                                      "reference")
            self.note_disk()
            ref.stop_ok("end of the reference")
        finally:
            if ref.running():
                ref.stop(30)
            self.daemons.remove(ref)
            shutil.rmtree(os.path.join(t, "reference-state"), ignore_errors=True)
            if os.path.exists(os.path.join(t, "reference.img")):
                os.remove(os.path.join(t, "reference.img"))
        rate = mib(self.outage_bytes) / secs
        log(f"  reference: {secs:.1f} s, {rate:.0f} MiB/s, longest time between FLUSHes {gap:.2f} s")
        self.report["reference"] = {"seconds": round(secs, 2), "mib_s": round(rate, 1),
                                    "longest_pause_s": round(gap, 2), "target": "standalone blkmirror primary"}

    def outage(self):
        log(f"step 3b: the mirror away: seqs {self.pre + 1}..{self.total} ({mib(self.outage_bytes):.0f} MiB) "
            f"to the replicating primary (journal {size_arg(self.a.journal_size)})")
        secs, gap = self.workload(self.uri, self.pre + 1, self.total, "outage")
        rate = mib(self.outage_bytes) / secs
        p = self.primary.status()
        if p is None:
            raise CheckFailed("the primary does not answer status after the outage's writes")
        self.note_disk()
        ref = self.report["reference"]
        self.report["outage"] = {
            "writes": self.total - self.pre, "bytes": self.outage_bytes, "seconds": round(secs, 2),
            "mib_s": round(rate, 1), "vs_reference": round(rate / ref["mib_s"], 3),
            "longest_pause_s": round(gap, 2), "journal_tracking": p["journal_tracking"],
            "journal_folds": p["journal_folds"], "dirty_bytes": p["dirty_bytes"],
            "journal_bytes": p["journal_bytes"], "journal_error": p["journal_error"], "state": p["state"]}
        log(f"  outage: {secs:.1f} s, {rate:.0f} MiB/s = {rate / ref['mib_s']:.2f} x the reference; longest time "
            f"between FLUSHes {gap:.2f} s; journal_tracking {p['journal_tracking']}, journal_folds "
            f"{p['journal_folds']}, dirty_bytes {p['dirty_bytes']} ({mib(p['dirty_bytes']):.0f} MiB)")
        if p["journal_tracking"] is not True or (p["journal_folds"] or 0) < 1:
            raise CheckFailed(f"after {mib(self.outage_bytes):.0f} MiB with the mirror away the journal did not "
                              f"fold: {json.dumps(p)}")
        if not p["dirty_bytes"]:
            raise CheckFailed(f"the journal folded but dirty_bytes is 0: {json.dumps(p)}")
        if p["journal_error"]:
            raise CheckFailed(f"journal_error after the outage: {p['journal_error']}")
        self.dirty0 = p["dirty_bytes"]

    def resync_with_kills(self):
        a = self.a
        self.after_outage = True
        self.t0 = time.monotonic()
        self.trace = open(os.path.join(self.tmp, "samples.jsonl"), "w", buffering=1)
        kills = [("mirror", "primary")[k % 2] for k in range(2 * a.rounds)]
        log(f"step 4: the mirror comes back; {len(kills)} kill -9 rounds during the resync "
            f"({', '.join(kills) or 'none'})")
        # Counters of each process's lifetime during the resync: primary sent_bytes/wire_bytes
        # (from the value at the mirror's return), mirror received_bytes.
        sent = {"raw": 0, "wire": 0, "received": 0}
        base = dict(self.primary.status() or {})
        p_base = (base.get("sent_bytes", 0), base.get("wire_bytes", 0))

        def bank_primary():
            nonlocal p_base
            last = self.primary.last or {}
            sent["raw"] += last.get("sent_bytes", 0) - p_base[0]
            sent["wire"] += last.get("wire_bytes", 0) - p_base[1]
            p_base = (0, 0)

        def bank_mirror():
            sent["received"] += (self.mirror.last or {}).get("received_bytes", 0)

        up_since = [None]
        up_secs = [0.0]

        def both_up():
            up_since[0] = time.monotonic()

        def one_down():
            if up_since[0] is not None:
                up_secs[0] += time.monotonic() - up_since[0]
                up_since[0] = None

        t_back = time.monotonic()
        log_from = os.path.getsize(self.primary.log_path)
        self.start(self.mirror)
        both_up()
        kept = 0  # staged sets the mirror holds at its (re)start
        # Progress of the resync, for spreading the kills over it: the primary's dirty_bytes
        # only shrinks as acknowledgements come back, and a session sends its whole plan well
        # before they do (it may have sent everything, the closing set too, while dirty_bytes
        # still says 90 %). So progress is counted from what the current session has sent:
        # 1 - (its plan - data sent since it began) / the dirty bytes the outage left.
        sess = {"key": None, "base": 0, "plan": 0}

        def progress(p):
            c = p.get("initial_copy")
            key = (self.primary.starts, p["reconnects"])
            if p["link"] == "up" and c and key != sess["key"]:
                sess.update(key=key, base=p["sent_bytes"], plan=c["total_bytes"])
            if key != sess["key"]:
                return 0.0
            left = max(0, sess["plan"] - (p["sent_bytes"] - sess["base"]))
            return 1 - left / self.dirty0

        for k, who in enumerate(kills):
            fraction = k / (len(kills) + 1)
            kept_now = kept

            def ready(m, p, kept_now=kept_now, fraction=fraction, k=k):
                if m is None or p is None:
                    return False
                s = m.get("staged_resync")
                if s is None:
                    if p["dirty_bytes"] == 0 and p["initial_copy"] is None and p["lag_bytes"] == 0:
                        raise CheckFailed(f"kill round {k + 1}: the resync finished before the kill could land "
                                          f"(make --outage-bytes larger or --rounds smaller)")
                    return False
                staged = s["last_set"] + 1 - s["first_set"]
                return staged > kept_now and progress(p) >= fraction

            m, p = self.wait(f"kill {k + 1}: the mirror staging the resync, {fraction * 100:.0f} % of it sent",
                             ready)
            s = m["staged_resync"]
            rnd = {"round": k + 1, "killed": who, "at_s": round(time.monotonic() - t_back, 1),
                   "staged_sets_at_kill": s["last_set"] + 1 - s["first_set"],
                   "dirty_bytes_at_kill": p["dirty_bytes"],
                   # Sets durable at the mirror that the primary has not yet taken as acknowledged.
                   "acked_set_primary": p["acked_set"], "acked_set_mirror": m["acked_set"],
                   "resync_progress": round(progress(p), 3),
                   "primary_copy": p["initial_copy"]}
            if who == "mirror":
                self.kill9(self.mirror)
                one_down()
                bank_mirror()
                label = f"round {k + 1} (mirror killed)"
            else:
                self.kill9(self.primary)
                one_down()
                bank_primary()
                self.stop_ok(self.mirror, "after the primary's kill -9")
                bank_mirror()
                label = f"round {k + 1} (primary killed)"
            self.note_disk()
            rep = self.recover(label)
            rnd["recover"] = {x: rep.get(x) for x in ("replayed_sets", "applied_set", "applied_seq", "consistent",
                                                      "staged_sets")}
            rnd["prefix"] = self.crashcheck(self.pre, label)
            rnd["prefix_is"] = ("before the outage" if rnd["prefix"] == self.pre else
                                "every write" if rnd["prefix"] == self.total else "between")
            kept = rep.get("staged_sets") or 0
            log(f"  {label}: {rnd['resync_progress'] * 100:.0f} % of the resync sent (dirty_bytes "
                f"{mib(rnd['dirty_bytes_at_kill']):.0f} MiB), {rnd['staged_sets_at_kill']} "
                f"sets staged; recover: consistent, {kept} staged sets kept; prefix {rnd['prefix']} "
                f"({rnd['prefix_is']})")
            self.rounds.append(rnd)
            # Both run again for the next round (the mirror first: it is what the primary seeks).
            self.start(self.mirror)
            if not self.primary.running():
                self.start(self.primary)
            both_up()
        t_last = time.monotonic()
        log("step 5: waiting until synced (lag 0, dirty_bytes 0)")
        m, p = self.wait("synced after the resync, dirty_bytes 0",
                         lambda m, p: self.synced(m, p) and p["dirty_bytes"] == 0)
        t_end = time.monotonic()
        one_down()
        self.primary.status()
        self.mirror.status()
        bank_primary()
        bank_mirror()
        # What each session of the primary planned to send: the dirty bytes of its map when the
        # session's resync started (its log line; one per session, sessions end at every kill).
        with open(self.primary.log_path, errors="replace") as f:
            f.seek(log_from)
            plans = [int(x.split("dirty_bytes=")[1].split()[0]) for x in f
                     if "resync of the dirty regions starts" in x and "dirty_bytes=" in x]
        self.resync = {
            "wall_s": round(t_end - t_back, 1), "both_up_s": round(up_secs[0], 1),
            "last_leg_s": round(t_end - t_last, 1), "sent_bytes": sent["raw"], "wire_bytes": sent["wire"],
            "mirror_received_bytes": sent["received"],
            "sent_vs_dirty": round(sent["raw"] / self.dirty0, 3),
            "session_plans": plans, "planned_total": sum(plans),
            "planned_bytes_max": self.samples["planned_max"],
            "last_leg_mib_s": round(mib(plans[-1]) / (t_end - t_last), 1) if plans else None,
            "kinds": sorted(k for k in self.samples["kinds"] if k)}

    def finish(self):
        self.note_disk()
        self.stop_ok(self.primary, "the end")
        self.stop_ok(self.mirror, "the end")
        rep = self.recover("the end")
        log("step 5: images compared byte for byte")
        same, where = compare_files(self.primary_img, self.mirror_img)
        final_prefix = None
        if same:
            final_prefix = self.crashcheck(self.total, "the end")
        with open(self.primary.log_path, errors="replace") as f:
            copies = f.read().count("full copy starts")
        self.final = {"identical": same, "first_difference": where, "prefix": final_prefix,
                      "recover_replayed_sets": rep.get("replayed_sets"), "full_copies": copies}
        failures = []
        if not same:
            failures.append(f"the mirror differs from the primary from byte {where} on")
        if same and final_prefix != self.total:
            failures.append(f"the final mirror holds prefix {final_prefix}, not every write ({self.total})")
        if copies != 1:
            failures.append(f"the primary's log says 'full copy starts' {copies} times (1 expected: the initial "
                            f"copy): a resync became a full copy or a comparison")
        bad_kinds = [k for k in self.resync["kinds"] if k != "dirty"]
        if bad_kinds:
            failures.append(f"the primary reported resyncs of kind {bad_kinds} after the outage (only 'dirty' expected)")
        rs = self.resync
        if max(rs["session_plans"] + [rs["planned_bytes_max"]]) > self.dirty0:
            failures.append(f"a resync session planned {max(rs['session_plans'] + [rs['planned_bytes_max']])} "
                            f"bytes, more than the {self.dirty0} dirty bytes the outage left")
        if not rs["session_plans"]:
            failures.append("the primary's log names no resync of the dirty regions")
        elif rs["sent_bytes"] > rs["planned_total"]:
            failures.append(f"the resync sent {rs['sent_bytes']} data bytes, more than its sessions planned from "
                            f"the dirty map ({rs['planned_total']}): it moved more than the dirty regions")
        return failures


def compare_files(a, b, chunk=8 * MIB):
    """(True, None) if the two files hold the same bytes; else (False, first differing offset)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                n = min(len(x), len(y))
                i = next((i for i in range(n) if x[i] != y[i]), n)
                return False, off + i
            if not x:
                return True, None
            off += len(x)


def summary(run, failures, started):
    a = run.a
    o, ref, rs = run.report["outage"], run.report["reference"], run.resync
    rounds = [{k: r[k] for k in ("round", "killed", "at_s", "resync_progress", "dirty_bytes_at_kill",
                                 "acked_set_primary", "acked_set_mirror", "staged_sets_at_kill", "prefix",
                                 "prefix_is")} | {"staged_sets_kept": r["recover"]["staged_sets"]}
              for r in run.rounds]
    doc = {
        "result": "PASS" if not failures else "FAIL", "failures": failures,
        "volume_bytes": a.volume_size, "journal_bytes": a.journal_size, "seed": a.seed, "max_run": a.max_run,
        "block_size": a.block_size, "writes_before": run.pre, "bytes_before": run.pre_bytes,
        "outage": o, "reference": ref, "dirty_bytes": run.dirty0, "resync": rs, "kill_rounds": rounds,
        "final": run.final, "peak_disk_bytes": run.peak_disk, "runtime_s": round(time.monotonic() - started),
    }
    print()
    print("==== acceptance: issue 14 part 1/2, the overflow ladder ====")
    print(f"volume {size_arg(a.volume_size)}, journal {size_arg(a.journal_size)} (track), plan seed {a.seed}, "
          f"writes of 1..{a.max_run} x {a.block_size} B at queue depth 1, FLUSH every 50")
    print(f"before the outage : seqs 1..{run.pre}, {mib(run.pre_bytes):.0f} MiB, synced")
    print(f"mirror away       : {o['writes']} writes, {mib(o['bytes']):.0f} MiB in {o['seconds']:.1f} s = "
          f"{o['mib_s']:.0f} MiB/s; longest pause between FLUSHes {o['longest_pause_s']:.2f} s")
    print(f"local reference   : same writes to a standalone primary: {ref['seconds']:.1f} s = {ref['mib_s']:.0f} MiB/s"
          f" -> ratio {o['vs_reference']:.2f}")
    print(f"journal           : tracking {o['journal_tracking']}, folds {o['journal_folds']}, dirty_bytes "
          f"{o['dirty_bytes']} ({mib(o['dirty_bytes']):.0f} MiB = {o['dirty_bytes'] / a.volume_size * 100:.0f} % of "
          f"the volume)")
    print(f"resync            : {len(rs['session_plans'])} sessions (one per kill, and the last) planned "
          f"{', '.join(f'{mib(x):.0f}' for x in rs['session_plans'])} MiB of dirty regions (sum "
          f"{mib(rs['planned_total']):.0f} MiB); kind of every resync sampled: {rs['kinds']}")
    print(f"resync bytes      : {mib(rs['sent_bytes']):.0f} MiB of data sent (primary sent_bytes, raw) = "
          f"{rs['sent_vs_dirty']:.2f} x dirty_bytes and {rs['sent_bytes'] / max(rs['planned_total'], 1):.2f} x the sum "
          f"of the plans (what a killed session had in flight is sent again); {mib(rs['wire_bytes']):.1f} MiB "
          f"after lz4 (wire_bytes; the workload's blocks compress well); mirror received "
          f"{mib(rs['mirror_received_bytes']):.1f} MiB")
    print(f"resync time       : {rs['wall_s']:.1f} s from the mirror's return to synced (kills, recovers and "
          f"crashchecks included); both daemons up {rs['both_up_s']:.1f} s "
          f"(reconnects included); last leg (after the last kill, {mib(rs['session_plans'][-1] if rs['session_plans'] else 0):.0f}"
          f" MiB planned) {rs['last_leg_s']:.1f} s = {rs['last_leg_mib_s'] or 0:.0f} MiB/s (reconnect included)")
    for r in rounds:
        print(f"kill round {r['round']}      : kill -9 {r['killed']:7} at {r['resync_progress'] * 100:3.0f} % sent "
              f"(dirty_bytes {mib(r['dirty_bytes_at_kill']):.0f} MiB, {r['staged_sets_at_kill']} sets staged, acked "
              f"{r['acked_set_primary']} at the primary / {r['acked_set_mirror']} at the mirror)\n"
              f"                    -> recover consistent, {r['staged_sets_kept']} staged "
              f"kept, prefix {r['prefix']} ({r['prefix_is']})")
    f = run.final
    print(f"final             : images {'identical' if f['identical'] else 'DIFFER at ' + str(f['first_difference'])}"
          f", crashcheck prefix {f['prefix']} of {run.total}; full copies in the primary's log {f['full_copies']}")
    print(f"disk              : peak {run.peak_disk / GIB:.2f} GiB in the temporary directory; run "
          f"{doc['runtime_s']} s")
    for x in failures:
        print(f"FAILED: {x}")
    print(f"RESULT: {doc['result']}")
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--volume-size", type=parse_size, default="4G", help="each side's volume (sparse)")
    ap.add_argument("--journal-size", type=parse_size, default="128M", help="the primary's --journal-size")
    ap.add_argument("--outage-bytes", type=parse_size, default="2G",
                    help="written while the mirror is away (rounded up to a whole write of the plan)")
    ap.add_argument("--pre-bytes", type=parse_size, default="256M", help="written and synced before the outage")
    ap.add_argument("--max-run", type=int, default=64,
                    help="workload.py --max-run: writes of 1..N blocks (64: 4 KiB..256 KiB)")
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0x5EED0E14)
    ap.add_argument("--rounds", type=int, default=2, help="kill -9 rounds of each side during the resync")
    ap.add_argument("--dirty-region", help="the primary's --dirty-region (default: the daemon's, 64K)")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between status samples while waiting")
    ap.add_argument("--compress", choices=("auto", "on", "off"),
                    help="the primary's --compress (default: the daemon's, auto: lz4 at --link-rate 1G)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds any one wait may take")
    ap.add_argument("--hang-seconds", type=float, default=60,
                    help="a writer with no FLUSH done for this long hangs (a failed check)")
    ap.add_argument("--dir", help="where the temporary directory goes (default $TMPDIR or /tmp)")
    ap.add_argument("--min-free-gib", type=float, default=2, help="keep at least this much of the disk free")
    ap.add_argument("--bin", default=default_bin(), help="blkmirror binary (BLKMIRROR)")
    ap.add_argument("--log-level", default="info", help="BLKMIRROR_LOG of the daemons")
    ap.add_argument("--json-out", help="write the report there too")
    ap.add_argument("--samples-out", help="copy the resync's status samples (samples.jsonl) there")
    ap.add_argument("--no-history", action="store_true",
                    help="do not append to benches/history/acceptance-overflow.jsonl")
    ap.add_argument("--notes", help="the history line's notes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (images, logs)")
    a = ap.parse_args()
    if a.rounds < 0 or a.max_run < 1:
        ap.error("--rounds must be >= 0 and --max-run >= 1")
    try:
        workload.check_block_size(a.block_size)
    except ValueError as e:
        ap.error(str(e))

    import benchlib  # benches/benchlib.py: the history's commit, machine and line
    commit = benchlib.git_commit(ROOT)
    notes = [a.notes] if a.notes else []
    if os.path.realpath(a.bin) != os.path.realpath(built_here_bin()):
        notes.append(f"binary {a.bin} (not built by this checkout's make release)")
        commit = None
    started = time.monotonic()
    run = Run(a)
    # Ctrl-C and SIGTERM: clean up and exit 1. SIGINT explicitly: a shell that starts this in
    # the background leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    keep_logs = False
    try:
        run.setup()
        run.before_outage()
        run.reference()
        run.outage()
        run.resync_with_kills()
        failures = run.finish()
        if a.samples_out:
            run.trace.close()
            shutil.copy(os.path.join(run.tmp, "samples.jsonl"), a.samples_out)
        doc = summary(run, failures, started)
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(doc | {"rounds_detail": run.rounds}, f, indent=1)
                f.write("\n")
        if not a.no_history:
            benchlib.append_history("acceptance-overflow", doc, commit, benchlib.machine(run.tmp),
                                    "; ".join(notes) or None)
        keep_logs = bool(failures)
        return 0 if not failures else 1
    except KeyboardInterrupt:
        log("interrupted: stopping everything this run started")
        return 1
    except SetupError as e:
        log(f"setup failed: {e}")
        return 2
    except CheckFailed as e:
        log(f"CHECK FAILED: {e}")
        print("RESULT: FAIL")
        keep_logs = True
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run.cleanup(keep_logs)


if __name__ == "__main__":
    sys.exit(main())
