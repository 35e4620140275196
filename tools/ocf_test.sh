#!/usr/bin/env bash
# `make test` runs this: Debian's ocf-tester against the Pacemaker agent (tools/ocf/blkmirror)
# managing a real blkmirror daemon whose peer, a mirror, runs beside it. ocf-tester starts the
# instance (a primary that hands over to be unpromoted), promotes and demotes it twice (each
# a planned switchover with the peer), stops and restarts it, and checks every OCF exit code.
# Usage: tools/ocf_test.sh BLKMIRROR_BINARY
set -euo pipefail
BIN="$(realpath "${1:?usage: $0 BLKMIRROR_BINARY}")"
AGENT="$(realpath "$(dirname "$0")/ocf/blkmirror")"
T="$(mktemp -d /tmp/bm-ocf-XXXXXX)"
# ocf-tester checks the agent as user nobody: it must reach it.
chmod 755 "$T"
PEER_PID=""
cleanup() {
  [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null && wait "$PEER_PID" 2>/dev/null || true
  pkill -f -- "--state-dir $T/" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
PORT=$(( 20000 + RANDOM % 20000 ))
"$BIN" certs init --dir "$T/pki" >/dev/null 2>&1
"$BIN" certs issue --dir "$T/pki" primary >/dev/null 2>&1
"$BIN" certs issue --dir "$T/pki" mirror >/dev/null 2>&1
"$BIN" mirror --listen "127.0.0.1:$PORT" --volume "v=$T/m.img,size=16M" --state-dir "$T/ms/" \
  --nbd-unix "$T/m.sock" --ca "$T/pki/ca.crt" --cert "$T/pki/mirror.crt" \
  --key "$T/pki/mirror.key" --peer-name primary >"$T/peer.log" 2>&1 &
PEER_PID=$!
ARGS="primary --volume v=$T/p.img,size=16M --nbd-unix $T/p.sock --state-dir $T/ps/ \
--mirror 127.0.0.1:$PORT --ca $T/pki/ca.crt --cert $T/pki/primary.crt \
--key $T/pki/primary.key --peer-name mirror"
if ocf-tester -n blkmirror-test -o binary="$BIN" -o state_dir="$T/ps" -o daemon_args="$ARGS" \
    -o demote_timeout=30 "$AGENT"; then
  echo "ocf-tester: the agent passed"
else
  rc=$?
  echo "ocf-tester failed ($rc); the instance's log:" >&2
  tail -n 40 "$T/ps/ocf-blkmirror.log" >&2 || true
  echo "the peer's log:" >&2
  tail -n 20 "$T/peer.log" >&2 || true
  exit "$rc"
fi
