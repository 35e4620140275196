#!/usr/bin/python3
"""Deterministic crash-consistency workload for blkmirror (promise I1, docs/DESIGN.md).

Writes a plan of N numbered writes through a real NBD client (libnbd). Every block a write
touches gets content that encodes (seed, block, seq), so a checker (tools/crashcheck.py) can
look at any image later, without a log, and tell which write each block came from and whether
the whole image is "the state after writes 1..P" for some P.

Why the pieces look the way they do:

* The plan is a pure function of (seed, blocks, max_run): write k only depends on the PRNG
  draws of writes 1..k. So the plan for --writes 1000 is a prefix of the plan for 2000, a run
  can be continued with --start-seq, and the checker regenerates it from the same arguments.
* Writes are issued one at a time (queue depth 1) and each run is a single NBD command, so the
  order in which writes complete, which is the order blkmirror's journal records, is the seq
  order. That is what makes "a prefix of the plan" the right model for I1.
* Block content is cheap to produce (one SHA-512 + a repeated 64-byte pattern + one CRC32), so
  the checker can regenerate expected bytes for every block and compare with == on bytes.

Importable API (used by crashcheck.py and test_tools.py):
    iter_plan(seed, blocks, max_run, writes, start_seq=1) -> (seq, start, run) ...
    block_content(seed, block, seq, block_size) -> bytes
    run_content(seed, start, run, seq, block_size) -> bytes
    last_writers(seed, blocks, max_run, prefix) -> list[int]   (seq per block, 0 = never)
"""

import argparse
import hashlib
import json
import random
import struct
import sys
import time
import zlib

MAGIC = b"BMWL"
VERSION = 1
HEADER_SIZE = 64
# magic, version u32, seed u64, block u64, seq u64, crc32; little-endian, zero-padded to 64.
HEADER_FMT = struct.Struct("<4sIQQQI")
CRC_OFFSET = 32  # the crc32 field sits right after the four fields before it
_PAD = bytes(HEADER_SIZE - HEADER_FMT.size)

# Fraction of writes aimed at a small "hot" region at the start of the volume. Without it a
# uniform plan on a large volume almost never overwrites a block, and overwrites are exactly
# what exercises the risky parts of replication (write folding inside a delta set, ordering of
# set application). Part of the plan definition: changing it changes every plan.
HOT_PROBABILITY = 0.5
HOT_DIVISOR = 64  # hot region = 1/64 of the volume (but at least max_run blocks)

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_MAX_RUN = 8
DEFAULT_FLUSH_EVERY = 50

MAX_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

def hot_blocks(blocks, max_run):
    """Size of the hot region for a volume of `blocks` blocks."""
    return min(blocks, max(max_run, blocks // HOT_DIVISOR))


def iter_plan(seed, blocks, max_run, writes, start_seq=1):
    """Yield (seq, start_block, run_len) for seq = start_seq..writes.

    Writes before start_seq are still drawn (and discarded) so the PRNG stream, hence the
    plan, is identical whichever piece of it a caller asks for.
    """
    if blocks < 1 or max_run < 1:
        raise ValueError("blocks and max_run must be >= 1")
    rng = random.Random(seed)
    hot = hot_blocks(blocks, max_run)
    for seq in range(1, writes + 1):
        # Always draw the same number of values per write so every write's draws are
        # independent of which branch an earlier write took.
        in_hot = rng.random() < HOT_PROBABILITY
        start = rng.randrange(hot if in_hot else blocks)
        run = min(rng.randint(1, max_run), blocks - start)  # clip at the end of the volume
        if seq >= start_seq:
            yield seq, start, run


def last_writers(seed, blocks, max_run, prefix):
    """For the state after writes 1..prefix: the seq found in each block (0 = never written)."""
    last = [0] * blocks
    for seq, start, run in iter_plan(seed, blocks, max_run, prefix):
        last[start:start + run] = [seq] * run
    return last


# --------------------------------------------------------------------------------------------
# Block content
# --------------------------------------------------------------------------------------------

def filler_pattern(seed, block, seq):
    """64 bytes that differ for every (seed, block, seq); repeated to fill the block."""
    return hashlib.sha512(struct.pack("<QQQ", seed, block, seq)).digest()


def block_content(seed, block, seq, block_size=DEFAULT_BLOCK_SIZE):
    """The exact bytes write `seq` puts in `block`.

    The crc32 covers every byte of the block except the crc field itself (header fields,
    padding and filler), so a torn or bit-flipped block is detected even where the filler
    comparison alone would not say why.
    """
    body_len = block_size - HEADER_SIZE
    pattern = filler_pattern(seed, block, seq)
    filler = (pattern * (body_len // 64 + 1))[:body_len]
    head = struct.pack("<4sIQQQ", MAGIC, VERSION, seed, block, seq)
    crc = zlib.crc32(head)
    crc = zlib.crc32(_PAD, crc)
    crc = zlib.crc32(filler, crc)
    return head + struct.pack("<I", crc) + _PAD + filler


def run_content(seed, start, run, seq, block_size=DEFAULT_BLOCK_SIZE):
    """Bytes of one write: `run` consecutive blocks starting at `start`, all stamped `seq`."""
    return b"".join(block_content(seed, b, seq, block_size) for b in range(start, start + run))


def check_block_size(block_size):
    """Raise ValueError unless block_size is usable (sector multiple, room for the header)."""
    if block_size < 512 or block_size % 512:
        raise ValueError(f"block size must be a positive multiple of 512, got {block_size}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _u64(text):
    value = int(text, 0)
    if not 0 <= value <= MAX_U64:
        raise argparse.ArgumentTypeError(f"{text} is not in 0..2^64-1")
    return value


def _positive(text):
    value = int(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _non_negative(text):
    value = int(text, 0)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Deterministic NBD write workload whose block contents encode "
                    "(block, seq); check the result with tools/crashcheck.py.")
    p.add_argument("--uri", required=True,
                   help="NBD URI, e.g. nbd+unix:///vol?socket=/tmp/s or nbd://host:10809/vol")
    p.add_argument("--seed", type=_u64, required=True, help="PRNG seed (0..2^64-1)")
    p.add_argument("--writes", type=_non_negative, required=True,
                   help="length of the plan: the last seq written")
    p.add_argument("--block-size", type=_positive, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--blocks", type=_positive, default=None,
                   help="blocks the plan spans (default: volume size / block size)")
    p.add_argument("--max-run", type=_positive, default=DEFAULT_MAX_RUN,
                   help="longest write, in blocks")
    p.add_argument("--flush-every", type=_non_negative, default=DEFAULT_FLUSH_EVERY,
                   help="send FLUSH after every seq that is a multiple of this "
                        "(0: only at the end)")
    p.add_argument("--start-seq", type=_positive, default=1,
                   help="first seq to write, to continue a plan run in pieces")
    p.add_argument("--log", metavar="FILE",
                   help='append JSON lines {"seq": k, "flushed_upto": f} after each flush')
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    args = p.parse_args(argv)
    try:
        check_block_size(args.block_size)
    except ValueError as e:
        p.error(str(e))
    return args


class Log:
    """JSON-lines log. Lines are flushed to the OS immediately so a kill -9 of this process
    loses none: a harness reads the last flushed_upto as the --min-seq for crashcheck."""

    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def record(self, seq, flushed_upto):
        if self.f:
            self.f.write(json.dumps({"seq": seq, "flushed_upto": flushed_upto}) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


def run(args):
    import nbd  # imported here so the content/plan functions work without libnbd

    h = nbd.NBD()
    try:
        h.connect_uri(args.uri)
    except nbd.Error as e:
        print(f"workload: cannot connect to {args.uri}: {e}", file=sys.stderr)
        return 1

    size = h.get_size()
    bs = args.block_size
    blocks = args.blocks if args.blocks is not None else size // bs
    if blocks < 1:
        print(f"workload: volume of {size} bytes holds no {bs}-byte block", file=sys.stderr)
        return 2
    if blocks * bs > size:
        print(f"workload: --blocks {blocks} x {bs} exceeds the volume size {size}",
              file=sys.stderr)
        return 2
    if h.is_read_only():
        print("workload: the export is read-only", file=sys.stderr)
        return 1
    # Without FLUSH the workload cannot tell the checker what must survive (--min-seq).
    if not h.can_flush():
        print("workload: the server does not support FLUSH", file=sys.stderr)
        return 1

    log = Log(args.log)
    t0 = time.monotonic()
    next_report = t0 + 1.0
    seq = args.start_seq - 1
    flushed_upto = None  # unknown until our first flush
    done = 0
    try:
        for seq, start, run_len in iter_plan(args.seed, blocks, args.max_run, args.writes,
                                             args.start_seq):
            data = run_content(args.seed, start, run_len, seq, bs)
            try:
                h.pwrite(data, start * bs)
            except nbd.Error as e:
                print(f"workload: NBD write failed at seq {seq} (blocks {start}.."
                      f"{start + run_len - 1}, offset {start * bs}, {len(data)} bytes): {e}",
                      file=sys.stderr)
                return 1
            done += 1
            if args.flush_every and seq % args.flush_every == 0:
                try:
                    h.flush()
                except nbd.Error as e:
                    print(f"workload: NBD flush failed after seq {seq}: {e}", file=sys.stderr)
                    return 1
                flushed_upto = seq
                log.record(seq, flushed_upto)
            if args.progress:
                now = time.monotonic()
                if now >= next_report:
                    rate = done / (now - t0)
                    print(f"workload: seq {seq}/{args.writes}, {rate:.0f} writes/s",
                          file=sys.stderr)
                    next_report = now + 1.0
        # Final flush: when the workload exits normally everything it wrote is durable, so a
        # checker may demand --min-seq = --writes.
        if flushed_upto != seq:
            try:
                h.flush()
            except nbd.Error as e:
                print(f"workload: NBD flush failed after seq {seq}: {e}", file=sys.stderr)
                return 1
            flushed_upto = seq
            log.record(seq, flushed_upto)
        try:
            h.shutdown()
        except nbd.Error as e:
            print(f"workload: NBD disconnect failed: {e}", file=sys.stderr)
            return 1
    finally:
        log.close()

    if args.progress:
        elapsed = time.monotonic() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        print(f"workload: done, {done} writes (seq {args.start_seq}..{args.writes}) "
              f"in {elapsed:.2f} s, {rate:.0f} writes/s", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
