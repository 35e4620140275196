//! Promise I3 end to end: mutual TLS over QUIC with certificates made by `blkmirror certs`.
//! A good pair talks; unknown CAs, wrong names (either side), expired certificates, missing
//! client certificates, a foreign protocol and plain garbage are refused, and the server keeps
//! accepting good peers afterwards.

mod common;

use blkmirror::certs;
use blkmirror::transport::{self, Identity, TlsFiles, Tuning, ALPN};
use common::Rng;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// A CA in `dir` with certificates for `names`.
fn pki(dir: &Path, names: &[&str]) {
    certs::init_ca(dir, false).unwrap();
    for name in names {
        certs::issue(dir, name, certs::DEFAULT_DAYS, false).unwrap();
    }
}

fn identity(dir: &Path, me: &str, peer: &str) -> Identity {
    identity_with_ca(dir, dir, me, peer)
}

/// `me`'s certificate from `cert_dir`, trusting the CA in `ca_dir`.
fn identity_with_ca(ca_dir: &Path, cert_dir: &Path, me: &str, peer: &str) -> Identity {
    Identity::load(&TlsFiles {
        ca: ca_dir.join("ca.crt"),
        cert: cert_dir.join(format!("{me}.crt")),
        key: cert_dir.join(format!("{me}.key")),
        peer_name: peer.to_string(),
    })
    .unwrap()
}

/// What the server saw: an authenticated peer, or a refusal with its reason.
type Event = Result<SocketAddr, String>;

/// A mirror-like server: accepts in a loop (as a daemon would), echoes the first bi stream of
/// every accepted connection, and reports each accept result.
struct Server {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    _ep: quinn::Endpoint,
}

impl Server {
    /// Accepts with [`transport::accept`] (one handshake at a time).
    fn start(id: &Identity) -> Server {
        Server::start_with(id, false)
    }

    /// `concurrent`: accept with [`transport::Acceptor`] instead.
    fn start_with(id: &Identity, concurrent: bool) -> Server {
        let ep = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), id, &Tuning::default())
            .unwrap();
        let addr = ep.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let accept_ep = ep.clone();
        tokio::spawn(async move {
            let mut acceptor = transport::Acceptor::new(accept_ep.clone());
            loop {
                let next = if concurrent {
                    acceptor.accept().await
                } else {
                    transport::accept(&accept_ep).await
                };
                let Some(result) = next else { break };
                match result {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn.remote_address()));
                        tokio::spawn(echo(conn));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            }
        });
        Server {
            addr,
            events,
            _ep: ep,
        }
    }

    async fn next_event(&mut self) -> Event {
        timeout(WAIT, self.events.recv())
            .await
            .expect("server reported nothing")
            .expect("server loop ended")
    }

    /// Asserts the next event is a refusal whose text contains every one of `words`.
    async fn expect_refusal(&mut self, words: &[&str]) -> String {
        match self.next_event().await {
            Ok(peer) => panic!("server accepted {peer}, expected a refusal"),
            Err(reason) => {
                for w in words {
                    assert!(
                        reason.to_lowercase().contains(&w.to_lowercase()),
                        "refusal {reason:?} does not mention {w:?}"
                    );
                }
                reason
            }
        }
    }

    /// A good client (certificate "primary", expecting "mirror" from `dir`) connects and
    /// exchanges bytes; the server reports it as accepted.
    async fn expect_good_peer(&mut self, dir: &Path) {
        let id = identity(dir, "primary", "mirror");
        let ep = transport::client_endpoint(&id, &Tuning::default()).unwrap();
        let conn = timeout(WAIT, transport::connect(&ep, self.addr, &id))
            .await
            .unwrap()
            .expect("good peer could not connect");
        let reply = exchange(&conn, b"hello mirror").await.expect("exchange");
        assert_eq!(reply, b"hello mirror");
        // Skip refusals the server may still report for earlier, refused attempts.
        loop {
            match self.next_event().await {
                Ok(_) => break,
                Err(reason) => eprintln!("(earlier refusal: {reason})"),
            }
        }
        // No `wait_idle`: a peer that waited in the accept queue has an inflated first RTT
        // sample, hence a long draining period. The endpoint driver still sends the close.
        conn.close(0u32.into(), b"done");
    }
}

async fn echo(conn: quinn::Connection) {
    if let Ok((mut send, mut recv)) = conn.accept_bi().await {
        if let Ok(data) = recv.read_to_end(1 << 20).await {
            let _ = send.write_all(&data).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }
}

/// Sends `msg` on a new bi stream and returns what comes back, or the error text.
async fn exchange(conn: &quinn::Connection, msg: &[u8]) -> Result<Vec<u8>, String> {
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(msg).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    };
    timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Connects as `id`; returns the connect error, or (when the server refuses the client
/// certificate after the client's side of the handshake is done) the error of the first
/// exchange. Panics if the exchange succeeds.
async fn refused_client(addr: SocketAddr, id: &Identity) -> String {
    let ep = transport::client_endpoint(id, &Tuning::default()).unwrap();
    let reason = match timeout(WAIT, transport::connect(&ep, addr, id))
        .await
        .unwrap()
    {
        Err(e) => e.to_string(),
        Ok(conn) => match exchange(&conn, b"let me in").await {
            Ok(reply) => panic!("refused client exchanged data: {reply:?}"),
            // Stream errors only say "connection lost"; the close reason says why.
            Err(e) => match timeout(WAIT, conn.closed()).await {
                Ok(reason) => reason.to_string(),
                Err(_) => e,
            },
        },
    };
    ep.close(0u32.into(), b"");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_pair_connects_and_exchanges_bytes() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    server.expect_good_peer(dir.path()).await;
    // Again, on a fresh connection: no session resumption shortcut is needed.
    server.expect_good_peer(dir.path()).await;

    // A bigger payload crosses intact.
    let id = identity(dir.path(), "primary", "mirror");
    let ep = transport::client_endpoint(&id, &Tuning::default()).unwrap();
    let conn = transport::connect(&ep, server.addr, &id).await.unwrap();
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(exchange(&conn, &big).await.unwrap(), big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rogue = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    pki(rogue.path(), &["primary"]); // same name, other CA
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));

    // The rogue client trusts the real CA (so it would accept the server) but its own
    // certificate comes from the rogue CA.
    let rogue_id = identity_with_ca(dir.path(), rogue.path(), "primary", "mirror");
    let client_side = refused_client(server.addr, &rogue_id).await;
    let reason = server
        .expect_refusal(&["certificate", "UnknownIssuer"])
        .await;
    eprintln!("server: {reason}\nclient: {client_side}");
    assert!(client_side.contains("UnknownIssuer"), "{client_side}");

    server.expect_good_peer(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_ca_wrong_client_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror", "intruder"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));

    let intruder = identity(dir.path(), "intruder", "mirror");
    let client_side = refused_client(server.addr, &intruder).await;
    let reason = server
        .expect_refusal(&["not for the configured peer name", "intruder"])
        .await;
    eprintln!("server: {reason}\nclient: {client_side}");
    // The refused peer learns why, but not which name the server expects.
    assert!(
        client_side.contains("configured peer name"),
        "{client_side}"
    );
    assert!(!client_side.contains("primary"), "{client_side}");

    server.expect_good_peer(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_wrong_name_is_refused_by_client() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror", "other"]);
    // A server of the same CA, but it is "other", not the "mirror" the client expects.
    let mut impostor = Server::start(&identity(dir.path(), "other", "primary"));
    let id = identity(dir.path(), "primary", "mirror");
    let ep = transport::client_endpoint(&id, &Tuning::default()).unwrap();
    let err = timeout(WAIT, transport::connect(&ep, impostor.addr, &id))
        .await
        .unwrap()
        .expect_err("client accepted a server with the wrong name")
        .to_string();
    eprintln!("client: {err}");
    assert!(err.contains("not valid for name \"mirror\""), "{err}");
    assert!(err.contains("other"), "{err}");
    // The impostor saw the client abort its handshake.
    impostor.expect_refusal(&["handshake"]).await;

    // The same client still reaches the real mirror.
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    server.expect_good_peer(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let old = tempfile::tempdir().unwrap();
    // Same CA, same name, but expired: copy the CA and issue an expired "primary".
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(dir.path().join(f), old.path().join(f)).unwrap();
    }
    certs::issue(old.path(), "primary", 30, true).unwrap();
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));

    let expired = identity_with_ca(dir.path(), old.path(), "primary", "mirror");
    let client_side = refused_client(server.addr, &expired).await;
    let reason = server.expect_refusal(&["certificate expired"]).await;
    eprintln!("server: {reason}\nclient: {client_side}");
    assert!(client_side.contains("certificate expired"), "{client_side}");

    server.expect_good_peer(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_certificate_is_refused_by_client() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary"]);
    certs::issue(dir.path(), "mirror", 30, true).unwrap();
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    let id = identity(dir.path(), "primary", "mirror");
    let ep = transport::client_endpoint(&id, &Tuning::default()).unwrap();
    let err = timeout(WAIT, transport::connect(&ep, server.addr, &id))
        .await
        .unwrap()
        .expect_err("client accepted an expired server certificate")
        .to_string();
    assert!(err.contains("certificate expired"), "{err}");
    server.expect_refusal(&["handshake"]).await;
}

/// Raw quinn client with a hand-made rustls config (for peers our API cannot produce).
async fn raw_client(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Connection, String> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = timeout(WAIT, ep.connect(addr, "mirror").unwrap())
        .await
        .unwrap()
        .map_err(|e| e.to_string())?;
    match exchange(&conn, b"let me in").await {
        Ok(reply) => panic!("raw client exchanged data: {reply:?}"),
        Err(_) => Err(conn.closed().await.to_string()),
    }
}

fn ca_roots(dir: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dir.join("ca.crt")).unwrap();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
        .unwrap();
    roots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca_roots(dir.path()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let client_side = raw_client(server.addr, tls).await.unwrap_err();
    let reason = server.expect_refusal(&["no certificates"]).await;
    eprintln!("server: {reason}\nclient: {client_side}");
    server.expect_good_peer(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_application_protocol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca_roots(dir.path()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let client_side = raw_client(server.addr, tls).await.unwrap_err();
    let reason = server.expect_refusal(&["protocol"]).await;
    eprintln!("server: {reason}\nclient: {client_side}");
    server.expect_good_peer(dir.path()).await;
}

/// Starts a handshake from a good client through a relay that forwards only the client's first
/// datagram: the server gets a valid Initial, answers into the void and waits for a handshake
/// that never completes. Returns the task holding the stalled client.
async fn stalled_handshake(dir: &Path, server: SocketAddr) -> tokio::task::JoinHandle<()> {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let id = identity(dir, "primary", "mirror");
    tokio::spawn(async move {
        let ep = transport::client_endpoint(&id, &Tuning::default()).unwrap();
        let client = transport::connect(&ep, relay_addr, &id);
        let relay = async {
            let mut buf = [0u8; 2048];
            let (n, _) = relay.recv_from(&mut buf).await.unwrap();
            relay.send_to(&buf[..n], server).await.unwrap();
            loop {
                let _ = relay.recv_from(&mut buf).await; // black hole
            }
        };
        tokio::select! {
            result = client => {
                let e = result.expect_err("stalled client connected");
                assert!(e.to_string().contains("timed out"), "{e}");
            }
            _ = relay => {}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_does_not_block_acceptor() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start_with(&identity(dir.path(), "mirror", "primary"), true);
    let stall = stalled_handshake(dir.path(), server.addr).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    server.expect_good_peer(dir.path()).await;
    assert!(
        started.elapsed() < transport::HANDSHAKE_TIMEOUT / 2,
        "good peer waited {:?} behind a stalled handshake",
        started.elapsed()
    );
    stall.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_times_out_with_plain_accept() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));
    let stall = stalled_handshake(dir.path(), server.addr).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The good peer waits in the queue until the stalled handshake times out, then gets in;
    // the timeout is not reported as a refusal.
    let started = std::time::Instant::now();
    server.expect_good_peer(dir.path()).await;
    assert!(started.elapsed() < transport::HANDSHAKE_TIMEOUT * 2);
    stall.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["primary", "mirror"]);
    let mut server = Server::start(&identity(dir.path(), "mirror", "primary"));

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("garbage seed {seed}");
    let mut rng = Rng(seed);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0;
    for i in 0..2000 {
        let len = match i % 4 {
            0 => (rng.next() % 64) as usize,
            1 => 1200 + (rng.next() % 200) as usize,
            _ => (rng.next() % 1500) as usize,
        };
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        if i % 3 == 0 && len >= 1200 {
            // Looks like a QUIC v1 Initial (long header, version 1, plausible connection ids)
            // with a garbage payload: it must fail packet protection and be dropped.
            buf[0] = 0xc0 | (buf[0] & 0x0f);
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = 8;
            buf[14] = 8;
        }
        if sock.send_to(&buf, server.addr).is_ok() {
            sent += 1;
        }
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(sent > 1000, "could not send garbage");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Garbage never became a connection (not even a refused one that got as far as TLS).
    if let Ok(event) = server.events.try_recv() {
        panic!("garbage produced an accept result: {event:?}");
    }
    server.expect_good_peer(dir.path()).await;
}

fn blkmirror(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_blkmirror"))
        .args(args)
        .env("BLKMIRROR_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn certs_cli_init_issue_and_refuse_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("pki");
    let ds = d.to_str().unwrap();
    let out = blkmirror(&["certs", "init", "--dir", ds]);
    assert!(out.status.success(), "{out:?}");
    let out = blkmirror(&["certs", "issue", "--dir", ds, "primary"]);
    assert!(out.status.success(), "{out:?}");
    let out = blkmirror(&["certs", "issue", "--dir", ds, "mirror", "--days", "30"]);
    assert!(out.status.success(), "{out:?}");
    for f in [
        "ca.crt",
        "ca.key",
        "primary.crt",
        "primary.key",
        "mirror.crt",
    ] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    for key in ["ca.key", "primary.key", "mirror.key"] {
        let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key} mode {mode:o}");
    }
    let pem = std::fs::read_to_string(d.join("primary.crt")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    // Files the CLI made are a working identity.
    Identity::load(&TlsFiles {
        ca: d.join("ca.crt"),
        cert: d.join("primary.crt"),
        key: d.join("primary.key"),
        peer_name: "mirror".into(),
    })
    .unwrap();

    let ca_before = std::fs::read(d.join("ca.crt")).unwrap();
    let out = blkmirror(&["certs", "init", "--dir", ds]);
    assert!(!out.status.success(), "re-init without --force succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "unclear message: {stderr}"
    );
    assert_eq!(std::fs::read(d.join("ca.crt")).unwrap(), ca_before);

    let out = blkmirror(&["certs", "init", "--dir", ds, "--force"]);
    assert!(out.status.success(), "{out:?}");
    assert_ne!(std::fs::read(d.join("ca.crt")).unwrap(), ca_before);

    // Bad names and a missing CA are refused with a message.
    let out = blkmirror(&["certs", "issue", "--dir", ds, "../evil"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid peer name"));
    let empty = tmp.path().join("empty");
    let out = blkmirror(&[
        "certs",
        "issue",
        "--dir",
        empty.to_str().unwrap(),
        "primary",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certs init"));

    // The test-only flag works but is not advertised.
    let out = blkmirror(&["certs", "issue", "--dir", ds, "old", "--expired"]);
    assert!(out.status.success(), "{out:?}");
    let help = blkmirror(&["certs", "issue", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--days") && !help.contains("--expired"),
        "{help}"
    );
}
