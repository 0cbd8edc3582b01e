//! TLS origination (`upstream_tls` on an `l7` rule): a plain HTTP client's requests leave as HTTPS, from the
//! group's egress IP to the destination's `upstream_port`, with rustls. The server is always verified (the rule's
//! `upstream_ca`, else the system's roots in /etc/ssl/certs) against `upstream_sni`, else the connection's Host;
//! `mutual` presents the rule's client certificate.
//!
//! Client configurations are built once per policy generation and rule (so a reload re-reads the files) and
//! shared by that rule's connections. A failure (a file that no longer loads, a handshake that fails) answers the
//! client `502` with the reason and writes an audit line.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use dataplane::policy::l7::UpstreamTls;
use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Where Debian keeps the system's CA bundle.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Largest PEM file read (a CA bundle of the whole web is ~200 KiB).
const MAX_PEM_BYTES: u64 = 4 << 20;

/// A PEM file's bytes: a regular file of at most [`MAX_PEM_BYTES`] (a path to /dev/zero or a FIFO must not hang
/// `check` or a reload).
fn read_pem(path: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path}: not a regular file"));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!("{path}: {} bytes, more than a PEM file of {MAX_PEM_BYTES}", meta.len()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES).read_to_end(&mut bytes))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(bytes)
}

/// The certificates of a PEM file (at least one).
pub fn load_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_pem(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(&read_pem(path)?).map_err(|e| format!("{path}: {e}"))
}

/// Key exchange groups offered, in order: the first is the key share of a first ClientHello.
///
/// rustls's ring provider puts P-384 first, and ring computes a P-384 key share without a precomputed table: one
/// took 40 % of the L7 thread in the origination benchmark (and rustls keeps offering the group a server last
/// chose, so the first connection decides for all the next). X25519 is several times cheaper, and every TLS 1.3
/// server supports it; P-256 and P-384 stay offered for servers that want them.
const KEY_EXCHANGE_GROUPS: [&dyn rustls::crypto::SupportedKxGroup; 3] = [
    rustls::crypto::ring::kx_group::X25519,
    rustls::crypto::ring::kx_group::SECP256R1,
    rustls::crypto::ring::kx_group::SECP384R1,
];

/// ring, as for the rest of egressd's crypto, with [`KEY_EXCHANGE_GROUPS`].
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    // rustls 0.23.48 marks the ring provider deprecated for lacking post-quantum key exchange; the classical
    // groups interoperate with every server.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    rustls::crypto::CryptoProvider { kx_groups: KEY_EXCHANGE_GROUPS.to_vec(), ..provider }
}

/// A rustls client configuration for `tls`.
pub fn client_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let ca = tls.ca_file.as_deref().unwrap_or(SYSTEM_ROOTS);
    let (added, _) = roots.add_parsable_certificates(load_certificates(ca)?);
    if added == 0 {
        return Err(format!("{ca}: no usable CA certificate"));
    }
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (tls.mutual, &tls.cert_file, &tls.key_file) {
        (true, Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certificates(cert)?, load_key(key)?)
            .map_err(|e| format!("client certificate {cert}: {e}"))?,
        (true, _, _) => return Err("mutual TLS needs upstream_cert and upstream_key".into()),
        (false, _, _) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Client configurations by policy generation and owner (a rule, or a service's subset: the driver's key); older
/// generations are dropped when a new one is asked.
#[derive(Default)]
pub struct Configs {
    generation: u64,
    by_owner: HashMap<(u32, u32, u32), Result<Arc<ClientConfig>, String>>,
}

impl Configs {
    pub fn get(
        &mut self,
        generation: u64,
        owner: (u32, u32, u32),
        tls: &UpstreamTls,
    ) -> Result<Arc<ClientConfig>, String> {
        if generation != self.generation {
            self.generation = generation;
            self.by_owner.clear();
        }
        self.by_owner.entry(owner).or_insert_with(|| client_config(tls)).clone()
    }
}

/// An upstream connection: the kernel TCP socket, with TLS on top when egressd originates it.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Upstream {
    /// Starts TLS on a connected socket for `server_name` (sent as SNI and verified).
    pub fn start_tls(self, config: Arc<ClientConfig>, server_name: &str) -> Result<Upstream, String> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name}: {e}"))?;
        let conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        Ok(Upstream::Tls(Box::new(StreamOwned::new(conn, self.into_tcp()))))
    }

    fn into_tcp(self) -> TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(s) => s.sock,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(s) => &s.sock,
        }
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(s) => &mut s.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Upstream::Tls(_))
    }

    /// Whether the TLS handshake is still going (nothing of the server's has been read yet).
    pub fn is_handshaking(&self) -> bool {
        matches!(self, Upstream::Tls(s) if s.conn.is_handshaking())
    }

    /// Whether TLS still has something to do before a half-close may follow: the handshake (plaintext written
    /// during it waits in rustls), or records not yet taken by the socket. A `close_notify` sent earlier would end
    /// the session before the request it follows.
    pub fn has_pending_output(&self) -> bool {
        matches!(self, Upstream::Tls(s) if s.conn.is_handshaking() || s.conn.wants_write())
    }

    /// Sends what TLS still holds (records written but not yet taken by the socket).
    pub fn flush_tls(&mut self) -> std::io::Result<()> {
        if let Upstream::Tls(s) = self {
            while s.conn.wants_write() {
                s.conn.write_tls(&mut s.sock)?;
            }
        }
        Ok(())
    }

    /// No more bytes from us: TLS `close_notify`, then the socket's FIN.
    pub fn shutdown_write(&mut self) {
        if let Upstream::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = self.flush_tls();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }

    pub fn shutdown_both(&mut self) {
        let _ = self.tcp().shutdown(Shutdown::Both);
    }
}

impl Read for Upstream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Upstream::Plain(s) => s.read(buf),
            Upstream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Upstream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Upstream::Plain(s) => s.write(buf),
            Upstream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Upstream::Plain(s) => s.flush(),
            Upstream::Tls(s) => s.flush(),
        }
    }
}
