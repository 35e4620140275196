#!/usr/bin/env bash
# The built-in default: serve a sparse volume with `blkmirror primary`, write to it with real NBD
# clients (qemu-io, nbdcopy), read it back and show what the volume holds.
# Replication (issue 3) extends this to a primary and a mirror on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BLKMIRROR:-target/release/blkmirror}
DIR=${DEMO_DIR:-target/demo}
rm -rf "$DIR" && mkdir -p "$DIR"
SOCK=$DIR/nbd.sock
URI="nbd+unix:///vol1?socket=$SOCK"

"$BIN" primary --volume "vol1=$DIR/vol1.img,size=256M" --nbd-unix "$SOCK" \
  --state-dir "$DIR/state" 2>"$DIR/primary.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done

step() { printf '\n== %s\n' "$*"; }
step "blkmirror primary serves vol1 (256 MiB, sparse) on $SOCK"
nbdinfo "$URI" | sed -n '1,6p;/block_size/p;/can_/p'

step "qemu-io writes patterns at misaligned offsets"
qemu-io -f raw -c 'write -P 0xa5 1 4095' -c 'write -P 0x5a 10000 1M' -c 'flush' "$URI" | grep -v '^[0-9.]* [KM]iB'

step "nbdcopy copies a 64 MiB random image onto the volume (overwriting those patterns)"
head -c 64M /dev/urandom >"$DIR/random.bin"
truncate -s 256M "$DIR/random.bin"
nbdcopy "$DIR/random.bin" "$URI"

step "read the whole volume back with nbdcopy: checksums equal"
nbdcopy "$URI" "$DIR/readback.bin"
sha256sum "$DIR/random.bin" "$DIR/readback.bin"
cmp "$DIR/random.bin" "$DIR/readback.bin" && echo "identical"

step "allocation map (base:allocation): the rest of the volume is still a hole"
nbdinfo --map "$URI"
step "backing file: apparent size vs blocks used"
du -h --apparent-size "$DIR/vol1.img"; du -h "$DIR/vol1.img"
step "server log"
kill $PID; wait $PID 2>/dev/null || true; trap - EXIT
cat "$DIR/primary.log"
echo; echo "demo ok"
