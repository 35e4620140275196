//! QUIC endpoints and TLS identities (promise I3).
//!
//! Every replication link is QUIC (quinn) with TLS 1.3 only (rustls, *ring* provider installed
//! explicitly per config, never the process default), ALPN [`ALPN`], and mutual certificate
//! authentication against one configured CA:
//!
//! - Trust: only the CA in [`TlsFiles::ca`]; no system roots, no session resumption, no 0-RTT
//!   (every connection runs the full handshake, so every connection re-checks certificates and
//!   expiry).
//! - The client (primary) verifies the server's chain and expiry, and that the server
//!   certificate's DNS subject alternative name is [`TlsFiles::peer_name`] (it is also the SNI).
//! - The server (mirror) requires a client certificate; [`PeerNameVerifier`] wraps rustls'
//!   `WebPkiClientVerifier` (chain to the CA, expiry, clientAuth usage) and then checks the
//!   end-entity certificate's DNS subject alternative name against the configured peer name with
//!   rustls' own webpki name matcher (`rustls::client::verify_server_name`). This runs inside
//!   the TLS handshake, so a refused peer never gets a connection: no stream is ever accepted
//!   from it, and no volume byte is read or written on its behalf.
//!
//! Refusals surface as `Err` from [`accept`] / [`Acceptor::accept`] (server) or [`connect`]
//! (client) with the reason (rustls' error text); the server logs each at `warn` with the
//! remote address. Attempts that never reach TLS (garbage datagrams are dropped by quinn; junk
//! shaped like a QUIC Initial fails packet authentication; stalled handshakes time out) are
//! only logged at `debug` and never returned. Because TLS 1.3 verifies the *client*
//! certificate after the client has finished its part of the handshake, a client refused by
//! the server may see [`connect`] succeed; its first stream operation then fails with
//! "connection lost" and `Connection::close_reason()` carries the server's reason.
//!
//! Sizing: [`Tuning`] turns link rate and RTT into flow-control windows (2×BDP, clamped) and
//! UDP socket buffers; see [`Tuning::transport_config`] and [`bind_udp`].

pub mod congestion;
pub mod socket;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, Runtime, TransportConfig, VarInt};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol id of the replication protocol; a peer not speaking it is refused.
pub const ALPN: &[u8] = b"blkmirror/1";
/// Keep-alive interval: keeps NAT/firewall state and detects a dead link quickly.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection (or handshake) silent for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum concurrent streams of each direction a peer may open.
pub const MAX_STREAMS: u32 = 256;
/// First UDP payload size tried: 1500-byte Ethernet minus IPv6/UDP headers, safe for both
/// address families.
pub const INITIAL_MTU: u16 = 1452;
/// MTU discovery then searches up to the largest UDP payload there is: 1472 on an IPv4 path
/// over 1500-byte Ethernet (1.4 % more payload per packet than 1452), about 9000 over jumbo
/// frames, 65 507 on loopback (a 45th of the packets, and of their per-packet cost). Probes
/// larger than the path are lost (or refused by the local interface) and cost nothing else.
pub const MAX_MTU: u16 = 65_527;
/// Length of the connection IDs we issue. Every data packet carries the receiver's ID, so this
/// is per-packet overhead: 4 random bytes tell apart the few connections a daemon has (quinn's
/// default is 8). Not zero: a zero-length ID cannot carry a stateless reset, which is how a
/// restarted mirror makes the primary reconnect at once.
pub const CID_LEN: usize = 4;
/// Flow-control windows never go below this, whatever the tuning says.
pub const MIN_WINDOW: u64 = 16 << 20;
/// Flow-control windows never go above this: it bounds receive memory per connection (I5).
pub const MAX_WINDOW: u64 = 512 << 20;
/// UDP socket buffers are asked for at least this much.
const MIN_SOCKET_BUFFER: u64 = 4 << 20;
/// A server-side handshake taking longer than this is abandoned (a handshake takes a few RTTs).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// [`Acceptor`] handshakes at most this many peers at once; more are refused.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("invalid peer name {name:?}: must be a DNS name")]
    PeerName { name: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed: certificate refused (by us or by the peer), protocol mismatch,
    /// timeout. The text carries the reason.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    /// The handshake completed but the peer is still not acceptable.
    #[error("peer {addr} refused: {reason}")]
    Refused { addr: SocketAddr, reason: String },
}

/// Where a node's TLS material lives, and whom it expects at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate(s) of the CA; the only trust anchor(s).
    pub ca: PathBuf,
    /// PEM certificate chain of this node (its own certificate first).
    pub cert: PathBuf,
    /// PEM private key of this node (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// DNS name the peer's certificate must carry (subject alternative name).
    pub peer_name: String,
}

/// A node's loaded TLS identity: trust anchors, own certificate and key, expected peer name.
pub struct Identity {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    peer_name: ServerName<'static>,
    peer_name_str: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .field("peer_name", &self.peer_name_str)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            peer_name: self.peer_name.clone(),
            peer_name_str: self.peer_name_str.clone(),
            provider: self.provider.clone(),
        }
    }
}

impl Identity {
    /// Loads and checks the files: the CA parses and is usable as a trust anchor, the
    /// certificate and key parse and belong together, the peer name is a DNS name. Errors name
    /// the file at fault.
    pub fn load(files: &TlsFiles) -> Result<Identity, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let peer_name = match ServerName::try_from(files.peer_name.clone()) {
            Ok(name @ ServerName::DnsName(_)) => name,
            _ => {
                return Err(TransportError::PeerName {
                    name: files.peer_name.clone(),
                })
            }
        };

        let mut roots = rustls::RootCertStore::empty();
        for der in read_certs(&files.ca)? {
            roots.add(der).map_err(|e| bad_file(&files.ca, e))?;
        }
        let chain = read_certs(&files.cert)?;

        let pem = read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| bad_file(&files.key, format!("no PEM private key ({e})")))?;
        if let Ok(meta) = std::fs::metadata(&files.key) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %files.key.display(),
                    "private key is readable by group or others; chmod 600 it"
                );
            }
        }
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| bad_file(&files.key, e))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| {
                bad_file(
                    &files.key,
                    format!("does not match {} ({e})", files.cert.display()),
                )
            })?;

        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key,
            peer_name,
            peer_name_str: files.peer_name.clone(),
            provider,
        })
    }

    /// The name the peer's certificate must carry.
    pub fn peer_name(&self) -> &str {
        &self.peer_name_str
    }

    fn server_tls(&self) -> Result<rustls::ServerConfig, TransportError> {
        let webpki =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TransportError::Tls(e.to_string()))?;
        let verifier = Arc::new(PeerNameVerifier {
            inner: webpki,
            expected: self.peer_name.clone(),
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Full handshake every time: certificates and expiry are re-checked on each connection.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;
        Ok(tls)
    }

    fn client_tls(&self) -> Result<rustls::ClientConfig, TransportError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        tls.enable_early_data = false;
        Ok(tls)
    }
}

fn tls_err(e: rustls::Error) -> TransportError {
    TransportError::Tls(e.to_string())
}

fn bad_file(path: &Path, reason: impl fmt::Display) -> TransportError {
    TransportError::BadFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(path, format!("bad PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad_file(path, "no PEM certificate in file"));
    }
    Ok(certs)
}

/// Client-certificate verifier of the server: rustls' webpki verifier (chain to the configured
/// CA, validity period, clientAuth usage, handshake signatures) plus the peer-name check.
#[derive(Debug)]
pub struct PeerNameVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expected: ServerName<'static>,
}

/// The client certificate is valid but for another peer. Its text, sent to the refused peer in
/// the close reason, names what the certificate presents but not the name we expect. (rustls
/// prints custom certificate errors with `Debug`, hence the hand-written `Debug`.)
struct WrongPeer {
    presented: Vec<String>,
}

impl fmt::Display for WrongPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // webpki renders names as `DnsName("x")`; show just `"x"`.
        let names: Vec<&str> = self
            .presented
            .iter()
            .map(|n| {
                n.strip_prefix("DnsName(")
                    .and_then(|n| n.strip_suffix(')'))
                    .unwrap_or(n)
            })
            .collect();
        if names.is_empty() {
            write!(
                f,
                "certificate is not for the configured peer name (it names no DNS name)"
            )
        } else {
            write!(
                f,
                "certificate is not for the configured peer name (it is for {})",
                names.join(", ")
            )
        }
    }
}

impl fmt::Debug for WrongPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WrongPeer {}

impl ClientCertVerifier for PeerNameVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::debug!("client certificate refused: {e}"))?;
        check_peer_name(end_entity, &self.expected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks that `cert`'s DNS subject alternative name matches `expected` (webpki's matcher, the
/// same one that checks server names; the CN is ignored, as in any modern TLS stack).
fn check_peer_name(
    cert: &CertificateDer<'_>,
    expected: &ServerName<'_>,
) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    match rustls::client::verify_server_name(&parsed, expected) {
        Ok(()) => Ok(()),
        Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        })) => {
            tracing::debug!(
                expected = expected.to_str().as_ref(),
                ?presented,
                "client certificate is for another peer"
            );
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongPeer { presented })),
            )))
        }
        Err(e) => {
            tracing::debug!(
                expected = expected.to_str().as_ref(),
                "client certificate name check failed: {e}"
            );
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongPeer { presented: vec![] })),
            )))
        }
    }
}

/// Link parameters the transport is sized from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Link rate in bits per second.
    pub link_rate_bps: u64,
    /// Round-trip time of the link.
    pub rtt: Duration,
    /// Congestion controller (docs/TUNING.md says why `Steady` is the default).
    pub congestion: Congestion,
}

/// Which congestion controller drives a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// Ours: follows the measured delivery rate, ignores random loss (`congestion.rs`).
    #[default]
    Steady,
    Cubic,
    NewReno,
    /// quinn's experimental BBR.
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "steady" => Ok(Congestion::Steady),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "congestion controller {s:?}: expected steady, cubic, newreno or bbr"
            )),
        }
    }
}

impl Default for Tuning {
    /// 1 Gbit/s, 30 ms: the reference Monaco–Luxembourg link.
    fn default() -> Self {
        Tuning {
            link_rate_bps: 1_000_000_000,
            rtt: Duration::from_millis(30),
            congestion: Congestion::default(),
        }
    }
}

impl Tuning {
    /// Bandwidth-delay product in bytes: what must be in flight to fill the link.
    pub fn bdp_bytes(&self) -> u64 {
        let bits = u128::from(self.link_rate_bps) * self.rtt.as_nanos() / 1_000_000_000;
        u64::try_from(bits / 8).unwrap_or(u64::MAX)
    }

    /// Flow-control window: 2×BDP (room for one RTT of loss recovery on top of a full pipe),
    /// clamped to [`MIN_WINDOW`, `MAX_WINDOW`]. This also bounds receive memory per connection.
    pub fn window_bytes(&self) -> u64 {
        self.bdp_bytes()
            .saturating_mul(2)
            .clamp(MIN_WINDOW, MAX_WINDOW)
    }

    /// The QUIC transport parameters for this link, with the chosen congestion controller.
    pub fn transport_config(&self) -> TransportConfig {
        let window = self.window_bytes();
        let window_varint = VarInt::from_u64(window).unwrap_or(VarInt::MAX);
        let mut tc = TransportConfig::default();
        tc.stream_receive_window(window_varint)
            .receive_window(window_varint)
            .send_window(window)
            .initial_rtt(self.rtt)
            .keep_alive_interval(Some(KEEP_ALIVE))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s fits an idle timeout"),
            ))
            .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
            .max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS))
            // Replication uses streams only; unreliable datagrams are not accepted.
            .datagram_receive_buffer_size(None)
            // Start at the largest UDP payload a 1500-byte path carries, not QUIC's safe 1200:
            // fewer packets per byte; quinn's black-hole detection drops back if the path is
            // narrower.
            .initial_mtu(INITIAL_MTU)
            .mtu_discovery_config(Some({
                let mut mtud = quinn::MtuDiscoveryConfig::default();
                // Search to the exact size: the last bytes below 1500 are the ones that
                // count on a WAN.
                mtud.upper_bound(MAX_MTU).minimum_change(1);
                // A search whose probes met an outage settles too low; search again after a
                // minute, not quinn's ten (a search costs a few dozen lost probes).
                mtud.interval(Duration::from_secs(60));
                mtud
            }));
        let window_cap = window.saturating_mul(2);
        match self.congestion {
            Congestion::Steady => {
                let cfg = congestion::SteadyConfig {
                    max_window: window_cap,
                    ..Default::default()
                };
                tc.congestion_controller_factory(Arc::new(cfg));
            }
            Congestion::Cubic => {
                tc.congestion_controller_factory(Arc::new(
                    quinn::congestion::CubicConfig::default(),
                ));
            }
            Congestion::NewReno => {
                tc.congestion_controller_factory(Arc::new(
                    quinn::congestion::NewRenoConfig::default(),
                ));
            }
            Congestion::Bbr => {
                tc.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
            }
        }
        tc
    }

    /// UDP socket buffer size asked of the kernel: the window, at least 4 MiB.
    pub fn socket_buffer_bytes(&self) -> u64 {
        self.window_bytes().max(MIN_SOCKET_BUFFER)
    }
}

/// Binds a UDP socket with send/receive buffers as large as the kernel allows, up to
/// [`Tuning::socket_buffer_bytes`]. `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (privileged) are tried
/// first, then `SO_RCVBUF`/`SO_SNDBUF`, which the kernel caps at `net.core.rmem_max` /
/// `net.core.wmem_max`; a warning says when the result is below the bandwidth-delay product.
pub fn bind_udp(addr: SocketAddr, tuning: &Tuning) -> Result<UdpSocket, TransportError> {
    let socket = UdpSocket::bind(addr).map_err(|source| TransportError::Socket { addr, source })?;
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let want = usize::try_from(tuning.socket_buffer_bytes()).unwrap_or(usize::MAX);
    let want = want.min(i32::MAX as usize);
    // Linux reports twice the usable size (bookkeeping overhead included).
    let usable = |v: nix::Result<usize>| v.map_or(-1, |v| v as i64 / 2);
    if setsockopt(&socket, sockopt::RcvBufForce, &want).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &want);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &want).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &want);
    }
    let got = [
        usable(getsockopt(&socket, sockopt::RcvBuf)),
        usable(getsockopt(&socket, sockopt::SndBuf)),
    ];
    let local = socket.local_addr().unwrap_or(addr);
    tracing::debug!(%local, want, rcvbuf = got[0], sndbuf = got[1], "UDP socket buffers");
    let bdp = i64::try_from(tuning.bdp_bytes()).unwrap_or(i64::MAX);
    if got[0] >= 0 && got[0] < bdp {
        tracing::warn!(
            %local,
            rcvbuf = got[0],
            bdp,
            "UDP receive buffer is smaller than the bandwidth-delay product; raise \
             net.core.rmem_max (and wmem_max) to at least {want} for full link speed"
        );
    }
    Ok(socket)
}

fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    endpoint_with(
        endpoint_config(quinn::EndpointConfig::default()),
        socket,
        server,
        addr,
    )
}

/// Endpoint settings shared by both roles: short connection IDs (see [`CID_LEN`]), and
/// datagrams up to [`MAX_MTU`] accepted.
fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CID_LEN)));
    config
        .max_udp_payload_size(MAX_MTU)
        .expect("65 527 is the largest UDP payload quinn accepts");
    config
}

fn endpoint_with(
    config: quinn::EndpointConfig,
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = runtime
        .wrap_udp_socket(socket)
        .map_err(|source| TransportError::Socket { addr, source })?;
    let socket = Arc::new(socket::BoundedBatches(socket));
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
        .map_err(|source| TransportError::Socket { addr, source })
}

/// [`server_endpoint`] with a stateless-reset key that survives restarts (kept by the caller,
/// e.g. in the state directory): after a crash and restart, the peer's packets for the old
/// connection get a reset it accepts at once, instead of waiting out the idle timeout.
pub fn server_endpoint_with_reset_key(
    listen: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
    reset_key: &[u8],
) -> Result<quinn::Endpoint, TransportError> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let socket = bind_udp(listen, tuning)?;
    endpoint_with(
        endpoint_config(quinn::EndpointConfig::new(Arc::new(key))),
        socket,
        Some(server_config(id, tuning)?),
        listen,
    )
}

/// A server (mirror) endpoint listening on `listen`: requires a client certificate from the
/// configured CA for the configured peer name. Must be called inside a tokio runtime.
pub fn server_endpoint(
    listen: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = bind_udp(listen, tuning)?;
    endpoint(socket, Some(server_config(id, tuning)?), listen)
}

fn server_config(id: &Identity, tuning: &Tuning) -> Result<quinn::ServerConfig, TransportError> {
    let quic = QuicServerConfig::try_from(id.server_tls()?)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(tuning.transport_config()));
    Ok(server)
}

/// A client (primary) endpoint on an ephemeral port of the wildcard address: dual-stack IPv6
/// when the host allows it, else IPv4. Must be called inside a tokio runtime.
pub fn client_endpoint(id: &Identity, tuning: &Tuning) -> Result<quinn::Endpoint, TransportError> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    match bind_udp(v6, tuning) {
        Ok(socket) if !v6_only(&socket) => client_endpoint_on_socket(socket, v6, id, tuning),
        _ => client_endpoint_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), id, tuning),
    }
}

/// A client endpoint bound to `bind` (e.g. to pin the source address firewalls expect).
pub fn client_endpoint_on(
    bind: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = bind_udp(bind, tuning)?;
    client_endpoint_on_socket(socket, bind, id, tuning)
}

fn client_endpoint_on_socket(
    socket: UdpSocket,
    bind: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    let quic = QuicClientConfig::try_from(id.client_tls()?)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(tuning.transport_config()));
    let mut ep = endpoint(socket, None, bind)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

fn v6_only(socket: &UdpSocket) -> bool {
    nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::Ipv6V6Only).unwrap_or(true)
}

/// Connects to the server at `addr`, which must present a certificate from the configured CA
/// for `id`'s peer name. `ep` must come from [`client_endpoint`] with the same identity.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    id: &Identity,
) -> Result<quinn::Connection, TransportError> {
    let connecting = ep
        .connect(addr, id.peer_name())
        .map_err(|source| TransportError::Connect { addr, source })?;
    let result = match connecting.await {
        Ok(conn) => check_alpn(conn),
        Err(source) => Err(TransportError::Handshake { addr, source }),
    };
    if let Err(e) = &result {
        tracing::warn!(peer = %addr, "connection refused: {e}");
    }
    result
}

/// Waits for the next peer that completes the handshake and passes every check, and returns
/// its connection.
///
/// A peer refused during the TLS handshake (unknown CA, wrong name, expired or missing
/// certificate, foreign application protocol — or a peer that refuses *our* certificate) is
/// logged at `warn` and returned as `Err` carrying the reason, so the caller can continue
/// accepting; it never gets a usable connection. Attempts that never reach TLS (garbage that
/// merely looks like a QUIC Initial, handshakes that time out or are abandoned) are logged at
/// `debug` only and not returned, so a flood of junk cannot flood the logs.
///
/// Handshakes run one at a time, each bounded by [`HANDSHAKE_TIMEOUT`]; connection attempts
/// arriving meanwhile wait in quinn's queue (nothing is dropped). A daemon that must not let
/// a stalling peer delay others uses [`Acceptor`], which runs handshakes concurrently.
/// Returns `None` once the endpoint is closed.
pub async fn accept(ep: &quinn::Endpoint) -> Option<Result<quinn::Connection, TransportError>> {
    loop {
        let incoming = ep.accept().await?;
        if let Some(result) = sort(handshake(incoming).await) {
            return Some(result);
        }
    }
}

/// Accepts peers with handshakes running concurrently (at most 64 at once; more are refused),
/// so a slow or hostile peer never holds up a good one. Same contract as [`accept`]; handshakes
/// still in progress continue across calls and are abandoned only when the `Acceptor` is
/// dropped. [`Acceptor::accept`] is cancel-safe.
pub struct Acceptor {
    ep: quinn::Endpoint,
    handshakes: tokio::task::JoinSet<Result<quinn::Connection, TransportError>>,
}

impl Acceptor {
    /// Accepts on `ep` (an endpoint from [`server_endpoint`]).
    pub fn new(ep: quinn::Endpoint) -> Acceptor {
        Acceptor {
            ep,
            handshakes: tokio::task::JoinSet::new(),
        }
    }

    /// The next authenticated peer, or a refusal (see [`accept`]); `None` once the endpoint is
    /// closed. Must be called within a tokio runtime.
    pub async fn accept(&mut self) -> Option<Result<quinn::Connection, TransportError>> {
        loop {
            tokio::select! {
                incoming = self.ep.accept() => {
                    let incoming = incoming?;
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!(
                            peer = %incoming.remote_address(),
                            "too many handshakes in progress; refusing"
                        );
                        incoming.refuse();
                        continue;
                    }
                    self.handshakes.spawn(handshake(incoming));
                }
                Some(joined) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match joined {
                        Ok(result) => {
                            if let Some(result) = sort(result) {
                                return Some(result);
                            }
                        }
                        Err(e) => tracing::error!("handshake task failed: {e}"),
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("pending_handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

/// Runs one server-side handshake to completion (or [`HANDSHAKE_TIMEOUT`]) and checks ALPN.
async fn handshake(incoming: quinn::Incoming) -> Result<quinn::Connection, TransportError> {
    let addr = incoming.remote_address();
    let connecting = incoming
        .accept()
        .map_err(|source| TransportError::Handshake { addr, source })?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => check_alpn(conn),
        Ok(Err(source)) => Err(TransportError::Handshake { addr, source }),
        // Dropping `connecting` abandons the connection.
        Err(_) => Err(TransportError::Handshake {
            addr,
            source: quinn::ConnectionError::TimedOut,
        }),
    }
}

/// Logs a handshake outcome; returns it unless it is noise (see [`accept`]).
fn sort(
    result: Result<quinn::Connection, TransportError>,
) -> Option<Result<quinn::Connection, TransportError>> {
    match result {
        Ok(conn) => {
            tracing::info!(peer = %conn.remote_address(), "peer authenticated");
            Some(Ok(conn))
        }
        Err(e) if is_refusal(&e) => {
            tracing::warn!("peer refused: {e}");
            Some(Err(e))
        }
        Err(e) => {
            tracing::debug!("connection attempt dropped: {e}");
            None
        }
    }
}

/// True when the attempt failed in or after TLS (a TLS alert either way, or our own checks),
/// false for attempts that never reached TLS (undecryptable packets, timeouts, resets).
fn is_refusal(e: &TransportError) -> bool {
    let is_tls_alert = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        TransportError::Handshake { source, .. } => match source {
            quinn::ConnectionError::TransportError(t) => is_tls_alert(t.code),
            quinn::ConnectionError::ConnectionClosed(c) => is_tls_alert(c.error_code),
            _ => false,
        },
        _ => true,
    }
}

/// Returns `conn` if it negotiated [`ALPN`]; otherwise closes it and says why.
fn check_alpn(conn: quinn::Connection) -> Result<quinn::Connection, TransportError> {
    let protocol = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if protocol.as_deref() == Some(ALPN) {
        Ok(conn)
    } else {
        conn.close(VarInt::from_u32(1), b"wrong application protocol");
        Err(TransportError::Refused {
            addr: conn.remote_address(),
            reason: format!(
                "application protocol {:?} is not {:?}",
                protocol.map(|p| String::from_utf8_lossy(&p).into_owned()),
                String::from_utf8_lossy(ALPN)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdp_and_windows() {
        let t = Tuning::default();
        assert_eq!(t.bdp_bytes(), 3_750_000);
        // 2 x BDP is below the floor, which leaves room for a mirror pausing on fsync.
        assert_eq!(t.window_bytes(), MIN_WINDOW);
        let fast = Tuning {
            link_rate_bps: 10_000_000_000,
            ..Tuning::default()
        };
        assert_eq!(fast.window_bytes(), 75_000_000);
        assert!(t.socket_buffer_bytes() >= t.window_bytes());
        let slow = Tuning {
            link_rate_bps: 10_000_000,
            rtt: Duration::from_millis(1),
            ..Tuning::default()
        };
        assert_eq!(slow.window_bytes(), MIN_WINDOW);
        let huge = Tuning {
            link_rate_bps: u64::MAX,
            rtt: Duration::from_secs(3600),
            ..Tuning::default()
        };
        assert_eq!(huge.window_bytes(), MAX_WINDOW);
        let _ = huge.transport_config();
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::certs::init_ca(d, false).unwrap();
        crate::certs::issue(d, "primary", 10, false).unwrap();
        crate::certs::issue(d, "mirror", 10, false).unwrap();
        let files = TlsFiles {
            ca: d.join("ca.crt"),
            cert: d.join("primary.crt"),
            key: d.join("primary.key"),
            peer_name: "mirror".into(),
        };
        let id = Identity::load(&files).unwrap();
        assert_eq!(id.peer_name(), "mirror");

        let missing = TlsFiles {
            ca: d.join("nope.crt"),
            ..files.clone()
        };
        let e = Identity::load(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.crt"), "{e}");

        let garbage = d.join("garbage.crt");
        std::fs::write(&garbage, "hello").unwrap();
        let e = Identity::load(&TlsFiles {
            cert: garbage.clone(),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("garbage.crt"), "{e}");

        let e = Identity::load(&TlsFiles {
            key: d.join("mirror.key"),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mirror.key") && e.contains("does not match"),
            "{e}"
        );

        let e = Identity::load(&TlsFiles {
            peer_name: "10.0.0.1".into(),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("peer name"), "{e}");
    }
}
