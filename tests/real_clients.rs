//! End-to-end tests: a real `blkmirror primary` process, driven by the NBD clients people
//! actually use (qemu-io, qemu-img, nbdcopy, nbdinfo, libnbd, fio, nbdfuse + a kernel file
//! system). Every test starts its own server in its own temporary directory.

mod common;

use common::*;
use std::path::Path;

/// qemu-io: run the commands against `uri`, assert success and that no pattern check failed.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Value of the first `"key": value` in nbdinfo's JSON.
fn json_field(json: &str, key: &str) -> String {
    let needle = format!("\"{key}\":");
    let at = json
        .find(&needle)
        .unwrap_or_else(|| panic!("nbdinfo JSON has no {key}:\n{json}"));
    let rest = json[at + needle.len()..].trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    rest[..end].trim().trim_matches('"').to_string()
}

/// Pattern writes and reads at misaligned offsets and lengths, write-zeroes and discard,
/// with qemu-io; neighbouring bytes must stay untouched, and the bytes must really be in the
/// volume's backing file.
#[test]
fn qemu_io_misaligned_writes_zeroes_and_discard() {
    let srv = Server::with_volume(8 * MIB);
    let uri = srv.uri("vol1");
    let big_off = 2 * MIB + 511;
    let big_len = MIB + 3;
    let big_end = big_off + big_len;
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 1 4095".into(),
            "write -P 0xa5 4097 9000".into(),
            format!("write -P 0x3c {big_off} {big_len}"),
            // Aligned block that discard will remove later.
            "write -P 0x77 6291456 1048576".into(),
        ],
    );
    // A separate process reads it back: the data went through the server, not a client cache.
    qemu_io(
        &uri,
        &[
            "read -P 0 0 1".into(),
            "read -P 0x5a 1 4095".into(),
            "read -P 0 4096 1".into(),
            "read -P 0xa5 4097 9000".into(),
            "read -P 0 13097 4096".into(),
            format!("read -P 0 {} 511", 2 * MIB),
            format!("read -P 0x3c {big_off} {big_len}"),
            format!("read -P 0 {big_end} 4096"),
            "read -P 0x77 6291456 1048576".into(),
        ],
    );
    let file = srv.volume_path("vol1");
    assert_eq!(read_at(&file, 0, 1), [0]);
    assert!(read_at(&file, 1, 4095).iter().all(|&b| b == 0x5a));
    assert_eq!(read_at(&file, 4096, 1), [0]);
    assert!(read_at(&file, 4097, 9000).iter().all(|&b| b == 0xa5));
    assert!(read_at(&file, big_off, big_len as usize)
        .iter()
        .all(|&b| b == 0x3c));
    assert_eq!(read_at(&file, big_end, 1), [0]);

    // Write zeroes over part of the 0xa5 run and in the middle of the 0x3c run; discard the
    // aligned 0x77 block.
    let z_off = big_off + 1000;
    qemu_io(
        &uri,
        &[
            "write -z 5000 3000".into(),
            format!("write -z {z_off} 5000"),
            "discard 6291456 1048576".into(),
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xa5 4097 903".into(),
            "read -P 0 5000 3000".into(),
            "read -P 0xa5 8000 5097".into(),
            format!("read -P 0x3c {big_off} 1000"),
            format!("read -P 0 {z_off} 5000"),
            format!("read -P 0x3c {} {}", z_off + 5000, big_end - z_off - 5000),
            "read -P 0 6291456 1048576".into(),
            "read -P 0 7340032 1048576".into(),
        ],
    );
    assert!(read_at(&file, 5000, 3000).iter().all(|&b| b == 0));
    assert!(read_at(&file, 6291456, MIB as usize)
        .iter()
        .all(|&b| b == 0));
}

/// qemu-img convert a 32 MiB image (random data with a zero run) into the export (`-n`,
/// over an export pre-filled with 0xff so zero runs must really be written), and back out to
/// a file; `qemu-img compare` both ways, checksums of all three equal.
#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    let srv = Server::with_volume(32 * MIB);
    let uri = srv.uri("vol1");
    let src = srv.dir().join("src.img");
    let out = srv.dir().join("out.img");
    let mut data = pseudo_random(32 * MIB as usize, 2);
    data[(5 * MIB) as usize..(7 * MIB) as usize].fill(0);
    data[(9 * MIB + 100) as usize..(9 * MIB + 5000) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    qemu_io(&uri, &["write -P 0xff 0 32M".into()]);

    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, &uri],
    );
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &uri]);
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, o]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &uri, o]);
    assert_eq!(sha256(&src), sha256(&out));
    assert_eq!(sha256(&src), sha256(&srv.volume_path("vol1")));
}

/// nbdcopy (4 connections, many requests in flight): random file -> export -> new file;
/// all checksums equal.
#[test]
fn nbdcopy_round_trip() {
    let srv = Server::with_volume(24 * MIB);
    let uri = srv.uri("vol1");
    let src = srv.dir().join("src.img");
    let out = srv.dir().join("out.img");
    let mut data = pseudo_random(24 * MIB as usize, 3);
    data[(3 * MIB) as usize..(4 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    run("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]);
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 24 * MIB);
    let want = sha256(&src);
    assert_eq!(sha256(&out), want, "copied back out");
    assert_eq!(
        sha256(&srv.volume_path("vol1")),
        want,
        "the volume's backing file"
    );
}

/// nbdinfo: sizes, block sizes (1 / 4096 / 32 MiB), flags; the read-only export says so;
/// the empty export name is the first volume; `--list` names every volume.
#[test]
fn nbdinfo_reports_sizes_flags_and_lists_exports() {
    let srv = Server::builder()
        .volume("vol1", 8 * MIB)
        .volume("data-2", 16 * MIB)
        .ro_volume("ro.vol", vec![7u8; MIB as usize])
        .start();
    let json = run("nbdinfo", &["--json", &srv.uri("vol1")]);
    assert_eq!(json_field(&json, "export-size"), (8 * MIB).to_string());
    assert_eq!(json_field(&json, "block_size_minimum"), "1");
    assert_eq!(json_field(&json, "block_size_preferred"), "4096");
    assert_eq!(json_field(&json, "block_size_maximum"), "33554432");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(json_field(&json, flag), "true", "{flag}");
    }
    assert_eq!(json_field(&json, "is_read_only"), "false");

    let json = run("nbdinfo", &["--json", &srv.uri("data-2")]);
    assert_eq!(json_field(&json, "export-size"), (16 * MIB).to_string());
    assert_eq!(json_field(&json, "is_read_only"), "false");

    let json = run("nbdinfo", &["--json", &srv.uri("ro.vol")]);
    assert_eq!(json_field(&json, "export-size"), MIB.to_string());
    assert_eq!(json_field(&json, "is_read_only"), "true");

    // Empty export name: the first volume.
    let default_uri = format!("nbd+unix://?socket={}", srv.socket.display());
    let json = run("nbdinfo", &["--json", &default_uri]);
    assert_eq!(json_field(&json, "export-size"), (8 * MIB).to_string());

    let list = run("nbdinfo", &["--list", "--json", &default_uri]);
    for name in ["vol1", "data-2", "ro.vol"] {
        assert!(
            list.contains(&format!("\"export-name\": \"{name}\"")),
            "--list lacks {name}:\n{list}"
        );
    }
    let size = run("nbdinfo", &["--size", &srv.uri("data-2")]);
    assert_eq!(size.trim(), (16 * MIB).to_string());

    // Asking for a name that does not exist fails cleanly.
    run_fails("nbdinfo", &[&srv.uri("no-such-volume")]);
}

const FLAGS_AND_ERRORS: &str = r#"
import sys, nbd
uri, ro_uri = sys.argv[1], sys.argv[2]
def err(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return e.errno or ("errnum%s" % e.errnum)
h = nbd.NBD()
h.set_strict_mode(0)  # let the server, not libnbd, judge the requests below
h.connect_uri(uri)
size = h.get_size()
print("size=%d" % size)
for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "is_read_only"):
    print("%s=%s" % (f, getattr(h, f)()))
print("structured=%s" % h.get_structured_replies_negotiated())
print("pread_past_end=" + err(lambda: h.pread(4096, size - 100)))
print("pread_at_end=" + err(lambda: h.pread(1, size)))
print("pwrite_past_end=" + err(lambda: h.pwrite(b"\xab" * 200, size - 100)))
print("zero_past_end=" + err(lambda: h.zero(200, size - 100)))
print("trim_past_end=" + err(lambda: h.trim(200, size - 100)))
print("pread_zero_len=" + err(lambda: h.pread(0, 0)))
print("pread_over_max=" + err(lambda: h.pread(32 * 1024 * 1024 + 1, 0)))
h.pwrite(b"\x42" * 4096, 8192, nbd.CMD_FLAG_FUA)
print("still_works=%s" % (h.pread(4096, 8192) == b"\x42" * 4096))
h.flush()
h.shutdown()
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
print("ro_is_read_only=%s" % r.is_read_only())
print("ro_pwrite=" + err(lambda: r.pwrite(b"x" * 512, 0)))
print("ro_trim=" + err(lambda: r.trim(512, 0)))
print("ro_zero=" + err(lambda: r.zero(512, 0)))
print("ro_pread_ok=%s" % (r.pread(512, 0) == b"\x07" * 512))
print("ro_flush=" + err(lambda: r.flush()))
r.shutdown()
"#;

/// libnbd (the library behind nbdsh): export flags, and the error numbers the server
/// sends for bad requests (client-side checks off): EINVAL past the end / zero length,
/// ENOSPC for writes past the end, EOVERFLOW above 32 MiB, EPERM on a read-only export. The
/// connection keeps working after every refusal; nothing lands in the read-only file.
#[test]
fn libnbd_flags_and_error_codes() {
    let srv = Server::builder()
        .volume("vol1", 40 * MIB)
        .ro_volume("ro", vec![7u8; MIB as usize])
        .start();
    // nbdsh itself, as an admin would use it.
    let sh = nbdsh(
        &srv.uri("vol1"),
        &[
            "print('size=%d' % h.get_size())",
            "print('flags=%s' % [h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_multi_conn(), h.is_read_only()])",
            "h.pwrite(b'nbdsh!', 77)",
            "print('back=%s' % h.pread(6, 77).decode())",
        ],
    );
    let r = kv(&sh);
    assert_eq!(r["size"], (40 * MIB).to_string(), "{sh}");
    assert_eq!(r["flags"], "[True, True, True, True, True, False]", "{sh}");
    assert_eq!(r["back"], "nbdsh!", "{sh}");
    assert_eq!(read_at(&srv.volume_path("vol1"), 77, 6), b"nbdsh!");

    let out = python(FLAGS_AND_ERRORS, &[&srv.uri("vol1"), &srv.uri("ro")]);
    let r = kv(&out);
    let expect = [
        ("size", (40 * MIB).to_string()),
        ("can_flush", "True".into()),
        ("can_fua", "True".into()),
        ("can_trim", "True".into()),
        ("can_zero", "True".into()),
        ("can_multi_conn", "True".into()),
        ("is_read_only", "False".into()),
        ("structured", "True".into()),
        ("pread_past_end", "EINVAL".into()),
        ("pread_at_end", "EINVAL".into()),
        ("pwrite_past_end", "ENOSPC".into()),
        ("zero_past_end", "ENOSPC".into()),
        ("trim_past_end", "EINVAL".into()),
        ("pread_zero_len", "EINVAL".into()),
        ("pread_over_max", "EOVERFLOW".into()),
        ("still_works", "True".into()),
        ("ro_is_read_only", "True".into()),
        ("ro_pwrite", "EPERM".into()),
        ("ro_trim", "EPERM".into()),
        ("ro_zero", "EPERM".into()),
        ("ro_pread_ok", "True".into()),
        ("ro_flush", "ok".into()),
    ];
    for (k, v) in expect {
        assert_eq!(
            r.get(k).map(String::as_str),
            Some(v.as_str()),
            "{k}; full output:\n{out}"
        );
    }
    let file = srv.volume_path("vol1");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 40 * MIB);
    assert!(
        read_at(&file, 40 * MIB - 100, 100).iter().all(|&b| b == 0),
        "a refused write past the end left bytes behind"
    );
    assert_eq!(read_at(&file, 8192, 4096), vec![0x42; 4096]);
    assert_eq!(
        std::fs::read(srv.volume_path("ro")).unwrap(),
        vec![7u8; MIB as usize],
        "the read-only volume changed"
    );
    srv.assert_log("write to a read-only export");
}

const BLOCK_STATUS: &str = r#"
import sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
print("meta=%s" % h.can_meta_context("base:allocation"))
M = 1 << 20
h.pwrite(b"\x11" * 65536, M)
h.pwrite(b"\x22" * 4096, 3 * M + 8192)
h.flush()
def status(off, length):
    out = []
    def cb(meta, o, entries, err):
        if meta == "base:allocation":
            pos = o
            for i in range(0, len(entries), 2):
                out.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0
    h.block_status(length, off, cb)
    return " ".join("%d+%d:%d" % e for e in out)
print("around_data=" + status(M - 65536, 3 * 65536))
print("untouched=" + status(5 * M, M))
print("small=" + status(3 * M, 64 * 1024))
h.trim(65536, M)
print("after_trim=" + status(M - 65536, 3 * 65536))
h.shutdown()
"#;

/// Parse "off+len:flags ..." into (offset, len, flags) triples.
fn extents(s: &str) -> Vec<(u64, u64, u32)> {
    s.split_whitespace()
        .map(|e| {
            let (ol, f) = e.split_once(':').unwrap();
            let (o, l) = ol.split_once('+').unwrap();
            (o.parse().unwrap(), l.parse().unwrap(), f.parse().unwrap())
        })
        .collect()
}

/// base:allocation flags at `pos`, from extents that must cover it.
fn flags_at(ext: &[(u64, u64, u32)], pos: u64) -> u32 {
    ext.iter()
        .find(|e| e.0 <= pos && pos < e.0 + e.1)
        .unwrap_or_else(|| panic!("no extent covers {pos}: {ext:?}"))
        .2
}

/// Block status (base:allocation) through libnbd: written ranges are data (flags 0),
/// untouched ranges are hole|zero (3); a trimmed range becomes a hole again.
#[test]
fn libnbd_block_status_holes_and_data() {
    let srv = Server::with_volume(8 * MIB);
    let out = python(BLOCK_STATUS, &[&srv.uri("vol1")]);
    let r = kv(&out);
    assert_eq!(r["meta"], "True", "{out}");
    let around = extents(&r["around_data"]);
    assert_eq!(around.first().map(|e| e.0), Some(MIB - 65536), "{out}");
    assert_eq!(flags_at(&around, MIB - 65536), 3, "{out}");
    assert_eq!(flags_at(&around, MIB - 1), 3, "{out}");
    assert_eq!(flags_at(&around, MIB), 0, "{out}");
    assert_eq!(flags_at(&around, MIB + 65535), 0, "{out}");
    assert_eq!(flags_at(&around, MIB + 65536), 3, "{out}");
    let untouched = extents(&r["untouched"]);
    assert_eq!(untouched, vec![(5 * MIB, MIB, 3)], "{out}");
    let small = extents(&r["small"]);
    assert_eq!(flags_at(&small, 3 * MIB), 3, "{out}");
    assert_eq!(flags_at(&small, 3 * MIB + 8192), 0, "{out}");
    assert_eq!(flags_at(&small, 3 * MIB + 12288), 3, "{out}");
    let after = extents(&r["after_trim"]);
    for pos in [MIB - 65536, MIB, MIB + 65535, MIB + 65536] {
        assert_eq!(flags_at(&after, pos), 3, "at {pos} after trim: {out}");
    }
}

const ZERO_READS: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("structured=%s" % h.get_structured_replies_negotiated())
n = 0
try:
    for i in range(6):
        buf = h.pread(16 << 20, (i % 2) * (16 << 20))
        assert buf == bytes(16 << 20), "a never-written range did not read as zeroes"
        n += 1
except nbd.Error as e:
    print("error=%s" % e)
print("reads=%d" % n)
"#;

/// Reading never-written (all-zero) ranges over and over with structured replies: every
/// read must succeed. (The server answers such reads with OFFSET_HOLE chunks; each 16 MiB
/// read must not leave anything behind on the connection.)
#[test]
fn libnbd_repeated_reads_of_zeroes_keep_working() {
    let srv = Server::with_volume(32 * MIB);
    let out = python(ZERO_READS, &[&srv.uri("vol1")]);
    let r = kv(&out);
    assert_eq!(r["structured"], "True");
    assert_eq!(
        r["reads"], "6",
        "the server stopped answering reads of zeroes:\n{out}"
    );
}

const REFUSED_BIG_WRITES: &str = r#"
import sys, nbd
uri, ro_uri = sys.argv[1], sys.argv[2]
M = 1 << 20
def attempt(u, name, length, offset):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(u)
    size = h.get_size()
    try:
        h.pwrite(b"\xcd" * length, offset if offset >= 0 else size + offset)
        res = "ok"
    except nbd.Error as e:
        res = e.errno or ("%s" % e.string)
    try:
        alive = h.pread(512, 0) is not None
    except nbd.Error as e:
        alive = False
    print("%s=%s" % (name, res))
    print("%s_alive=%s" % (name, alive))
attempt(ro_uri, "ro_1m", M, 0)
attempt(uri, "past_end_1m", M, -4096)
attempt(uri, "over_max", 32 * M + 1, 0)
"#;

/// libnbd (as used by nbdcopy, nbdfuse, fio): a *large* write the server refuses - 1 MiB
/// to a read-only export (EPERM), 1 MiB crossing the end (ENOSPC), 32 MiB + 1 (EOVERFLOW) -
/// must come back as that error, with the connection still usable afterwards and nothing
/// written.
#[test]
fn libnbd_refused_large_writes_keep_the_connection() {
    let srv = Server::builder()
        .volume("vol1", 40 * MIB)
        .ro_volume("ro", vec![7u8; 2 * MIB as usize])
        .start();
    let out = python(REFUSED_BIG_WRITES, &[&srv.uri("vol1"), &srv.uri("ro")]);
    let r = kv(&out);
    for (k, v) in [
        ("ro_1m", "EPERM"),
        ("ro_1m_alive", "True"),
        ("past_end_1m", "ENOSPC"),
        ("past_end_1m_alive", "True"),
        ("over_max", "EOVERFLOW"),
        ("over_max_alive", "True"),
    ] {
        assert_eq!(
            r.get(k).map(String::as_str),
            Some(v),
            "{k}; full output:\n{out}"
        );
    }
    let file = srv.volume_path("vol1");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 40 * MIB);
    assert!(read_at(&file, 0, MIB as usize).iter().all(|&b| b == 0));
    assert!(read_at(&file, 40 * MIB - 4096, 4096)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        std::fs::read(srv.volume_path("ro")).unwrap(),
        vec![7u8; 2 * MIB as usize]
    );
}

const TWO_CONNECTIONS: &str = r#"
import sys, os, threading, nbd
uri, expect_path = sys.argv[1], sys.argv[2]
CH, N = 65536, 96
h1, h2 = nbd.NBD(), nbd.NBD()
h1.connect_uri(uri)
h2.connect_uri(uri)
print("multi_conn=%s" % (h1.can_multi_conn() and h2.can_multi_conn()))
expect = bytearray(2 * N * CH)
errors = []
def writer(h, first):
    try:
        for i in range(first, 2 * N, 2):   # interleaved 64 KiB chunks
            data = os.urandom(CH - 1)    # misaligned lengths too
            expect[i * CH:i * CH + CH - 1] = data
            h.pwrite(data, i * CH)
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=writer, args=(h1, 0)), threading.Thread(target=writer, args=(h2, 1))]
for t in ts: t.start()
for t in ts: t.join()
print("errors=%d %s" % (len(errors), errors))
h1.flush()   # CAN_MULTI_CONN: one flush covers the writes of both connections
print("h2_sees_all=%s" % (h2.pread(2 * N * CH, 0) == bytes(expect)))
print("h1_sees_all=%s" % (h1.pread(2 * N * CH, 0) == bytes(expect)))
open(expect_path, "wb").write(expect)
h1.shutdown()
h2.shutdown()
"#;

/// Two connections at once. (a) Two libnbd handles write interleaved chunks from two
/// threads; a FLUSH on one; each connection reads everything back, and the backing file holds
/// it. (b) Two qemu-io processes write distinct regions in parallel; a third reads both.
#[test]
fn two_connections_write_in_parallel_and_see_each_other() {
    let srv = Server::with_volume(16 * MIB);
    let uri = srv.uri("vol1");
    let expect_path = srv.dir().join("expect.bin");
    let out = python(TWO_CONNECTIONS, &[&uri, expect_path.to_str().unwrap()]);
    let r = kv(&out);
    assert_eq!(r["multi_conn"], "True", "{out}");
    assert!(r["errors"].starts_with('0'), "{out}");
    assert_eq!(r["h2_sees_all"], "True", "{out}");
    assert_eq!(r["h1_sees_all"], "True", "{out}");
    let expect = std::fs::read(&expect_path).unwrap();
    assert_eq!(
        read_at(&srv.volume_path("vol1"), 0, expect.len()),
        expect,
        "backing file after FLUSH"
    );

    let base = 13 * MIB;
    let writers: Vec<_> = [(0x61u8, base), (0x62u8, base + MIB + 17)]
        .into_iter()
        .map(|(p, off)| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                qemu_io(
                    &uri,
                    &[
                        format!("write -P {p} {off} 1048576"),
                        format!("aio_write -P {p} {} 4096", off + 100),
                        "aio_flush".into(),
                    ],
                );
            })
        })
        .collect();
    for w in writers {
        w.join().expect("qemu-io writer");
    }
    qemu_io(
        &uri,
        &[
            format!("read -P 0x61 {base} 1048576"),
            format!("read -P 0 {} 17", base + MIB),
            format!("read -P 0x62 {} 1048576", base + MIB + 17),
        ],
    );
}

/// fio's nbd engine: random 4 KiB writes at queue depth 16 over 32 MiB with crc32c
/// verification, then sequential 256 KiB writes with verification; fio must report no error.
#[test]
fn fio_randwrite_and_seqwrite_verify() {
    let srv = Server::with_volume(32 * MIB);
    let uri_arg = format!("--uri={}", srv.uri("vol1"));
    for (name, rw, bs) in [("randw", "randwrite", "4k"), ("seqw", "write", "256k")] {
        let out = run_in(
            "fio",
            &[
                &format!("--name={name}"),
                "--ioengine=nbd",
                &uri_arg,
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--iodepth=16",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ],
            Some(srv.dir()),
        );
        assert!(out.contains("err= 0"), "fio {name}:\n{out}");
        assert!(
            !out.contains("verify:"),
            "fio {name} verify trouble:\n{out}"
        );
    }
}

/// sha256sum of every file under `dir` (sorted relative names).
fn checksums(dir: &Path) -> Vec<(String, String)> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            if e.file_name() == "lost+found" {
                continue;
            }
            for f in std::fs::read_dir(e.path()).unwrap() {
                names.push(f.unwrap().path());
            }
        } else {
            names.push(e.path());
        }
    }
    names.sort();
    names
        .iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().display().to_string(),
                sha256(p),
            )
        })
        .collect()
}

/// A real file system: nbdfuse exposes the export as a file, a loop device sits on it,
/// mkfs.ext4, mount, write 20 files (1-8 MiB of random data and some small ones), sync,
/// unmount, tear everything down; then attach afresh (so every byte comes from the server),
/// `e2fsck -fn` must be clean, mount again, all checksums equal.
#[test]
fn ext4_on_nbdfuse_loop_survives_remount_and_fsck() {
    let srv = Server::with_volume(256 * MIB);
    let uri = srv.uri("vol1");
    let fuse_dir = srv.dir().join("fuse");
    let mnt = srv.dir().join("mnt");
    let before;
    {
        let fuse = FuseFile::start(&fuse_dir, &uri);
        let lo = LoopDev::attach(&fuse.file());
        run("mkfs.ext4", &["-q", "-F", &lo.dev]);
        let m = Mount::at(&lo.dev, &mnt);
        std::fs::create_dir(mnt.join("sub")).unwrap();
        for i in 0..20u64 {
            let len = if i % 4 == 3 {
                (i as usize + 1) * 3001
            } else {
                ((i % 8 + 1) * MIB) as usize - (i as usize * 4093)
            };
            let name = if i % 3 == 0 {
                format!("sub/file{i}")
            } else {
                format!("file{i}")
            };
            std::fs::write(mnt.join(name), pseudo_random(len, 100 + i)).unwrap();
        }
        run("sync", &[]);
        before = checksums(&mnt);
        assert_eq!(before.len(), 20);
        m.umount();
        drop(lo);
        drop(fuse);
    }
    let fuse = FuseFile::start(&fuse_dir, &uri);
    let lo = LoopDev::attach(&fuse.file());
    let fsck = run_output("e2fsck", &["-fn", &lo.dev], None);
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let m = Mount::at(&lo.dev, &mnt);
    assert_eq!(checksums(&mnt), before);
    m.umount();
}

/// The TCP listener serves the same volumes as the unix socket.
#[test]
fn tcp_listener_serves_the_same_volume() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let srv = Server::builder()
        .volume("vol1", 4 * MIB)
        .tcp(&format!("127.0.0.1:{port}"))
        .start();
    let tcp_uri = format!("nbd://127.0.0.1:{port}/vol1");
    qemu_io(&tcp_uri, &["write -P 0x33 12345 54321".into()]);
    qemu_io(&srv.uri("vol1"), &["read -P 0x33 12345 54321".into()]);
    let json = run("nbdinfo", &["--json", &tcp_uri]);
    assert_eq!(json_field(&json, "export-size"), (4 * MIB).to_string());
}

/// SIGTERM stops the server promptly with status 0 and removes its socket file.
#[test]
fn sigterm_exits_cleanly_and_removes_socket() {
    let mut srv = Server::with_volume(MIB);
    qemu_io(&srv.uri("vol1"), &["write -P 1 0 4096".into()]);
    let socket = srv.socket.clone();
    assert!(socket.exists());
    let status = srv.stop().expect("server was running");
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket file left behind");
    srv.assert_log("shutting down");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
}

/// Many small unaligned writes in flight at once, from two libnbd connections, that share
/// blocks but never bytes: on O_DIRECT each is a read-modify-write of its edge blocks, and none
/// may undo another. Expected: every byte of every write reads back, through NBD and in the
/// backing file.
#[test]
fn concurrent_unaligned_writes_sharing_blocks_all_land() {
    let srv = Server::builder().volume("vol1", 4 * MIB).start();
    let script = r#"
import nbd, sys
uri = sys.argv[1]
hs = [nbd.NBD(), nbd.NBD()]
for h in hs:
    h.connect_uri(uri)
# 3000 writes of 100 bytes at stride 100: about 25 writes share every 4 KiB block.
cookies = []
for i in range(3000):
    h = hs[i % 2]
    buf = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * 100)
    cookies.append((h, h.aio_pwrite(buf, i * 100)))
    if len(cookies) >= 64:
        h0, c0 = cookies.pop(0)
        while not h0.aio_command_completed(c0):
            h0.poll(-1)
for h, c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
hs[0].flush()
data = hs[1].pread(300000, 0)
bad = [i for i in range(3000) if data[i * 100:(i + 1) * 100] != bytes([i % 251 + 1]) * 100]
print("bad=%d" % len(bad))
"#;
    let out = python(script, &[&srv.uri("vol1")]);
    assert_eq!(kv(&out)["bad"], "0", "{out}");
    let file = read_at(&srv.volume_path("vol1"), 0, 300_000);
    for i in 0..3000usize {
        assert!(
            file[i * 100..(i + 1) * 100]
                .iter()
                .all(|&b| b == (i % 251 + 1) as u8),
            "write {i} is missing from the backing file"
        );
    }
}
