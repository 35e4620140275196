#!/usr/bin/python3
"""Prove (or refute) that a volume image is a crash-consistent state of a workload.py run.

Promise I1 (docs/DESIGN.md): the mirror always holds a state the primary could have held
after a power cut, i.e. the result of writes 1..P of the workload, for some P, with nothing
missing and nothing extra. Since workload.py issues writes one at a time, seq order is
completion order, and every block's content names the write that produced it, so:

  1. Decode every block: all zeros = never written (seq 0); otherwise it must be exactly the
     bytes block_content(seed, block, seq) for the seq its header names. Anything else is
     corruption (torn block, bit flip, misdirected write, foreign data).
  2. P = the highest seq found. The last write of a prefix is never overwritten inside that
     prefix, so if the image is any prefix state at all, it is the state after P.
  3. Regenerate the plan (no log needed) and require every block to hold the last write to it
     with seq <= P (0 if none). One mismatch means the image is no prefix state: a write was
     lost, applied out of order, or applied partially.
  4. With --min-seq M, also require P >= M: writes acknowledged before a FLUSH must survive.

The image is assumed to have been all zeros before the workload started.

Exit status: 0 OK, 1 FAIL, 2 usage or I/O error.
"""

import argparse
import json
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (shared plan and block-content definitions)

# How many offending blocks to describe in detail; the rest are only counted.
MAX_DETAILS = 10
# Read size; large reads keep the scan I/O-bound rather than syscall-bound.
CHUNK_BYTES = 8 << 20


class Finding:
    """One offending block."""

    def __init__(self, block, reason, expected=None, found=None):
        self.block, self.reason, self.expected, self.found = block, reason, expected, found

    def text(self):
        s = f"block {self.block}: {self.reason}"
        if self.expected is not None:
            s += f" (expected seq {self.expected}, found {self.found})"
        return s

    def as_dict(self):
        return {"block": self.block, "reason": self.reason,
                "expected_seq": self.expected, "found_seq": self.found}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Check that an image is the state after a prefix of a workload.py plan.")
    p.add_argument("--image", required=True, help="raw image file (or block device)")
    p.add_argument("--seed", type=workload._u64, required=True)
    p.add_argument("--writes", type=workload._non_negative, required=True,
                   help="length of the plan the workload was run with")
    p.add_argument("--block-size", type=workload._positive, default=workload.DEFAULT_BLOCK_SIZE)
    p.add_argument("--blocks", type=workload._positive, default=None,
                   help="blocks the plan spans (default: image size / block size)")
    p.add_argument("--max-run", type=workload._positive, default=workload.DEFAULT_MAX_RUN)
    p.add_argument("--min-seq", type=workload._non_negative, default=0,
                   help="require prefix >= this (last seq acknowledged before a flush)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        workload.check_block_size(args.block_size)
    except ValueError as e:
        p.error(str(e))
    if args.min_seq > args.writes:
        p.error(f"--min-seq {args.min_seq} exceeds --writes {args.writes}")
    return args


def diagnose(blk, index, seed, writes, bs):
    """Why `blk` (known not to be a valid block) is invalid, as text. Error path only."""
    if blk[:4] != workload.MAGIC:
        return "not zero and no BMWL header (foreign data or torn block)"
    magic, version, hseed, hblock, hseq, hcrc = workload.HEADER_FMT.unpack_from(blk)
    if version != workload.VERSION:
        return f"header version {version}, expected {workload.VERSION}"
    co = workload.CRC_OFFSET
    crc = zlib.crc32(blk[co + 4:], zlib.crc32(blk[:co]))
    if crc != hcrc:
        return "crc mismatch (torn or corrupted block)"
    if hseed != seed:
        return f"written with seed {hseed}, not {seed}"
    if hblock != index:
        return f"holds the content of block {hblock} (misdirected write)"
    if hseq == 0 or hseq > writes:
        return f"header seq {hseq} is outside the plan 1..{writes}"
    expected = workload.block_content(seed, index, hseq, bs)
    first = next(i for i in range(bs) if blk[i] != expected[i])
    return f"seq {hseq}: byte {first} differs from what that write wrote, though the crc matches"


def scan(path, seed, writes, bs, plan_blocks):
    """Decode every block of the image.

    Returns (found, corrupt, n_corrupt, image_blocks): found[i] is the seq block i holds (0 if
    zero or corrupt), corrupt holds the first MAX_DETAILS Findings.
    """
    zero = bytes(bs)
    magic = workload.MAGIC
    content = workload.block_content
    hdr = workload.HEADER_FMT
    found = []
    corrupt = []
    n_corrupt = 0

    def bad(index, why):
        # `why` is a callable: diagnosing is slow, so only the reported blocks pay for it.
        nonlocal n_corrupt
        n_corrupt += 1
        if len(corrupt) < MAX_DETAILS:
            corrupt.append(Finding(index, why()))

    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if plan_blocks is not None and plan_blocks * bs > size:
            raise ValueError(f"image has {size} bytes, less than --blocks {plan_blocks} x {bs}")
        image_blocks = size // bs
        chunk_len = max(1, CHUNK_BYTES // bs) * bs
        index = 0
        while index < image_blocks:
            want = min(chunk_len, (image_blocks - index) * bs)
            chunk = f.read(want)
            if len(chunk) != want:
                raise OSError(f"short read at offset {index * bs}")
            for off in range(0, want, bs):
                blk = chunk[off:off + bs]
                if blk == zero:
                    found.append(0)
                elif blk[:4] == magic:
                    # Trust the header only as far as it names a candidate; the block is valid
                    # only if it equals, byte for byte, what that write would have written.
                    _, _, hseed, hblock, hseq, _ = hdr.unpack_from(blk)
                    if (hseed == seed and hblock == index and 0 < hseq <= writes
                            and blk == content(seed, index, hseq, bs)):
                        found.append(hseq)
                    else:
                        found.append(0)
                        bad(index, lambda: diagnose(blk, index, seed, writes, bs))
                else:
                    found.append(0)
                    bad(index, lambda: "not zero and no BMWL header (foreign data or torn block)")
                index += 1
        # A partial block at the end is never written by the workload: it must stay zero.
        tail = f.read()
        if tail.count(0) != len(tail):
            bad(image_blocks, lambda: f"partial tail block ({len(tail)} bytes) is not zero")
    return found, corrupt, n_corrupt, image_blocks


def compare(found, seed, blocks, max_run, prefix):
    """Blocks that differ from the state after writes 1..prefix, as (n, first Findings, lowest
    expected seq among them)."""
    plan = list(workload.iter_plan(seed, blocks, max_run, prefix)) if prefix else []
    expected = [0] * len(found)  # blocks beyond the plan's span stay 0
    for seq, start, run in plan:
        expected[start:start + run] = [seq] * run
    if expected == found:
        return 0, [], None
    details = []
    n = 0
    lowest = None
    for b, (e, f) in enumerate(zip(expected, found)):
        if e == f:
            continue
        n += 1
        if e and (lowest is None or e < lowest):
            lowest = e
        if len(details) >= MAX_DETAILS:
            continue
        if f:
            _, start, run = plan[f - 1]
            wrote_here = start <= b < start + run
        if f == 0:
            why = f"missing: write {e} (<= prefix {prefix}) is not there"
        elif not wrote_here:
            why = f"holds seq {f}, a write that never touched this block"
        elif f < e:
            why = f"stale: holds seq {f}, but write {e} (<= prefix {prefix}) overwrote it"
        else:  # cannot happen: f <= prefix and wrote here implies f <= e
            why = "inconsistent"
        details.append(Finding(b, why, e, f))
    return n, details, lowest


def check(args):
    """Run the check; returns the result dict (never raises for a FAIL verdict)."""
    bs = args.block_size
    found, corrupt, n_corrupt, image_blocks = scan(args.image, args.seed, args.writes, bs,
                                                    args.blocks)
    blocks = args.blocks if args.blocks is not None else image_blocks
    prefix = max(found, default=0)
    written = len(found) - found.count(0)
    result = {"ok": False, "prefix": prefix, "reason": None, "blocks_checked": len(found),
              "written_blocks": written, "errors": []}

    if n_corrupt:
        result["reason"] = f"{n_corrupt} corrupt block(s): " + "; ".join(
            c.text() for c in corrupt[:3])
        result["errors"] = [c.as_dict() for c in corrupt]
        return result

    if prefix < args.min_seq:
        result["reason"] = (f"prefix {prefix} < --min-seq {args.min_seq}: writes acknowledged "
                            f"before a flush are missing")
        return result

    n_diff, details, lowest = compare(found, args.seed, blocks, args.max_run, prefix)
    if n_diff:
        result["reason"] = (f"not a prefix state: {n_diff} block(s) differ from the state after "
                            f"prefix {prefix} (highest seq found)"
                            + (f", earliest missing write is seq {lowest}" if lowest else "")
                            + ": " + "; ".join(d.text() for d in details[:3]))
        result["errors"] = [d.as_dict() for d in details]
        result["first_missing_seq"] = lowest
        return result

    result["ok"] = True
    return result


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = check(args)
    except (OSError, ValueError) as e:
        if args.json:
            print(json.dumps({"ok": False, "prefix": None, "reason": f"error: {e}"}))
        else:
            print(f"crashcheck: error: {e}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps(result))
    elif result["ok"]:
        print(f"OK prefix={result['prefix']} blocks_checked={result['blocks_checked']} "
              f"written_blocks={result['written_blocks']}")
    else:
        print(f"FAIL: {result['reason']}")
        for e in result["errors"]:
            line = f"  block {e['block']}: {e['reason']}"
            if e["expected_seq"] is not None:
                line += f" (expected seq {e['expected_seq']}, found {e['found_seq']})"
            print(line)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
