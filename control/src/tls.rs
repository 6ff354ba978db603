//! TLS on the gRPC port, for clusters without a mesh to encrypt and authenticate reports.
//!
//! `--grpc-tls-cert` + `--grpc-tls-key` -> the gRPC server speaks TLS only; `--grpc-tls-ca` as
//! well -> every client (gateway, KEDA, another replica) must present a certificate that CA
//! signed, and a follower forwards to the leader over TLS, verifying the leader's certificate
//! against the same CA and `--grpc-tls-server-name`, and presenting its own certificate. This is
//! the layout of a cert-manager `Certificate` secret (`tls.crt`, `tls.key`, `ca.crt`); the
//! certificate needs both server and client authentication in its extended key usage.
//!
//! Files are read once, at start; a bad one stops the service with the flag that named it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The gRPC port's TLS settings, read from their files.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    pub server: ServerTlsConfig,
    /// How a follower reaches the leader; `None` without a CA to verify it by.
    pub client: Option<ClientTlsConfig>,
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
        source: std::io::Error,
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
        let (cert_path, key_path) = match (flags.cert, flags.key, flags.ca) {
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
        let cert = read_pem("grpc-tls-cert", cert_path, "CERTIFICATE")?;
        let key = read_pem("grpc-tls-key", key_path, "PRIVATE KEY")?;
        let identity = Identity::from_pem(&cert, &key);
        let mut server = ServerTlsConfig::new().identity(identity.clone());
        let mut client = None;
        if let Some(ca_path) = flags.ca {
            let ca = Certificate::from_pem(read_pem("grpc-tls-ca", ca_path, "CERTIFICATE")?);
            server = server.client_ca_root(ca.clone());
            client = Some(
                ClientTlsConfig::new()
                    .ca_certificate(ca)
                    .identity(identity)
                    .domain_name(flags.server_name),
            );
        }
        // tonic checks the certificate and key only when the server is built: check them now,
        // so a bad file stops the start with its flag, not the first connection.
        tonic::transport::Server::builder()
            .tls_config(server.clone())
            .map_err(|e| TlsError::Invalid {
                flag: "grpc-tls-cert",
                path: cert_path.to_owned(),
                what: format!("with --grpc-tls-key {}: {e}", key_path.display()),
            })?;
        Ok(Some(GrpcTls { server, client }))
    }
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
        let dir = std::env::temp_dir().join(format!("flyball-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("cert.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let path = not_pem.to_str().unwrap();
        let invalid = GrpcTls::load(flags(Some(path), Some(path), None)).unwrap_err();
        assert_eq!(
            invalid.to_string(),
            format!("--grpc-tls-cert = {path}: no PEM block ending in \"CERTIFICATE\"")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
