#!/usr/bin/python3
"""Self-test for tools/workload.py and tools/crashcheck.py, for the benchmark history that
benches/benchlib.py appends to (HistoryTests), and for tools/setup.sh (SetupTests).

Run: /usr/bin/python3 tools/test_tools.py   (exit status non-zero on failure)

Most tests build images directly in Python with workload.py's own plan and content
functions, then damage them in one precise way, so each FAIL case is known to be a FAIL for
the intended reason. The NbdTests class runs the real workload against qemu-nbd, to prove the
bytes that go over NBD are exactly the bytes the model (and so the checker) expects.
"""

import datetime
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import zlib

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import workload  # noqa: E402

BENCHES = os.path.join(os.path.dirname(TOOLS), "benches")
sys.path.insert(0, BENCHES)
import benchlib  # noqa: E402

PYTHON = "/usr/bin/python3"  # Debian's python, the one with libnbd bindings
WORKLOAD = os.path.join(TOOLS, "workload.py")
SETUP = os.path.join(TOOLS, "setup.sh")
CRASHCHECK = os.path.join(TOOLS, "crashcheck.py")

BS = 4096
BLOCKS = 512   # 2 MiB: small enough that overwrites are frequent
MAX_RUN = 8
SEED = 42
WRITES = 1000


def build_image(path, prefix, seed=SEED, blocks=BLOCKS, max_run=MAX_RUN, bs=BS, skip=()):
    """Write the state after writes 1..prefix (minus the seqs in `skip`) to a fresh file."""
    with open(path, "wb") as f:
        f.truncate(blocks * bs)
        for seq, start, run in workload.iter_plan(seed, blocks, max_run, prefix):
            if seq not in skip:
                f.seek(start * bs)
                f.write(workload.run_content(seed, start, run, seq, bs))


def put_block(path, block, data, bs=BS):
    with open(path, "r+b") as f:
        f.seek(block * bs)
        f.write(data)


def get_block(path, block, bs=BS):
    with open(path, "rb") as f:
        f.seek(block * bs)
        return f.read(bs)


def crashcheck(image, *extra, seed=SEED, writes=WRITES, max_run=MAX_RUN, json_out=False):
    """Run crashcheck.py; return (exit status, stdout, parsed JSON or None)."""
    cmd = [PYTHON, CRASHCHECK, "--image", image, "--seed", str(seed), "--writes", str(writes),
           "--max-run", str(max_run), *map(str, extra)]
    if json_out:
        cmd.append("--json")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr, (json.loads(p.stdout) if json_out else None)


class PlanAndContentTests(unittest.TestCase):
    def test_golden_plan_and_content(self):
        # Pins the plan and the on-disk format: images and logs from older runs must stay
        # checkable. If this fails on purpose, bump workload.VERSION.
        self.assertEqual(list(workload.iter_plan(1, 4096, 8, 6)),
                         [(1, 8, 5), (2, 57, 8), (3, 1719, 2), (4, 49, 7), (5, 17, 8), (6, 29, 2)])
        self.assertEqual(hashlib.sha256(workload.block_content(1, 2, 3, 4096)).hexdigest(),
                         "89f8d2aff5855c53f963f3ca1c5abe24575142fbd1f26ad8c2ed70b83b7edbcf")
        allbytes = b"".join(workload.run_content(5, s, r, q, 512)
                            for q, s, r in workload.iter_plan(5, 1000, 8, 500))
        self.assertEqual(hashlib.sha256(allbytes).hexdigest(),
                         "849b89b46a0e5253900ba14efc76dca96e1fe8b0eea6d4778882980b7456a324")

    def test_plan_is_prefix_stable_and_resumable(self):
        full = list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, 2000))
        self.assertEqual(list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, 700)), full[:700])
        self.assertEqual(list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, 2000, start_seq=701)),
                         full[700:])
        self.assertEqual([s for s, _, _ in full], list(range(1, 2001)))
        for _, start, run in full:
            self.assertTrue(0 <= start < BLOCKS and 1 <= run <= MAX_RUN
                            and start + run <= BLOCKS)
        # The plan must overwrite blocks, or ordering bugs in the mirror would go unseen.
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, 2000)
        self.assertLess(len(set(last)), 2000 // 2)

    def test_block_content_layout(self):
        blk = workload.block_content(7, 11, 13, BS)
        self.assertEqual(len(blk), BS)
        magic, version, seed, block, seq, crc = workload.HEADER_FMT.unpack_from(blk)
        self.assertEqual((magic, version, seed, block, seq), (b"BMWL", 1, 7, 11, 13))
        co = workload.CRC_OFFSET
        self.assertEqual(crc, zlib.crc32(blk[co + 4:], zlib.crc32(blk[:co])))
        self.assertNotEqual(blk, workload.block_content(7, 11, 14, BS))
        self.assertNotEqual(blk, workload.block_content(7, 12, 13, BS))
        self.assertNotEqual(blk, workload.block_content(8, 11, 13, BS))
        self.assertEqual(len(workload.run_content(7, 3, 5, 1, BS)), 5 * BS)
        self.assertEqual(workload.run_content(7, 3, 2, 1, BS),
                         workload.block_content(7, 3, 1, BS) + workload.block_content(7, 4, 1, BS))


class CrashcheckTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bm-crashcheck-")
        self.img = os.path.join(self.dir, "img")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def assertFails(self, *extra, contains=None, **kw):
        rc, out, _ = crashcheck(self.img, *extra, **kw)
        self.assertEqual(rc, 1, out)
        self.assertTrue(out.startswith("FAIL: "), out)
        if contains:
            self.assertIn(contains, out)
        return out

    def test_prefix_states_pass(self):
        for p in (1, 2, 37, 500, 999, 1000):
            with self.subTest(prefix=p):
                build_image(self.img, p)
                rc, out, _ = crashcheck(self.img)
                self.assertEqual(rc, 0, out)
                written = sum(1 for s in workload.last_writers(SEED, BLOCKS, MAX_RUN, p) if s)
                self.assertEqual(out.strip(), f"OK prefix={p} blocks_checked={BLOCKS} "
                                              f"written_blocks={written}")

    def test_json_output(self):
        build_image(self.img, 300)
        rc, _, doc = crashcheck(self.img, json_out=True)
        self.assertEqual(rc, 0)
        self.assertEqual((doc["ok"], doc["prefix"], doc["reason"]), (True, 300, None))
        rc, _, doc = crashcheck(self.img, "--min-seq", 301, json_out=True)
        self.assertEqual(rc, 1)
        self.assertEqual((doc["ok"], doc["prefix"]), (False, 300))
        self.assertIn("min-seq", doc["reason"])

    def test_all_zero_image_is_prefix_zero(self):
        build_image(self.img, 0)
        rc, out, _ = crashcheck(self.img)
        self.assertEqual((rc, out.strip()),
                         (0, f"OK prefix=0 blocks_checked={BLOCKS} written_blocks=0"))
        self.assertFails("--min-seq", 1, contains="min-seq")

    def test_min_seq(self):
        build_image(self.img, 600)
        self.assertEqual(crashcheck(self.img, "--min-seq", 600)[0], 0)
        self.assertFails("--min-seq", 601, contains="prefix 600 < --min-seq 601")

    def test_missing_middle_write_fails(self):
        # A write in the middle that is still visible at prefix P (not overwritten later),
        # lost while later writes to other blocks arrived: a hole, not a prefix.
        p = 800
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, p)
        visible = set(last)
        m = next(s for s in range(p // 2, p) if s in visible)
        build_image(self.img, p, skip={m})
        out = self.assertFails(contains="not a prefix state")
        self.assertIn(f"earliest missing write is seq {m}", out)
        _, _, doc = crashcheck(self.img, json_out=True)
        self.assertEqual(doc["first_missing_seq"], m)
        self.assertEqual(doc["prefix"], p)

    def test_stale_block_fails(self):
        # A block holds an older write although a later write to it (<= P) exists: the later
        # write was lost or the two were applied out of order.
        p = 900
        plan = list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, p))
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, p)
        writers = {}
        for seq, start, run in plan:
            for b in range(start, start + run):
                writers.setdefault(b, []).append(seq)
        block = next(b for b, ws in writers.items() if len(ws) >= 2)
        older, newest = writers[block][-2], writers[block][-1]
        self.assertEqual(last[block], newest)
        build_image(self.img, p)
        put_block(self.img, block, workload.block_content(SEED, block, older, BS))
        out = self.assertFails(contains="stale")
        self.assertIn(f"block {block}: stale: holds seq {older}", out)
        self.assertIn(f"expected seq {newest}, found {older}", out)

    def test_torn_last_write_fails(self):
        # The last write of the prefix covers several blocks but only some of them landed:
        # writes are all-or-nothing in the I1 model (the mirror applies sets atomically).
        plan = list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, WRITES))
        p, start, run = next(w for w in reversed(plan) if w[2] >= 2)
        build_image(self.img, p)
        before = os.path.join(self.dir, "before")
        build_image(before, p - 1)
        put_block(self.img, start + run - 1, get_block(before, start + run - 1))
        self.assertFails(contains="not a prefix state")

    def test_reverting_last_write_gives_previous_prefix(self):
        # Undoing exactly the last write's blocks is a valid, shorter crash state.
        p = 700
        plan = list(workload.iter_plan(SEED, BLOCKS, MAX_RUN, p))
        _, start, run = plan[-1]
        build_image(self.img, p)
        before = os.path.join(self.dir, "before")
        build_image(before, p - 1)
        for b in range(start, start + run):
            put_block(self.img, b, get_block(before, b))
        rc, out, _ = crashcheck(self.img)
        self.assertEqual(rc, 0, out)
        self.assertIn(f"OK prefix={p - 1} ", out)

    def test_flipped_filler_byte_is_corruption(self):
        build_image(self.img, 400)
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, 400)
        block = next(b for b, s in enumerate(last) if s)
        data = bytearray(get_block(self.img, block))
        data[BS - 100] ^= 0x01
        put_block(self.img, block, bytes(data))
        out = self.assertFails(contains="corrupt")
        self.assertIn(f"block {block}: crc mismatch", out)

    def test_flipped_header_seq_is_corruption(self):
        build_image(self.img, 400)
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, 400)
        block = next(b for b, s in enumerate(last) if s)
        data = bytearray(get_block(self.img, block))
        data[24] ^= 0x02  # low byte of the seq field
        put_block(self.img, block, bytes(data))
        self.assertFails(contains=f"block {block}: crc mismatch")

    def test_misdirected_write_is_corruption(self):
        build_image(self.img, 400)
        last = workload.last_writers(SEED, BLOCKS, MAX_RUN, 400)
        src = next(b for b, s in enumerate(last) if s)
        dst = next(b for b, s in enumerate(last) if not s)
        put_block(self.img, dst, get_block(self.img, src))
        self.assertFails(contains=f"block {dst}: holds the content of block {src}")

    def test_foreign_data_is_corruption(self):
        build_image(self.img, 10)
        put_block(self.img, BLOCKS - 1, b"\xff" * BS)
        self.assertFails(contains=f"block {BLOCKS - 1}: not zero and no BMWL header")

    def test_wrong_seed_fails(self):
        build_image(self.img, 50)
        self.assertFails(seed=SEED + 1, contains=f"written with seed {SEED}")

    def test_seq_beyond_writes_fails(self):
        build_image(self.img, 500)
        self.assertFails(writes=400, contains="outside the plan 1..400")

    def test_nonzero_partial_tail_is_corruption(self):
        build_image(self.img, 20)
        with open(self.img, "ab") as f:
            f.write(b"\x01" * 100)
        self.assertFails(contains="partial tail block")

    def test_io_and_usage_errors_exit_2(self):
        rc, out, _ = crashcheck(os.path.join(self.dir, "missing"))
        self.assertEqual(rc, 2, out)
        build_image(self.img, 5)
        self.assertEqual(crashcheck(self.img, "--blocks", BLOCKS + 1)[0], 2)
        self.assertEqual(crashcheck(self.img, "--block-size", 1000)[0], 2)
        self.assertEqual(crashcheck(self.img, "--min-seq", WRITES + 1)[0], 2)
        rc, _, doc = crashcheck(os.path.join(self.dir, "missing"), json_out=True)
        self.assertEqual((rc, doc["ok"]), (2, False))

    def test_blocks_smaller_than_image(self):
        # The plan spans --blocks; the rest of the image must stay untouched (zero).
        build_image(self.img, 300, blocks=256)
        with open(self.img, "r+b") as f:
            f.truncate(BLOCKS * BS)
        self.assertEqual(crashcheck(self.img, "--blocks", 256)[0], 0)
        self.assertFails(contains="not a prefix state")  # plan over 512 blocks differs


class NbdTests(unittest.TestCase):
    """The real workload, over a real NBD connection, to qemu-nbd."""

    def setUp(self):
        if not shutil.which("qemu-nbd"):
            self.fail("qemu-nbd not found (Debian package qemu-utils)")
        self.dir = tempfile.mkdtemp(prefix="bm-workload-")
        self.servers = []

    def tearDown(self):
        for p in self.servers:
            self.stop(p)
        shutil.rmtree(self.dir)

    def serve(self, name, size=16 << 20, *extra):
        """Start qemu-nbd on a fresh zero file; return (file, uri, process)."""
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        sock = os.path.join(self.dir, name + ".sock")
        proc = subprocess.Popen(["qemu-nbd", "-f", "raw", f"--socket={sock}", "-x", "vol",
                                 path, "--persistent", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.servers.append(proc)
        deadline = time.monotonic() + 10
        while True:  # ready when the socket accepts connections
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.fail(f"qemu-nbd did not start: {proc.stderr.read()!r}")
                time.sleep(0.02)
        return path, f"nbd+unix:///vol?socket={sock}", proc

    def stop(self, proc):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()

    def workload(self, uri, *extra):
        cmd = [PYTHON, WORKLOAD, "--uri", uri, "--seed", str(SEED), *map(str, extra)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    def test_2000_writes_then_check(self):
        path, uri, proc = self.serve("vol")
        log = os.path.join(self.dir, "log")
        t0 = time.monotonic()
        p = self.workload(uri, "--writes", 2000, "--log", log, "--progress")
        t_work = time.monotonic() - t0
        self.assertEqual(p.returncode, 0, p.stderr)
        self.stop(proc)

        t0 = time.monotonic()
        rc, out, _ = crashcheck(path, "--min-seq", 2000, writes=2000)
        t_check = time.monotonic() - t0
        self.assertEqual(rc, 0, out)
        self.assertTrue(out.startswith("OK prefix=2000 blocks_checked=4096 "), out)
        sys.stderr.write(f"\n  [timing] workload 2000 writes over qemu-nbd: {t_work:.2f} s "
                         f"({2000 / t_work:.0f} writes/s, incl. interpreter start); "
                         f"crashcheck 16 MiB: {t_check:.2f} s\n  ")

        # Byte-identical to the model: what went over NBD is what the checker assumes.
        model = os.path.join(self.dir, "model")
        build_image(model, 2000, blocks=4096)
        with open(path, "rb") as a, open(model, "rb") as b:
            self.assertTrue(a.read() == b.read(), "NBD-written image differs from the model")

        # A flush every 50 writes, each logged after it returned.
        with open(log) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual(len(lines), 40)
        self.assertEqual(lines[-1], {"seq": 2000, "flushed_upto": 2000})
        self.assertEqual([x["flushed_upto"] for x in lines], list(range(50, 2001, 50)))

    def test_in_pieces_with_start_seq(self):
        path, uri, _ = self.serve("vol", 4 << 20)
        p = self.workload(uri, "--writes", 700, "--flush-every", 0)
        self.assertEqual(p.returncode, 0, p.stderr)
        # The server is still running: qemu-nbd's writes are already in the file.
        rc, out, _ = crashcheck(path, "--min-seq", 700, writes=1500)
        self.assertEqual(rc, 0, out)
        self.assertIn("OK prefix=700 ", out)
        p = self.workload(uri, "--writes", 1500, "--start-seq", 701)
        self.assertEqual(p.returncode, 0, p.stderr)
        rc, out, _ = crashcheck(path, "--min-seq", 1500, writes=1500)
        self.assertEqual(rc, 0, out)
        self.assertIn("OK prefix=1500 ", out)

    def test_blocks_and_block_size_options(self):
        path, uri, _ = self.serve("vol", 4 << 20)
        p = self.workload(uri, "--writes", 300, "--blocks", 1000, "--block-size", 1024,
                          "--max-run", 3)
        self.assertEqual(p.returncode, 0, p.stderr)
        rc, out, _ = crashcheck(path, "--blocks", 1000, "--block-size", 1024, writes=300,
                                max_run=3)
        self.assertEqual(rc, 0, out)
        self.assertIn("OK prefix=300 blocks_checked=4096 ", out)  # the tail is checked as zero

    def test_errors_are_reported(self):
        p = self.workload(f"nbd+unix:///vol?socket={self.dir}/nothing", "--writes", 1)
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot connect", p.stderr)

        _, uri, _ = self.serve("ro", 1 << 20, "--read-only")
        p = self.workload(uri, "--writes", 1)
        self.assertEqual(p.returncode, 1)
        self.assertIn("read-only", p.stderr)

        _, uri, _ = self.serve("small", 1 << 20)
        p = self.workload(uri, "--writes", 1, "--blocks", 1000)
        self.assertEqual(p.returncode, 2)
        self.assertIn("exceeds the volume size", p.stderr)


class HistoryTests(unittest.TestCase):
    """benches/history/: what a run appends, without running a benchmark; and the lines kept."""

    REQUIRED = ("bench", "date", "commit", "machine", "figures")
    COMMIT = r"^[0-9a-f]{7,40}(-dirty)?$"

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bm-history-")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def lines(self, path):
        with open(path) as f:
            return [json.loads(line) for line in f]

    def test_two_runs_append_two_lines(self):
        hist = os.path.join(self.dir, "history")
        commit = benchlib.git_commit() or "0123abc"  # None outside a git checkout
        self.assertRegex(commit, self.COMMIT)
        machine = benchlib.machine(self.dir)
        reports = [
            {"workloads": {"seq_write_1m_qd16": {"blkmirror": 961.3, "qemu_nbd": 1034.7, "ratio": 0.929,
                                                 "unit": "MiB/s"}},
             "rss_kib": {"primary": 128000, "mirror": 131072}, "rounds": 5, "mirror_identical": True,
             "logs": "/tmp/bm-repl-x"},
            {"workloads": {"seq_write_1m_qd16": {"blkmirror": 1054.0, "qemu_nbd": 1058.1, "ratio": 0.996,
                                                 "unit": "MiB/s"}},
             "rss_kib": {"primary": 132096, "mirror": 137216}, "rounds": 3, "mirror_identical": True,
             "logs": "/tmp/bm-repl-y"},
        ]
        paths = {benchlib.append_history("repl", r, commit, machine, history_dir=hist,
                                         notes="a test" if i else None) for i, r in enumerate(reports)}
        self.assertEqual(paths, {os.path.join(hist, "repl.jsonl")})
        got = self.lines(os.path.join(hist, "repl.jsonl"))
        self.assertEqual(len(got), 2)
        for line, report in zip(got, reports):
            for key in self.REQUIRED:
                self.assertIn(key, line)
            self.assertEqual(line["bench"], "repl")
            self.assertEqual(line["commit"], commit)
            self.assertIsNotNone(datetime.datetime.fromisoformat(line["date"]).tzinfo)
            self.assertEqual(line["machine"]["cpus"], os.cpu_count())
            self.assertGreater(line["machine"]["mem_gib"], 0)
            self.assertTrue(line["machine"]["kernel"])
            self.assertIn("disk", line["machine"])
            # The report's own keys, less what is not a measurement.
            self.assertEqual(line["figures"], {k: v for k, v in report.items() if k != "logs"})
        self.assertNotIn("notes", got[0])
        self.assertEqual(got[1]["notes"], "a test")

    def test_earlier_lines_are_never_rewritten(self):
        path = os.path.join(self.dir, "wan.jsonl")
        first = '{"bench": "wan", "date": "2026-11-27T06:10+00:00", "commit": null, "figures": {"x": 1}}\n'
        with open(path, "w") as f:
            f.write(first)
        benchlib.append_history("wan", {"incompressible_mbit": 473.1}, "abc1234", {"cpus": 2}, history_dir=self.dir)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.startswith(first))
        self.assertEqual(len(text.splitlines()), 2)

    def test_record_command_for_nbd_sh(self):
        report = os.path.join(self.dir, "nbd.json")
        with open(report, "w") as f:
            json.dump({"workloads": {"rand_read_4k_qd32": {"blkmirror": 46898.0, "ratio": 1.106}},
                       "rounds": 3, "backing": "4G raw file"}, f)
        env = dict(os.environ, BENCH_HISTORY=self.dir)
        for _ in range(2):
            p = subprocess.run([PYTHON, os.path.join(BENCHES, "benchlib.py"), "record", "nbd", report, "0123abc",
                                self.dir], capture_output=True, text=True, env=env, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
        got = self.lines(os.path.join(self.dir, "nbd.jsonl"))
        self.assertEqual(len(got), 2)
        for line in got:
            self.assertEqual((line["bench"], line["commit"]), ("nbd", "0123abc"))
            self.assertEqual(line["figures"], {"workloads": {"rand_read_4k_qd32": {"blkmirror": 46898.0,
                                                                                  "ratio": 1.106}}, "rounds": 3})
            self.assertEqual(set(line["machine"]), {"cpus", "mem_gib", "kernel", "disk"})
        p = subprocess.run([PYTHON, os.path.join(BENCHES, "benchlib.py"), "commit"], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.strip(), benchlib.git_commit() or "")

    def test_commit_is_dirty_for_tracked_changes_but_not_for_the_history(self):
        repo = os.path.join(self.dir, "repo")
        os.makedirs(os.path.join(repo, "benches/history"))
        git = lambda *a: subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t.invalid",
                                         *a], capture_output=True, text=True, check=True).stdout.strip()
        git("init", "-q")
        for name in ("code.rs", "benches/history/repl.jsonl"):
            with open(os.path.join(repo, name), "w") as f:
                f.write("1\n")
        git("add", "-A")
        git("commit", "-q", "-m", "one")
        head = git("rev-parse", "--short", "HEAD")
        self.assertEqual(benchlib.git_commit(repo), head)
        with open(os.path.join(repo, "benches/history/repl.jsonl"), "a") as f:
            f.write("2\n")
        with open(os.path.join(repo, "untracked.txt"), "w") as f:
            f.write("x\n")
        self.assertEqual(benchlib.git_commit(repo), head)
        with open(os.path.join(repo, "code.rs"), "a") as f:
            f.write("2\n")
        self.assertEqual(benchlib.git_commit(repo), head + "-dirty")
        self.assertIsNone(benchlib.git_commit(self.dir))


    def test_kept_history_lines_parse_in_date_order(self):
        hist = os.path.join(os.path.dirname(TOOLS), "benches/history")
        files = sorted(f for f in os.listdir(hist) if f.endswith(".jsonl"))
        self.assertEqual(
            files, ["acceptance-overflow.jsonl", "nbd.jsonl", "repl.jsonl", "wan.jsonl"]
        )
        for name in files:
            last_day, last_time = None, None
            for i, line in enumerate(self.lines(os.path.join(hist, name)), 1):
                where = f"{name}:{i}"
                for key in self.REQUIRED:
                    self.assertIn(key, line, where)
                self.assertEqual(line["bench"], name[:-len(".jsonl")], where)
                if line["commit"] is not None:
                    self.assertRegex(line["commit"], self.COMMIT, where)
                self.assertTrue(line["figures"], where)
                self.assertIn("cpus", line["machine"], where)
                # Days never go back; within a day, lines with a time never go back either (a
                # line from the old log with a date alone keeps its place in the log's order).
                if len(line["date"]) == 10:
                    day, when = datetime.date.fromisoformat(line["date"]), None
                else:
                    when = datetime.datetime.fromisoformat(line["date"])
                    self.assertIsNotNone(when.tzinfo, where)
                    day = when.date()
                if last_day is not None:
                    self.assertGreaterEqual(day, last_day, where)
                if day != last_day:
                    last_time = None
                if when is not None:
                    if last_time is not None:
                        self.assertGreaterEqual(when, last_time, where)
                    last_time = when
                last_day = day

class SetupTests(unittest.TestCase):
    """tools/setup.sh, the first step of `make demo` and .ci/run: with a command missing it must
    stop at once and print the one command that installs its package. Nothing is uninstalled:
    the script runs with a PATH of links to every command but nbdcopy."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bm-setup-")
        os.chmod(self.dir, 0o755)  # the non-root case runs as nobody
        self.bin = os.path.join(self.dir, "bin")
        os.mkdir(self.bin)
        for d in os.environ.get("PATH", "").split(":") + ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]:
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                link = os.path.join(self.bin, name)
                if name != "nbdcopy" and not os.path.lexists(link):
                    os.symlink(os.path.join(d, name), link)

    def tearDown(self):
        shutil.rmtree(self.dir)

    def setup_sh(self, *args, user=None):
        cmd = ["/bin/bash", SETUP, *args]
        if user is not None:
            # A copy the user can read wherever the checkout is (/root is not readable to all).
            copy = os.path.join(self.dir, "setup.sh")
            shutil.copy(SETUP, copy)
            cmd = ["/usr/bin/setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                   "/bin/bash", copy, *args]
        started = time.time()
        p = subprocess.run(cmd, env=dict(os.environ, PATH=self.bin), capture_output=True,
                           text=True, timeout=60)
        return p, time.time() - started

    def assert_names_install_command(self, p, elapsed, sudo):
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("missing: nbdcopy (libnbd-bin)", p.stderr)
        self.assertIn(f"{sudo}apt-get install -y libnbd-bin", p.stderr)
        self.assertNotIn("installing", p.stdout + p.stderr)
        self.assertLess(elapsed, 10, "the check should fail at once")

    def test_check_without_nbdcopy_prints_the_install_command(self):
        p, elapsed = self.setup_sh("--check")
        self.assert_names_install_command(p, elapsed, "" if os.geteuid() == 0 else "sudo ")

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run as another user")
    def test_non_root_without_nbdcopy_prints_the_install_command(self):
        p, elapsed = self.setup_sh(user=65534)
        self.assert_names_install_command(p, elapsed, "sudo ")

    def test_passes_with_every_command_present(self):
        os.symlink(shutil.which("nbdcopy"), os.path.join(self.bin, "nbdcopy"))
        p, _ = self.setup_sh("--check")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout + p.stderr, "")

    def test_rejects_unknown_arguments(self):
        p, _ = self.setup_sh("--install-everything")
        self.assertEqual(p.returncode, 2)
        self.assertIn("usage", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
