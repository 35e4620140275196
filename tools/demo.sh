#!/usr/bin/env bash
# The built-in default: a primary and a mirror on this machine. Installs (as root) or names the
# Debian packages it needs (tools/setup.sh), builds blkmirror, generates a CA and both
# certificates, starts `blkmirror mirror` and `blkmirror primary --mirror`, writes to the
# primary's volume with real NBD clients (nbdcopy, qemu-io, fio), shows live status with lag,
# then checks that the mirror is byte-identical to the primary.
set -euo pipefail
cd "$(dirname "$0")/.."
# First what the clients below come from, before building or starting anything.
bash tools/setup.sh
if [ -z "${BLKMIRROR:-}" ]; then
  CARGO=${CARGO:-cargo}
  command -v "$CARGO" >/dev/null || { echo "demo: $CARGO not found: install a Rust toolchain first" >&2; exit 1; }
  "$CARGO" build --release
fi
BIN=${BLKMIRROR:-${CARGO_TARGET_DIR:-target}/release/blkmirror}
DIR=${DEMO_DIR:-target/demo}
SIZE=${DEMO_SIZE:-256M}
PORT=${DEMO_PORT:-17788}
rm -rf "$DIR" && mkdir -p "$DIR"
SOCK=$DIR/nbd.sock
URI="nbd+unix:///vol1?socket=$SOCK"
PCTL=$DIR/primary/control.sock
MCTL=$DIR/mirror/control.sock
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "certificates: one CA, one certificate per site"
"$BIN" certs init --dir "$DIR/pki"
"$BIN" certs issue --dir "$DIR/pki" primary
"$BIN" certs issue --dir "$DIR/pki" mirror
ls "$DIR/pki"

step "mirror: listens on 127.0.0.1:$PORT (QUIC, mutual TLS), volume vol1 ($SIZE, sparse)"
"$BIN" mirror --listen "127.0.0.1:$PORT" --volume "vol1=$DIR/mirror-vol1.img,size=$SIZE" \
  --state-dir "$DIR/mirror" --ca "$DIR/pki/ca.crt" --cert "$DIR/pki/mirror.crt" \
  --key "$DIR/pki/mirror.key" --peer-name primary 2>"$DIR/mirror.log" &
pids+=($!)
step "primary: serves vol1 over NBD on $SOCK and replicates it"
"$BIN" primary --volume "vol1=$DIR/primary-vol1.img,size=$SIZE" --nbd-unix "$SOCK" \
  --state-dir "$DIR/primary" --mirror "127.0.0.1:$PORT" --ca "$DIR/pki/ca.crt" \
  --cert "$DIR/pki/primary.crt" --key "$DIR/pki/primary.key" --peer-name mirror 2>"$DIR/primary.log" &
pids+=($!)
for _ in $(seq 200); do [ -S "$SOCK" ] && [ -S "$PCTL" ] && [ -S "$MCTL" ] && break; sleep 0.05; done

# Polls: status exits 6 (and says so on stderr) until the mirror is consistent and the link up.
status_json() { "$BIN" status --control "$1" --json 2>/dev/null; }
vol() { /usr/bin/python3 -c "import json,sys; v=json.load(sys.stdin)['volumes'][0]; print(v['$2'])" <<<"$(status_json "$1")"; }
wait_for() { # wait_for DESCRIPTION COMMAND...
  local what=$1; shift
  for _ in $(seq 600); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for: $what" >&2; return 1
}
wait_for "the mirror to be consistent (initial copy)" bash -c "[ \"\$($(printf %q "$BIN") status --control $MCTL --json 2>/dev/null | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[\"volumes\"][0][\"consistent\"])')\" = True ]"
# Exit 6 means "not replicating yet": the primary may still be closing its initial copy.
"$BIN" status --control "$PCTL" || [ $? -eq 6 ]

step "writes through real NBD clients while the mirror follows"
head -c 64M /dev/urandom >"$DIR/random.bin"
nbdcopy "$DIR/random.bin" "$URI" &
w1=$!
qemu-io -f raw -c 'write -P 0xa5 1 4095' -c 'write -P 0x5a 70000000 3M' -c flush "$URI" >/dev/null
fio --name=demo --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 \
  --size=64M --offset=128M --time_based --runtime=4 --output-format=terse >/dev/null &
w2=$!
while kill -0 $w2 2>/dev/null; do
  printf '  primary: link=%s lag=%.3fs lag_bytes=%s sent=%s wire=%s acked_set=%s\n' \
    "$(vol "$PCTL" link)" "$(vol "$PCTL" lag_seconds)" "$(vol "$PCTL" lag_bytes)" \
    "$(vol "$PCTL" sent_bytes)" "$(vol "$PCTL" wire_bytes)" "$(vol "$PCTL" acked_set)"
  sleep 1
done
wait $w1 $w2

step "quiesce: wait until the mirror has made every write durable (lag 0)"
wait_for "lag 0" bash -c "[ \"\$($(printf %q "$BIN") status --control $PCTL --json 2>/dev/null | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[\"volumes\"][0][\"lag_bytes\"])')\" = 0 ]"
"$BIN" status --control "$PCTL"
"$BIN" status --control "$MCTL"

step "stop both, replay the mirror's redo log, compare the volumes"
cleanup; pids=()
"$BIN" recover --volume "vol1=$DIR/mirror-vol1.img" --state-dir "$DIR/mirror"
sha256sum "$DIR/primary-vol1.img" "$DIR/mirror-vol1.img"
cmp "$DIR/primary-vol1.img" "$DIR/mirror-vol1.img"
echo "the mirror is byte-identical to the primary"
echo; echo "demo ok (logs: $DIR/primary.log $DIR/mirror.log)"
