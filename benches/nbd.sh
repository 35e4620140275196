#!/usr/bin/env bash
# NBD throughput benchmark: blkmirror primary vs qemu-nbd, both driven by fio's nbd engine
# (libnbd over a unix socket), plus a raw io_uring O_DIRECT reference on the backing file.
#
#   benches/nbd.sh            (or: make bench-nbd)
#
# Environment:
#   BENCH_SECS=15      runtime of each fio run, seconds
#   BENCH_ROUNDS=3     rounds per server per workload (the median is reported)
#   BENCH_SIZE=4G      size of each backing file
#   BENCH_DIR=target/bench/tmp   where the backing files go (must support O_DIRECT: not tmpfs)
#   BENCH_RAMP=0       fio --ramp_time, seconds (not counted in the results)
#   BENCH_KEEP=0       1 keeps the backing files and per-run logs afterwards
#   BENCH_SKIP_BUILD=0 1 skips `cargo build --release`
#   BLKMIRROR_BIN=     benchmark this blkmirror binary instead (no build), e.g. one built from
#                      another revision (its history line then has no commit, and says which binary)
#   BENCH_WORKLOADS=   space-separated names of the workloads to run (default all: seq_write_1m_qd16
#                      rand_write_4k_qd32 rand_read_4k_qd32), for an A/B of one of them
#   BENCH_HISTORY=     directory for the history line instead of benches/history (trial runs)
#
# Runs alternate blkmirror / qemu-nbd (the order flips every round) so that drift of a shared,
# noisy machine hits both alike. Each run gets a fresh server process; its peak RSS (VmHWM) is
# read from /proc just before it is stopped. Results: a table on stdout, target/bench/nbd.json,
# and one line appended to benches/history/nbd.jsonl (commit, machine, figures).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=${BENCH_SECS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-4G}
RAMP=${BENCH_RAMP:-0}
KEEP=${BENCH_KEEP:-0}
DIR=${BENCH_DIR:-target/bench/tmp}
OUT_DIR=$ROOT/target/bench
OUT_JSON=$OUT_DIR/nbd.json
EXPORT=bench

die() {
    echo "nbd.sh: error: $*" >&2
    exit 1
}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in fio qemu-nbd python3 cargo fallocate; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (needs libnbd)"
[[ $SECS =~ ^[0-9]+$ && $SECS -gt 0 ]] || die "BENCH_SECS must be a positive integer"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -gt 0 ]] || die "BENCH_ROUNDS must be a positive integer"

mkdir -p "$DIR" "$OUT_DIR"
DIR=$(cd "$DIR" && pwd)
# Unix socket paths are limited to 108 bytes; keep sockets in a short private directory.
SOCK_DIR=$(mktemp -d /tmp/blkmirror-bench.XXXXXX)
RUN_DIR=$DIR/run.$$
mkdir -p "$RUN_DIR"

# --- the backing file system -------------------------------------------------------------
FSTYPE=$(findmnt -n -o FSTYPE -T "$DIR" 2>/dev/null || stat -f -c %T "$DIR")
case $FSTYPE in
    tmpfs | ramfs | overlay | overlayfs) die "$DIR is on $FSTYPE: O_DIRECT is not honoured there; set BENCH_DIR" ;;
esac
SIZE_BYTES=$(numfmt --from=iec "${SIZE%B}")
NEED=$((2 * SIZE_BYTES + (512 << 20)))
AVAIL=$(($(df -P -B1 "$DIR" | awk 'NR==2 {print $4}')))
((AVAIL > NEED)) || die "$DIR has $((AVAIL >> 20)) MiB free, need $((NEED >> 20)) MiB (2 x $SIZE + slack)"
DEV=$(df -P "$DIR" | awk 'NR==2 {print $1}')
BACKING="$SIZE preallocated+fully written raw file on $FSTYPE ($DEV), $DIR"

# --- cleanup: always stop what we started -------------------------------------------------
SERVER_PID=""
stop_server() {
    local pid=$SERVER_PID
    [[ -n $pid ]] || return 0
    SERVER_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "server $pid ignored SIGTERM for 5 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_server
    rm -rf "$SOCK_DIR"
    if [[ $KEEP != 1 ]]; then
        rm -f "$DIR/blkmirror.img" "$DIR/qemu-nbd.img"
        rm -rf "$RUN_DIR"
    else
        log "kept backing files and logs in $DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build ----------------------------------------------------------------------------------
# The commit this run measures, taken before the build (the tree may change during the run).
if [[ -n ${BLKMIRROR_BIN:-} ]]; then
    SRC_BIN=$BLKMIRROR_BIN
    BLKMIRROR_REV="binary $BLKMIRROR_BIN"
    COMMIT=""
    HISTORY_NOTES="blkmirror binary $BLKMIRROR_BIN (BLKMIRROR_BIN), not built from this tree"
else
    COMMIT=$(python3 "$ROOT/benches/benchlib.py" commit)
    HISTORY_NOTES=""
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "cargo build --release"
        cargo build --release --quiet || die "cargo build --release failed"
    fi
    SRC_BIN=$ROOT/target/release/blkmirror
    BLKMIRROR_REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
fi
[[ -x $SRC_BIN ]] || die "$SRC_BIN missing"
# Snapshot the binary: target/ is shared, and a concurrent rebuild must not swap it mid-run.
BLKMIRROR=$RUN_DIR/blkmirror
cp "$SRC_BIN" "$BLKMIRROR"

# --- workloads ------------------------------------------------------------------------------
# name | fio rw | bs | iodepth | unit
WORKLOADS=(
    "seq_write_1m_qd16 write 1M 16 MiB/s"
    "rand_write_4k_qd32 randwrite 4k 32 IOPS"
    "rand_read_4k_qd32 randread 4k 32 IOPS"
)
if [[ -n ${BENCH_WORKLOADS:-} ]]; then
    chosen=()
    for w in "${WORKLOADS[@]}"; do
        [[ " $BENCH_WORKLOADS " == *" ${w%% *} "* ]] && chosen+=("$w")
    done
    ((${#chosen[@]})) || die "BENCH_WORKLOADS names no workload: $BENCH_WORKLOADS"
    WORKLOADS=("${chosen[@]}")
fi

# fio_run OUT_JSON RW BS QD ARGS... : one time-based fio job; fails loudly on any fio error.
fio_run() {
    local out=$1 rw=$2 bs=$3 qd=$4
    shift 4
    if ! fio --name=bench --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --time_based --runtime="$SECS" --ramp_time="$RAMP" --norandommap --randrepeat=0 \
        --output-format=json --output="$out" "$@" >"$out.stdout" 2>&1; then
        cat "$out.stdout" >&2
        die "fio failed ($rw bs=$bs qd=$qd $*)"
    fi
    python3 - "$out" <<'EOF' || die "bad fio result in $out"
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])
job = j["jobs"][0]
if job["error"]:
    sys.exit(f"fio job error {job['error']}")
if job["read"]["io_bytes"] + job["write"]["io_bytes"] == 0:
    sys.exit("fio moved no data")
EOF
}

# --- backing files ---------------------------------------------------------------------------
# Same recipe for each server's file: fallocate, then one full sequential O_DIRECT pass of
# fio's (non-zero) buffers, so every block is allocated and written (random reads hit real
# data, not holes or unwritten extents that read as zeroes for free).
make_backing() {
    local f=$1
    rm -f "$f"
    fallocate -l "$SIZE" "$f" || die "fallocate $f"
    fio --name=fill --ioengine=io_uring --direct=1 --filename="$f" --rw=write --bs=1M \
        --iodepth=16 --size="$SIZE" --output-format=terse >/dev/null ||
        die "cannot fill $f"
    local blocks
    blocks=$(stat -c '%b*%B' "$f")
    (($blocks >= SIZE_BYTES)) || die "$f is not fully allocated"
}
IMG_BM=$DIR/blkmirror.img
IMG_QN=$DIR/qemu-nbd.img
log "preparing backing files ($SIZE each, $FSTYPE at $DIR)"
make_backing "$IMG_BM"
make_backing "$IMG_QN"
sync

# --- servers --------------------------------------------------------------------------------
# wait_accept SOCK PID LOG: until the socket accepts a connection and sends the NBD greeting.
wait_accept() {
    local sock=$1 pid=$2 logf=$3
    for _ in $(seq 200); do
        if ! alive "$pid"; then
            tail -n 30 "$logf" >&2 || true
            die "server (pid $pid) died while starting; log above ($logf)"
        fi
        if [[ -S $sock ]] && python3 - "$sock" <<'EOF' 2>/dev/null; then
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
got = b""
while len(got) < 8:
    chunk = s.recv(8 - len(got))
    if not chunk:
        sys.exit(1)
    got += chunk
sys.exit(0 if got == b"NBDMAGIC" else 1)
EOF
            return 0
        fi
        sleep 0.05
    done
    die "server (pid $pid) did not accept on $sock within 10 s"
}

# start_server KIND LOG: sets SERVER_PID and SOCK.
start_server() {
    local kind=$1 logf=$2
    SOCK=$SOCK_DIR/$kind.sock
    rm -f "$SOCK"
    case $kind in
        blkmirror)
            rm -rf "$SOCK_DIR/state"
            BLKMIRROR_LOG=${BLKMIRROR_LOG:-info} "$BLKMIRROR" primary \
                --volume "$EXPORT=$IMG_BM" --nbd-unix "$SOCK" --state-dir "$SOCK_DIR/state" \
                >"$logf" 2>&1 &
            ;;
        qemu_nbd)
            qemu-nbd --cache=none --aio=io_uring -f raw --socket="$SOCK" -x "$EXPORT" \
                --persistent --shared=8 "$IMG_QN" >"$logf" 2>&1 &
            ;;
        *) die "unknown server $kind" ;;
    esac
    SERVER_PID=$!
    wait_accept "$SOCK" "$SERVER_PID" "$logf"
}

# alive PID: running (a dead child stays a zombie until reaped, and kill -0 still succeeds on it).
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

peak_rss_kib() {
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}

# cpu_ticks PID: user+system clock ticks of the whole process (all threads, io-wq workers too).
cpu_ticks() {
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
CLK_TCK=$(getconf CLK_TCK)

RESULTS=$RUN_DIR/results.tsv
: >"$RESULTS"

# one_run KIND ROUND WORKLOAD...: start a server, run fio against it, record value and RSS.
one_run() {
    local kind=$1 round=$2 name=$3 rw=$4 bs=$5 qd=$6
    local logf=$RUN_DIR/$name.$kind.r$round.log out=$RUN_DIR/$name.$kind.r$round.json
    start_server "$kind" "$logf"
    local pid=$SERVER_PID cpu0
    cpu0=$(cpu_ticks "$pid")
    fio_run "$out" "$rw" "$bs" "$qd" --ioengine=nbd --uri="nbd+unix:///$EXPORT?socket=$SOCK"
    if ! alive "$pid"; then
        tail -n 30 "$logf" >&2 || true
        die "$kind (pid $pid) died during $name round $round; log above ($logf)"
    fi
    local rss cpu
    rss=$(peak_rss_kib "$pid")
    # Server CPU over the fio run, in % of one core (fio's own setup time is included).
    cpu=$(( ($(cpu_ticks "$pid") - cpu0) * 100 / CLK_TCK / (SECS + RAMP) ))
    stop_server
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$round" "$out" "$rss" "$cpu" >>"$RESULTS"
    log "  $name $kind round $round: $(summarize_one "$out") (server CPU ${cpu}%, peak RSS ${rss} KiB)"
}

# summarize_one JSON: a short human line (throughput and completion latency).
summarize_one() {
    python3 - "$1" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
d = job["write"] if job["write"]["io_bytes"] else job["read"]
pct = d["clat_ns"].get("percentile", {})
p50 = pct.get("50.000000", 0) / 1000
p99 = pct.get("99.000000", 0) / 1000
print(f"{d['iops']:.0f} IOPS, {d['bw'] / 1024:.1f} MiB/s, clat p50 {p50:.0f} us p99 {p99:.0f} us")
EOF
}

log "benchmark: ${ROUNDS} round(s) x ${SECS} s per server per workload (blkmirror $BLKMIRROR_REV, $(qemu-nbd --version | head -n1))"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order=(blkmirror qemu_nbd); else order=(qemu_nbd blkmirror); fi
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd _unit <<<"$w"
        for kind in "${order[@]}"; do
            one_run "$kind" "$r" "$name" "$rw" "$bs" "$qd"
        done
    done
done

# --- raw reference: fio io_uring O_DIRECT straight on the (idle) blkmirror backing file ------
log "raw io_uring reference (one run each)"
for w in "${WORKLOADS[@]}"; do
    read -r name rw bs qd _unit <<<"$w"
    out=$RUN_DIR/$name.raw.json
    fio_run "$out" "$rw" "$bs" "$qd" --ioengine=io_uring --direct=1 --filename="$IMG_BM"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" raw 1 "$out" 0 0 >>"$RESULTS"
    log "  $name raw: $(summarize_one "$out")"
done

# --- report ---------------------------------------------------------------------------------
python3 - "$RESULTS" "$OUT_JSON" "$ROUNDS" "$SECS" "$BACKING" "${WORKLOADS[@]}" <<'EOF'
import json, statistics, sys
results, out_json, rounds, secs, backing = sys.argv[1:6]
workloads = [w.split() for w in sys.argv[6:]]

def value(path, unit):
    text = open(path).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    d = job["write"] if job["write"]["io_bytes"] else job["read"]
    pct = d["clat_ns"].get("percentile", {})
    v = d["bw"] / 1024 if unit == "MiB/s" else d["iops"]
    return v, pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000

samples, lat, cpu, rss = {}, {}, {}, {"blkmirror": 0, "qemu_nbd": 0}
units = {w[0]: w[4] for w in workloads}
for line in open(results):
    name, kind, _round, path, peak, cpu_pct = line.rstrip("\n").split("\t")
    cpu.setdefault(name, {}).setdefault(kind, []).append(int(cpu_pct))
    v, p50, p99 = value(path, units[name])
    samples.setdefault(name, {}).setdefault(kind, []).append(v)
    lat.setdefault(name, {}).setdefault(kind, []).append((p50, p99))
    if kind in rss:
        rss[kind] = max(rss[kind], int(peak))

doc = {"workloads": {}, "rss_kib": rss, "rounds": int(rounds), "runtime_s": int(secs),
       "backing": backing}
rows = []
for name, _rw, _bs, _qd, unit in workloads:
    s = samples[name]
    bm, qn = statistics.median(s["blkmirror"]), statistics.median(s["qemu_nbd"])
    raw = s["raw"][0]
    ratio = bm / qn if qn else float("nan")
    med_lat = {k: tuple(statistics.median(x[i] for x in lat[name][k]) for i in (0, 1))
               for k in lat[name]}
    doc["workloads"][name] = {
        "blkmirror": round(bm, 1), "qemu_nbd": round(qn, 1), "ratio": round(ratio, 3),
        "unit": unit, "raw_io_uring": round(raw, 1),
        "samples": {k: [round(x, 1) for x in s[k]] for k in ("blkmirror", "qemu_nbd")},
        "clat_us_p50_p99": {k: [round(x) for x in med_lat[k]] for k in med_lat},
        "server_cpu_pct": {k: statistics.median(cpu[name][k]) for k in ("blkmirror", "qemu_nbd")},
    }
    rows.append((name, unit, bm, qn, ratio, raw, med_lat))

with open(out_json, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

print()
print(f"NBD benchmark: median of {rounds} round(s) x {secs} s, fio nbd engine over a unix socket")
print(f"backing: {backing}")
print()
hdr = f"{'workload':<20} | {'unit':<5} | {'blkmirror':>10} | {'qemu-nbd':>10} | {'ratio':>6} | {'fio io_uring, direct':>22}"
print(hdr)
print("-" * len(hdr))
for name, unit, bm, qn, ratio, raw, _ in rows:
    print(f"{name:<20} | {unit:<5} | {bm:>10.1f} | {qn:>10.1f} | {ratio:>6.2f} | {raw:>22.1f}")
print()
print("completion latency, median over rounds (p50 / p99, us):")
for name, _unit, *_x, med_lat in rows:
    parts = [f"{k} {med_lat[k][0]:.0f}/{med_lat[k][1]:.0f}" for k in ("blkmirror", "qemu_nbd", "raw")]
    print(f"  {name:<20} " + "  ".join(parts))
print()
print("server CPU during the run, median over rounds (% of one core):")
for name, *_x in rows:
    c = doc["workloads"][name]["server_cpu_pct"]
    print(f"  {name:<20} blkmirror {c['blkmirror']:.0f}%  qemu_nbd {c['qemu_nbd']:.0f}%")
print()
print(f"peak RSS (max VmHWM over runs): blkmirror {rss['blkmirror']} KiB, qemu-nbd {rss['qemu_nbd']} KiB")
print(f"ratio = blkmirror / qemu-nbd (higher is better for blkmirror); written {out_json}")
print("fio io_uring, direct: fio straight on the backing file, from its own buffers in 4 KiB pages (a 1 MiB")
print("direct write from them is two disk requests here; blkmirror's buffers are huge pages, so it can beat it)")
EOF

# --- history: one line for this run, after its report ----------------------------------------
python3 "$ROOT/benches/benchlib.py" record nbd "$OUT_JSON" "$COMMIT" "$DIR" ${HISTORY_NOTES:+"$HISTORY_NOTES"} ||
    die "could not append to the benchmark history"
