//! TLS on the gRPC port, for clusters without a mesh to encrypt and authenticate reports.
//!
//! `--grpc-tls-cert` + `--grpc-tls-key` -> the gRPC server speaks TLS only; `--grpc-tls-ca` as
//! well -> every client (gateway, KEDA, another replica) must present a certificate that CA
//! signed, and a follower forwards to the leader over TLS, verifying the leader's certificate
//! against the same CA and `--grpc-tls-server-name`, and presenting its own certificate. This is
//! the layout of a cert-manager `Certificate` secret (`tls.crt`, `tls.key`, `ca.crt`); the
//! certificate needs both server and client authentication in its extended key usage.
//!
//! files -> [`GrpcTls::load`] at start (a bad file stops the start, naming its flag) ->
//! [`GrpcTls::reload`] every `--grpc-tls-reload-every` -> the server config each new
//! connection's handshake uses ([`GrpcTls::incoming`]) and the client config each new forwarding
//! stream uses ([`GrpcTls::client_config`]).
//!
//! Certificates are renewed while the service runs (cert-manager renews at two thirds of their
//! life and kubelet rewrites the mounted Secret), so the files are read again on a timer and a
//! change applies to new connections; open connections keep the session they negotiated. A
//! change that does not load (say the certificate is new and the key not yet) keeps the last
//! good set, logs the flag and the reason, is counted, and is tried again once the files change
//! again. Reading is a timer rather than inotify because kubelet swaps a symlinked directory,
//! which file watches follow badly, and three small reads every few seconds cost nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_cert::der::Decode;

/// A client that connects and never finishes its handshake is let go after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections waiting for the gRPC server to take them.
const ACCEPTED_BUFFER: usize = 64;

/// The gRPC port's TLS: what its files hold now, and how they fared.
#[derive(Debug)]
pub struct GrpcTls {
    paths: TlsPaths,
    server_name: String,
    current: RwLock<Loaded>,
    /// The bytes last read, loaded or not (`None`: unreadable), so a change is tried once.
    tried: Mutex<Option<TlsFiles>>,
    /// Grows with each set of files applied: a client built before holds old ones.
    generation: AtomicU64,
    counters: TlsCounters,
}

#[derive(Debug, Clone)]
struct TlsPaths {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Loaded {
    server: Arc<ServerConfig>,
    /// How a follower reaches the leader; `None` without a CA to verify it by.
    client: Option<ClientTlsConfig>,
    expiry: Expiry,
}

/// When what was loaded stops being valid, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expiry {
    /// The serving certificate (the first of `--grpc-tls-cert`).
    cert: i64,
    /// The first of `--grpc-tls-ca`'s certificates to expire.
    ca: Option<i64>,
}

/// TLS counters, on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct TlsCounters {
    /// Files re-read after they changed, by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Connections refused in the handshake, by reason.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// The `notAfter` of the files in use, by file: alerts fire on this when renewal stalls,
    /// whatever the reason (cert-manager's own metric describes the Secret, not what this
    /// process serves).
    pub expiry: Family<ExpiryLabels, Gauge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ExpiryLabels {
    /// `cert` (`--grpc-tls-cert`) or `ca` (`--grpc-tls-ca`, its earliest).
    pub file: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied`, or `failed` (the previous files stay in use).
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `certificate` (the client's is missing, expired or not from the CA), `protocol` (not
    /// TLS, or nothing in common), `timeout` (no handshake within [`HANDSHAKE_TIMEOUT`]) or
    /// `io` (the connection failed).
    pub reason: &'static str,
}

/// A TLS flag that cannot work, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--{flag} is required with --{with}")]
    Missing {
        flag: &'static str,
        with: &'static str,
    },
    #[error("--{flag} = {path}: {source}")]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--{flag} = {path}: {what}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        what: String,
    },
}

/// The TLS flags, as given.
#[derive(Debug, Clone, Copy)]
pub struct TlsFlags<'a> {
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub ca: Option<&'a Path>,
    pub server_name: &'a str,
}

impl GrpcTls {
    /// `None` when no TLS flag is given: the gRPC port is plaintext.
    pub fn load(flags: TlsFlags<'_>) -> Result<Option<GrpcTls>, TlsError> {
        let (cert, key) = match (flags.cert, flags.key, flags.ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), _) => (cert, key),
            (None, _, _) => {
                let with = if flags.key.is_some() {
                    "grpc-tls-key"
                } else {
                    "grpc-tls-ca"
                };
                return Err(TlsError::Missing {
                    flag: "grpc-tls-cert",
                    with,
                });
            }
            (Some(_), None, _) => {
                return Err(TlsError::Missing {
                    flag: "grpc-tls-key",
                    with: "grpc-tls-cert",
                });
            }
        };
        let paths = TlsPaths {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: flags.ca.map(Path::to_owned),
        };
        let files = paths.read()?;
        let loaded = paths.build(&files, flags.server_name)?;
        let tls = GrpcTls {
            paths,
            server_name: flags.server_name.to_owned(),
            current: RwLock::new(loaded.clone()),
            tried: Mutex::new(Some(files)),
            generation: AtomicU64::new(0),
            counters: TlsCounters::default(),
        };
        tls.in_use(&loaded);
        Ok(Some(tls))
    }

    /// Reads the files again: `Ok(true)` if they changed and now serve new connections,
    /// `Ok(false)` if they are as last tried, `Err` (the previous set stays) if they changed and
    /// do not load. A fault is reported once, not on every read until it is fixed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let read = self.paths.read();
        {
            let mut tried = self.tried.lock().unwrap_or_else(PoisonError::into_inner);
            let same = match (&read, &*tried) {
                (Ok(files), Some(last)) => files == last,
                (Err(_), None) => true,
                _ => false,
            };
            if same {
                return Ok(false);
            }
            *tried = read.as_ref().ok().cloned();
        }
        match read.and_then(|files| self.paths.build(&files, &self.server_name)) {
            Ok(loaded) => {
                self.in_use(&loaded);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded;
                self.generation.fetch_add(1, Ordering::Relaxed);
                self.count_reload("applied");
                Ok(true)
            }
            Err(error) => {
                self.count_reload("failed");
                Err(error)
            }
        }
    }

    /// Reloads every `every` until `stop` resolves, logging what changed.
    pub async fn reload_every(&self, every: Duration, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload() {
                Ok(true) => tracing::info!("gRPC TLS files changed; new connections use them"),
                Ok(false) => {}
                Err(error) => tracing::warn!(
                    %error,
                    "gRPC TLS files do not load; new connections keep the previous ones"
                ),
            }
        }
    }

    /// The server side, for the next handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.loaded().server
    }

    /// Which set of files is in use: a client built under another holds old ones.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// How a follower reaches the leader now; `None` without `--grpc-tls-ca`.
    pub fn client_config(&self) -> Option<ClientTlsConfig> {
        self.loaded().client
    }

    pub fn counters(&self) -> &TlsCounters {
        &self.counters
    }

    fn loaded(&self) -> Loaded {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes the expiry of what now serves, and warns if it already has expired: every
    /// client that checks it will refuse it until the files are renewed.
    fn in_use(&self, loaded: &Loaded) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        let ca = loaded.expiry.ca.zip(self.paths.ca.as_ref());
        let files = [
            ("cert", Some((loaded.expiry.cert, &self.paths.cert))),
            ("ca", ca),
        ];
        for (file, in_use) in files {
            let Some((not_after, path)) = in_use else {
                continue;
            };
            self.counters
                .expiry
                .get_or_create(&ExpiryLabels { file })
                .set(not_after);
            if not_after <= now {
                tracing::warn!(
                    flag = %format!("grpc-tls-{file}"),
                    path = %path.display(),
                    expired_seconds_ago = now - not_after,
                    "the gRPC TLS certificate in use has expired; clients that check it refuse it"
                );
            }
        }
    }

    fn count_reload(&self, result: &'static str) {
        self.counters
            .reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// TLS connections from accepted TCP ones, each handshake on a task of its own (with the
    /// config current when it was accepted) so a slow client holds up nobody. Failed handshakes
    /// are counted and dropped; accept errors pass through, for tonic to judge as it does
    /// without TLS.
    pub fn incoming(
        self: Arc<Self>,
        mut tcp: impl futures::Stream<Item = io::Result<TcpStream>> + Send + Unpin + 'static,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (accepted, incoming) = mpsc::channel(ACCEPTED_BUFFER);
        tokio::spawn(async move {
            let mut handshakes = JoinSet::new();
            loop {
                tokio::select! {
                    () = accepted.closed() => return,
                    connection = tcp.next() => match connection {
                        None => return,
                        Some(Ok(stream)) => {
                            let acceptor = TlsAcceptor::from(self.server_config());
                            handshakes.spawn(tokio::time::timeout(
                                HANDSHAKE_TIMEOUT,
                                acceptor.accept(stream),
                            ));
                        }
                        Some(Err(error)) => {
                            if accepted.send(Err(error)).await.is_err() {
                                return;
                            }
                        }
                    },
                    Some(done) = handshakes.join_next() => {
                        let failed = match done {
                            Ok(Ok(Ok(stream))) => {
                                if accepted.send(Ok(stream)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            Ok(Ok(Err(error))) => {
                                tracing::debug!(%error, "gRPC TLS handshake failed");
                                handshake_failure(&error)
                            }
                            Ok(Err(_elapsed)) => "timeout",
                            // Only a panic in rustls ends a handshake task otherwise.
                            Err(_) => "io",
                        };
                        self.counters
                            .handshake_failures
                            .get_or_create(&HandshakeLabels { reason: failed })
                            .inc();
                    }
                }
            }
        });
        ReceiverStream::new(incoming)
    }
}

/// The `reason` label of a failed handshake.
fn handshake_failure(error: &io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            "certificate"
        }
        // The client ended the handshake: most often it refused this server's certificate (an
        // expired one, a CA rotated on one side first, a name it does not find in it).
        Some(rustls::Error::AlertReceived(_)) => "refused_by_client",
        Some(_) => "protocol",
        None => "io",
    }
}

impl TlsPaths {
    fn read(&self) -> Result<TlsFiles, TlsError> {
        Ok(TlsFiles {
            cert: read_pem("grpc-tls-cert", &self.cert, "CERTIFICATE")?,
            key: read_pem("grpc-tls-key", &self.key, "PRIVATE KEY")?,
            ca: match &self.ca {
                Some(ca) => Some(read_pem("grpc-tls-ca", ca, "CERTIFICATE")?),
                None => None,
            },
        })
    }

    /// Both sides' configs from `files`, each fault named by its flag.
    fn build(&self, files: &TlsFiles, server_name: &str) -> Result<Loaded, TlsError> {
        let invalid = |flag, path: &Path| {
            let path = path.to_owned();
            move |what: String| TlsError::Invalid { flag, path, what }
        };
        let chain = CertificateDer::pem_slice_iter(&files.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("grpc-tls-cert", &self.cert)(e.to_string()))?;
        let cert_expiry = chain
            .first()
            .ok_or_else(|| "holds no certificate".to_owned())
            .and_then(not_after)
            .map_err(invalid("grpc-tls-cert", &self.cert))?;
        let mut ca_expiry = None;
        let key = PrivateKeyDer::from_pem_slice(&files.key)
            .map_err(|e| invalid("grpc-tls-key", &self.key)(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("grpc-tls-cert", &self.cert)(e.to_string()))?;
        let (builder, client) = match (&files.ca, &self.ca) {
            (Some(ca), Some(ca_path)) => {
                let to_error = invalid("grpc-tls-ca", ca_path);
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| to_error.clone()(e.to_string()))?;
                    let expires = not_after(&cert).map_err(to_error.clone())?;
                    ca_expiry =
                        Some(ca_expiry.map_or(expires, |soonest: i64| soonest.min(expires)));
                    roots
                        .add(cert)
                        .map_err(|e| to_error.clone()(e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| to_error(e.to_string()))?;
                let client = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(&files.cert, &files.key))
                    .domain_name(server_name);
                (builder.with_client_cert_verifier(verifier), Some(client))
            }
            _ => (builder.with_no_client_auth(), None),
        };
        let mut server = builder.with_single_cert(chain, key).map_err(|e| {
            invalid("grpc-tls-cert", &self.cert)(format!(
                "with --grpc-tls-key {}: {e}",
                self.key.display()
            ))
        })?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Loaded {
            server: Arc::new(server),
            client,
            expiry: Expiry {
                cert: cert_expiry,
                ca: ca_expiry,
            },
        })
    }
}

/// A certificate's `notAfter`, in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let parsed = x509_cert::Certificate::from_der(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let not_after = parsed.tbs_certificate.validity.not_after.to_unix_duration();
    Ok(i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX))
}

/// The file's bytes, if it holds at least one PEM block whose label ends with `label`.
fn read_pem(flag: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Unreadable {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|found| found.ends_with(label))
    });
    if !found {
        return Err(TlsError::Invalid {
            flag,
            path: path.to_owned(),
            what: format!("no PEM block ending in {label:?}"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn flags<'a>(cert: Option<&'a str>, key: Option<&'a str>, ca: Option<&'a str>) -> TlsFlags<'a> {
        TlsFlags {
            cert: cert.map(Path::new),
            key: key.map(Path::new),
            ca: ca.map(Path::new),
            server_name: "flyball-control",
        }
    }

    fn test_cert(name: &str) -> PathBuf {
        [env!("CARGO_MANIFEST_DIR"), "tests", "tls", name]
            .iter()
            .collect()
    }

    /// A directory of its own holding `replica.crt`, `replica.key` and `ca.crt`.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("flyball-tls-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let dir = Dir(dir);
            for name in ["replica.crt", "replica.key", "ca.crt"] {
                dir.copy(name, name);
            }
            dir
        }

        fn path(&self, name: &str) -> String {
            self.0.join(name).to_str().unwrap().to_owned()
        }

        fn copy(&self, from: &str, to: &str) {
            std::fs::copy(test_cert(from), self.0.join(to)).unwrap();
        }

        fn load(&self) -> GrpcTls {
            let (cert, key, ca) = (
                self.path("replica.crt"),
                self.path("replica.key"),
                self.path("ca.crt"),
            );
            GrpcTls::load(flags(Some(&cert), Some(&key), Some(&ca)))
                .unwrap()
                .unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn reloads(tls: &GrpcTls, result: &'static str) -> u64 {
        tls.counters()
            .reloads
            .get_or_create(&ReloadLabels { result })
            .get()
    }

    fn expiry(tls: &GrpcTls, file: &'static str) -> i64 {
        tls.counters()
            .expiry
            .get_or_create(&ExpiryLabels { file })
            .get()
    }

    /// `notAfter` of the test certificates (`openssl x509 -noout -enddate -in ...`).
    const REPLICA_AND_CA_EXPIRE: i64 = 4_949_170_715;
    const NEXT_AND_NEXT_CA_EXPIRE: i64 = 4_949_170_716;

    #[test]
    fn the_expiry_of_the_files_in_use_is_published() {
        let dir = Dir::new("expiry");
        let tls = dir.load();
        assert_eq!(expiry(&tls, "cert"), REPLICA_AND_CA_EXPIRE);
        assert_eq!(expiry(&tls, "ca"), REPLICA_AND_CA_EXPIRE);

        // Half a renewal does not load, so what serves, and its expiry, stay.
        dir.copy("next.crt", "replica.crt");
        tls.reload().unwrap_err();
        assert_eq!(expiry(&tls, "cert"), REPLICA_AND_CA_EXPIRE);

        dir.copy("next.key", "replica.key");
        let bundle = [test_cert("next-ca.crt"), test_cert("ca.crt")]
            .map(|path| std::fs::read_to_string(path).unwrap())
            .concat();
        std::fs::write(dir.path("ca.crt"), bundle).unwrap();
        assert!(tls.reload().unwrap());
        assert_eq!(expiry(&tls, "cert"), NEXT_AND_NEXT_CA_EXPIRE);
        assert_eq!(
            expiry(&tls, "ca"),
            REPLICA_AND_CA_EXPIRE,
            "the soonest of the bundle"
        );

        dir.copy("next-ca.crt", "ca.crt");
        assert!(tls.reload().unwrap());
        assert_eq!(expiry(&tls, "ca"), NEXT_AND_NEXT_CA_EXPIRE);
    }

    #[test]
    fn without_flags_the_port_is_plaintext() {
        assert!(GrpcTls::load(flags(None, None, None)).unwrap().is_none());
    }

    #[test]
    fn a_flag_without_its_partner_names_the_missing_one() {
        let only_cert = GrpcTls::load(flags(Some("c"), None, None)).unwrap_err();
        assert_eq!(
            only_cert.to_string(),
            "--grpc-tls-key is required with --grpc-tls-cert"
        );
        let only_ca = GrpcTls::load(flags(None, None, Some("ca"))).unwrap_err();
        assert_eq!(
            only_ca.to_string(),
            "--grpc-tls-cert is required with --grpc-tls-ca"
        );
    }

    #[test]
    fn a_file_that_is_not_there_or_not_pem_is_named() {
        let missing = GrpcTls::load(flags(Some("/no/such/cert.pem"), Some("k"), None)).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("--grpc-tls-cert = /no/such/cert.pem: "),
            "{missing}"
        );
        let dir = Dir::new("not-pem");
        let path = dir.path("cert.pem");
        std::fs::write(&path, "hello").unwrap();
        let invalid = GrpcTls::load(flags(Some(&path), Some(&path), None)).unwrap_err();
        assert_eq!(
            invalid.to_string(),
            format!("--grpc-tls-cert = {path}: no PEM block ending in \"CERTIFICATE\"")
        );
    }

    #[test]
    fn unchanged_files_are_not_reloaded() {
        let dir = Dir::new("unchanged");
        let tls = dir.load();
        let before = tls.server_config();
        assert!(!tls.reload().unwrap());
        assert!(Arc::ptr_eq(&before, &tls.server_config()));
        assert_eq!(reloads(&tls, "applied") + reloads(&tls, "failed"), 0);
    }

    #[test]
    fn changed_files_serve_new_connections() {
        let dir = Dir::new("changed");
        let tls = dir.load();
        let before = tls.server_config();
        dir.copy("next.crt", "replica.crt");
        dir.copy("next.key", "replica.key");
        dir.copy("next-ca.crt", "ca.crt");
        assert!(tls.reload().unwrap());
        assert!(!Arc::ptr_eq(&before, &tls.server_config()));
        assert_eq!(reloads(&tls, "applied"), 1);
        assert!(!tls.reload().unwrap(), "the same files again");
        assert_eq!(reloads(&tls, "applied"), 1);
    }

    #[test]
    fn a_change_that_does_not_load_keeps_the_last_good_files_and_is_reported_once() {
        let dir = Dir::new("half-rotated");
        let tls = dir.load();
        let before = tls.server_config();
        // The certificate is new, its key not yet.
        dir.copy("next.crt", "replica.crt");
        let error = tls.reload().unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "--grpc-tls-cert = {}: with --grpc-tls-key",
                dir.path("replica.crt")
            )),
            "{error}"
        );
        assert!(Arc::ptr_eq(&before, &tls.server_config()));
        assert!(!tls.reload().unwrap(), "reported once");
        assert_eq!(reloads(&tls, "failed"), 1);

        // A file gone is reported once too, and its return loads.
        std::fs::remove_file(dir.path("replica.key")).unwrap();
        assert!(
            tls.reload()
                .unwrap_err()
                .to_string()
                .starts_with("--grpc-tls-key = ")
        );
        assert!(!tls.reload().unwrap());
        assert_eq!(reloads(&tls, "failed"), 2);
        dir.copy("next.key", "replica.key");
        dir.copy("next-ca.crt", "ca.crt");
        assert!(tls.reload().unwrap());
        assert!(!Arc::ptr_eq(&before, &tls.server_config()));
        assert_eq!(reloads(&tls, "applied"), 1);
    }
}
