//! QUIC endpoints between imezzo nodes: mutual TLS 1.3 where each side pins the other's
//! [`NodeId`] instead of trusting a certificate authority.
//!
//! - The client accepts a server only if the SHA-256 of the server's certificate is the
//!   `--server-id` it was given, and the server proves it holds that certificate's key (the
//!   handshake signature is checked against it).
//! - The server demands a client certificate and accepts it only if its id is in `--allow`.
//! - Both refusals carry a message to the other side: the refusing side's TLS error travels in
//!   the QUIC CONNECTION_CLOSE, so the refused operator reads what to change.
//!
//! Session resumption and 0-RTT are off: a resumed session skips the certificate check, and
//! every connection must be checked against the pins in force now.

use std::{
    collections::HashSet,
    fmt, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Deref,
    sync::{Arc, Mutex},
    time::Duration,
};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::SingleCertAndKey,
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::{Identity, NodeId, CERT_NAME};

/// The ALPN protocol both sides must offer; a peer speaking anything else is refused in the
/// handshake.
pub const ALPN: &[u8] = b"imezzo/1";
/// Bytes a peer may send on one stream before we read them: one large file's range must not
/// stall on a LAN's bandwidth-delay product (10 Gbit/s at 10 ms is 12.5 MB).
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Bytes a peer may have in flight over all streams of a connection.
pub const RECEIVE_WINDOW: u32 = 64 << 20;
/// Bytes we buffer for sending over all streams of a connection.
pub const SEND_WINDOW: u64 = 64 << 20;
/// A silent connection is probed this often, so NAT bindings and the idle timer stay fresh,
/// and so a peer restarted on the same address answers with a stateless reset within a
/// second rather than after the silence timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A peer that answers nothing for this long is gone; it also bounds a connection attempt.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// What a client may send the server on one stream before the server reads it: clients send
/// only requests and acks (frames of at most 1 MiB), so the server's windows are small and a
/// client's connection costs the server little however it behaves.
pub const SERVER_STREAM_RECEIVE_WINDOW: u32 = 2 << 20;
/// What a client may have in flight to the server over all streams of a connection.
pub const SERVER_RECEIVE_WINDOW: u32 = 8 << 20;
/// Streams a peer may have open at once: initial sync fetches many files in parallel, each on
/// its own stream.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The largest UDP payload path MTU discovery probes for, and the largest this endpoint
/// accepts (the peer's probes are bounded by the latter). quinn's default, 1452, caps a
/// loopback or jumbo-frame link at Ethernet's size; above 6550 it breaks: quinn hands the
/// kernel up to 10 datagrams per segmentation-offload send, and a send over 64 KiB fails
/// (EMSGSIZE, dropped silently by quinn-udp), which quinn then takes for a black hole and
/// falls back to 1200-byte datagrams for a minute. On a path with a smaller MTU, the probes
/// above it are lost and the search settles below (lost probes do not shrink the congestion
/// window). Measured on loopback, one 1 GiB stream: about twice the rate and half the CPU
/// per byte of quinn's defaults.
pub const MAX_UDP_PAYLOAD: u16 = 6550;

/// The congestion window a connection starts with. quinn's default (14 720 bytes, ten
/// Ethernet-sized datagrams) is filled by the first path MTU probes up to
/// [`MAX_UDP_PAYLOAD`] right after the handshake, and quinn 0.11 holds a close packet for
/// congestion control like data (quinn-rs/quinn#2785): a server that closed on a client's
/// first message then never sent the close, dropped the connection three timeouts later
/// and answered the client with a stateless reset, so the client never learnt why. Ten of
/// the largest datagrams leave room for the probes and the close.
const INITIAL_WINDOW: u64 = 10 * MAX_UDP_PAYLOAD as u64;

/// The UDP socket buffers asked for, each way (see [`bind`]).
const SOCKET_BUFFER: usize = 4 << 20;

/// TLS alert descriptions (RFC 8446 6.2) that mean "your certificate is not accepted".
const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 116];
/// TLS alert no_application_protocol: the peer does not speak [`ALPN`].
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// Why a connection could not be made or was refused. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "refused the server at {addr}: server presented node id {presented}, expected \
         {expected}; check --server-id against what `imezzo id --state DIR` prints on the server"
    )]
    WrongServer { addr: SocketAddr, presented: NodeId, expected: NodeId },
    #[error(
        "the server at {addr} refused this node ({reason}); add its id on the server with \
         `--allow {client}`"
    )]
    Refused { addr: SocketAddr, client: NodeId, reason: String },
    #[error(
        "the client at {addr} refused this server ({reason}); give that client this server's id \
         (`imezzo id --state DIR` here) as its --server-id"
    )]
    RefusedByClient { addr: SocketAddr, reason: String },
    #[error("refused the client at {addr}: {reason}; if it is one of ours, add `--allow` with its node id")]
    ClientNotAllowed { addr: SocketAddr, reason: String },
    #[error(
        "the peer at {addr} does not speak imezzo/1 ({reason}): check that the address is an \
         imezzo node of a compatible version"
    )]
    Incompatible { addr: SocketAddr, reason: String },
    #[error(
        "no answer from {addr} within {}s: check the address, that `imezzo server` runs there \
         and that UDP reaches it through any firewall", IDLE_TIMEOUT.as_secs()
    )]
    Unreachable { addr: SocketAddr },
    // Causes are part of the message and not `source()`: the binary prints the whole chain.
    #[error("cannot bind a UDP socket on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: SocketAddr, error: quinn::ConnectError },
    #[error("connection with {addr} failed: {error}")]
    Connection { addr: SocketAddr, error: quinn::ConnectionError },
    #[error("cannot set up TLS with this node's identity: {reason}")]
    Tls { reason: String },
}

fn tls_error(e: impl fmt::Display) -> TransportError {
    TransportError::Tls { reason: e.to_string() }
}

/// The rustls provider every imezzo endpoint uses, built explicitly so that nothing depends on
/// which provider some other crate installed as the process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow control and liveness shared by both sides (see the constants for the reasons).
fn transport_config() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport())
}

/// The server's: the shared settings with the small receive windows above.
fn server_transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport();
    t.stream_receive_window(quinn::VarInt::from_u32(SERVER_STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(SERVER_RECEIVE_WINDOW));
    Arc::new(t)
}

fn base_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtud));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cubic));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32))))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        // No unidirectional streams in the protocol: a peer may open none.
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// The node id of the peer at the other end of an established connection.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|cert| NodeId::of_cert(cert))
}

/// A server endpoint on `listen` that accepts only clients whose node id is in `allowed`.
/// Take connections with `endpoint.accept()` and finish each handshake with [`accept`].
pub fn server_endpoint(
    identity: &Identity,
    listen: SocketAddr,
    allowed: Vec<NodeId>,
) -> Result<quinn::Endpoint, TransportError> {
    let provider = crypto_provider();
    let own = identity.certified_key(&provider).map_err(tls_error)?;
    if allowed.is_empty() {
        log::warn!("no --allow given: this server will refuse every client");
    }
    let verifier = Arc::new(AllowedClients { allowed: allowed.into_iter().collect(), provider: provider.clone() });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(own)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(server_transport_config());
    bind(listen, Some(config)).map_err(|error| TransportError::Bind { addr: listen, error })
}

/// An endpoint on a UDP socket bound to `addr` (dual-stack for an IPv6 address, where the
/// host allows it), accepting datagrams up to [`MAX_UDP_PAYLOAD`].
fn bind(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As quinn's own `Endpoint::client` does: a host that refuses keeps an IPv6-only
        // socket, which still reaches IPv6 peers.
        let _ = socket.set_only_v6(false);
    }
    // Larger datagrams arrive in fewer, larger bursts: the default receive buffer (208 KiB)
    // overflowed under a bulk transfer whose receiver was busy writing, and each drop is a
    // loss to recover from. The kernel caps both at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| io::Error::other(format!("max_udp_payload_size {MAX_UDP_PAYLOAD}: {e:?}")))?;
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(config, server, socket.into(), runtime)
}

/// Completes the handshake of an incoming connection on a [`server_endpoint`], returning the
/// connection and the (allowed) client's node id. Run it in a task per connection, so one slow
/// handshake does not hold up the others.
pub async fn accept(incoming: quinn::Incoming) -> Result<(quinn::Connection, NodeId), TransportError> {
    let addr = incoming.remote_address();
    let conn = incoming.await.map_err(|error| match &error {
        quinn::ConnectionError::ConnectionClosed(close) if is_certificate_alert(close.error_code) => {
            TransportError::RefusedByClient { addr, reason: close_reason(close) }
        }
        // Our own verifier refused the client (and has logged its id).
        quinn::ConnectionError::TransportError(local) if is_certificate_alert(local.code) => {
            TransportError::ClientNotAllowed { addr, reason: refusal_message(&local.reason).to_string() }
        }
        _ => TransportError::Connection { addr, error },
    })?;
    // Client authentication is mandatory, so an established connection always has the id.
    let id = peer_id(&conn).ok_or_else(|| TransportError::Tls {
        reason: format!("the connection from {addr} carries no client certificate"),
    })?;
    Ok((conn, id))
}

/// A client endpoint that presents this node's identity; [`connect`] makes connections from it.
/// Derefs to the [`quinn::Endpoint`] (for `close`, `wait_idle`, `local_addr`).
#[derive(Clone)]
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    id: NodeId,
    own: Arc<SingleCertAndKey>,
    provider: Arc<CryptoProvider>,
    transport: Arc<quinn::TransportConfig>,
}

impl fmt::Debug for ClientEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEndpoint").field("id", &self.id).field("endpoint", &self.endpoint).finish()
    }
}

impl Deref for ClientEndpoint {
    type Target = quinn::Endpoint;

    fn deref(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

impl ClientEndpoint {
    /// This node's id, the one servers must `--allow`.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// TLS for one connection: each pins its own expected server id and reports back which id
    /// a refused server presented.
    fn connection_config(&self, verifier: Arc<PinnedServer>) -> Result<quinn::ClientConfig, TransportError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.own.clone());
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        let quic = QuicClientConfig::try_from(tls).map_err(tls_error)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(self.transport.clone());
        Ok(config)
    }
}

/// A client endpoint on an ephemeral UDP port, dual-stack where the host has IPv6.
pub fn client_endpoint(identity: &Identity) -> Result<ClientEndpoint, TransportError> {
    let provider = crypto_provider();
    let own = identity.certified_key(&provider).map_err(tls_error)?;
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    // A host without IPv6 cannot bind [::]; it can still reach IPv4 servers.
    let endpoint = bind(v6, None)
        .or_else(|_| bind(v4, None))
        .map_err(|error| TransportError::Bind { addr: v4, error })?;
    Ok(ClientEndpoint {
        endpoint,
        id: identity.id,
        own: Arc::new(SingleCertAndKey::from(own)),
        provider,
        transport: transport_config(),
    })
}

/// Connects to the server at `addr`, which must present node id `server_id` and must allow
/// this node. Returns once the server has confirmed the handshake, so a refusal by the server
/// is this function's error rather than a surprise on the first stream.
pub async fn connect(
    endpoint: &ClientEndpoint,
    addr: SocketAddr,
    server_id: NodeId,
) -> Result<quinn::Connection, TransportError> {
    let verifier = Arc::new(PinnedServer {
        expected: server_id,
        presented: Mutex::new(None),
        provider: endpoint.provider.clone(),
    });
    let config = endpoint.connection_config(verifier.clone())?;
    let connecting = endpoint
        .endpoint
        .connect_with(config, addr, CERT_NAME)
        .map_err(|error| TransportError::Connect { addr, error })?;
    let failed = |error: quinn::ConnectionError| {
        let presented = *verifier.presented.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        client_side_error(addr, endpoint.id, server_id, presented, error)
    };
    let conn = connecting.await.map_err(failed)?;
    tokio::select! {
        biased;
        reason = conn.closed() => Err(failed(reason)),
        () = handshake_confirmed(&conn) => Ok(conn),
    }
}

/// Resolves when the server has sent HANDSHAKE_DONE, its word that it verified our certificate
/// (RFC 9001 4.1.2). quinn reports a client connected one flight earlier, as soon as it has
/// sent its own certificate, so without this wait a refusal would surface on the first stream.
/// quinn has no event for it; its frame counters do, and on loopback it comes within a
/// millisecond. A connection that never gets it is ended by the idle timeout.
async fn handshake_confirmed(conn: &quinn::Connection) {
    let mut pause = Duration::from_micros(200);
    while conn.stats().frame_rx.handshake_done == 0 {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

fn client_side_error(
    addr: SocketAddr,
    client: NodeId,
    expected: NodeId,
    presented: Option<NodeId>,
    error: quinn::ConnectionError,
) -> TransportError {
    if let Some(presented) = presented {
        return TransportError::WrongServer { addr, presented, expected };
    }
    match &error {
        quinn::ConnectionError::ConnectionClosed(close) if is_certificate_alert(close.error_code) => {
            TransportError::Refused { addr, client, reason: close_reason(close) }
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if crypto_alert(close.error_code) == Some(NO_APPLICATION_PROTOCOL) =>
        {
            TransportError::Incompatible { addr, reason: close_reason(close) }
        }
        quinn::ConnectionError::TimedOut => TransportError::Unreachable { addr },
        _ => TransportError::Connection { addr, error },
    }
}

/// The TLS alert a CONNECTION_CLOSE carries, if it closed the connection from the handshake
/// (QUIC error codes 0x100..=0x1ff are TLS alerts, RFC 9001 4.8).
fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..=0x1ff).contains(&code).then(|| (code - 0x100) as u8)
}

fn is_certificate_alert(code: quinn::TransportErrorCode) -> bool {
    crypto_alert(code).is_some_and(|alert| CERTIFICATE_ALERTS.contains(&alert))
}

/// The peer's own explanation when it sent one, else the error code.
fn close_reason(close: &quinn::ConnectionClose) -> String {
    let reason = String::from_utf8_lossy(&close.reason);
    if reason.trim().is_empty() {
        close.error_code.to_string()
    } else {
        refusal_message(&reason).to_string()
    }
}

/// A verifier's refusal. rustls sends its text to the peer in the close (so the refused
/// operator reads it) but renders it with `Debug`, hence `Debug` prints the bare message.
struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// `CertificateError::Other` makes the alert certificate_unknown, which tells the peer that its
/// certificate, not the protocol, is what was refused.
fn refused(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(message)))))
}

/// The peer's words out of rustls' rendering of a [`Refusal`],
/// `invalid peer certificate: Other(OtherError(MESSAGE))`; other text is returned whole.
fn refusal_message(reason: &str) -> &str {
    reason.split_once("Other(OtherError(").and_then(|(_, rest)| rest.strip_suffix("))")).unwrap_or(reason)
}

/// Client side: accepts exactly one server certificate, the one whose SHA-256 is `expected`.
/// Names and validity dates are not checked: the pin is the whole of the trust, and every
/// node's certificate has the same name.
#[derive(Debug)]
struct PinnedServer {
    expected: NodeId,
    /// Set when the server presented another id, for [`TransportError::WrongServer`]: the TLS
    /// error itself reaches us only as text.
    presented: Mutex<Option<NodeId>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = NodeId::of_cert(end_entity);
        if presented == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        *self.presented.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(presented);
        Err(refused(format!("server presented node id {presented}, expected {}", self.expected)))
    }

    // rustls calls the signature checks with the certificate accepted above, so they prove the
    // server holds the pinned certificate's key, not merely a copy of the public certificate.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side: demands a client certificate and accepts it only if its id is allowed.
#[derive(Debug)]
struct AllowedClients {
    allowed: HashSet<NodeId>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AllowedClients {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    // No CA names to hint: any certificate may be the one allowed.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = NodeId::of_cert(end_entity);
        if self.allowed.contains(&id) {
            return Ok(ClientCertVerified::assertion());
        }
        // Logged before the client has proved it holds the key: the id is what it claims, and
        // that is what the operator needs to decide whether to --allow it.
        crate::report!(Warn, "server: clients refused for not being in --allow", "refused client {id}: not in --allow (add `--allow {id}` to let it in)");
        Err(refused(format!("node id {id} is not in this server's --allow list")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_message_is_recovered_from_the_rustls_error_text() {
        // Pins how rustls renders a verifier's error: that text is what travels to the peer.
        let text = refused("node id 00 is not in this server's --allow list".to_string()).to_string();
        assert_eq!(refusal_message(&text), "node id 00 is not in this server's --allow list", "{text}");
        assert_eq!(refusal_message("peer sent no certificates"), "peer sent no certificates");
    }

    #[test]
    fn crypto_alerts_are_read_from_quic_error_codes() {
        use quinn::TransportErrorCode as Code;
        assert_eq!(crypto_alert(Code::crypto(46)), Some(46));
        assert!(is_certificate_alert(Code::crypto(46)));
        assert!(!is_certificate_alert(Code::crypto(NO_APPLICATION_PROTOCOL)));
        assert_eq!(crypto_alert(Code::PROTOCOL_VIOLATION), None);
    }
}
