//! TLS credentials for the NBD server, taken as QEMU's `tls-creds-x509`
//! object takes them: `--object tls-creds-x509,id=ID,dir=DIR` where DIR
//! holds `ca-cert.pem`, `server-cert.pem` and `server-key.pem`.
//!
//! With `verify-peer=on` (QEMU's default) a client must present a
//! certificate that `ca-cert.pem` signed; `verify-peer=off` asks for
//! none. The server runs in QEMU's only mode, "TLS required": once it
//! has credentials, a client gets nothing but `NBD_OPT_STARTTLS` and
//! `NBD_OPT_ABORT` before the TLS handshake (`mod.rs`, `handshake`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// The file names QEMU's `tls-creds-x509` reads for `endpoint=server`.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// `tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]`
/// as parsed, not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredsSpec {
    pub id: String,
    pub dir: PathBuf,
    pub verify_peer: bool,
}

impl CredsSpec {
    /// Parses QEMU's `-object` syntax for the one type qblk knows.
    /// Values cannot hold a comma (QEMU's `,,` escape is not taken).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or("");
        let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
        if kind != "tls-creds-x509" {
            return Err(format!(
                "object type '{kind}' is not supported: qblk knows only tls-creds-x509"
            ));
        }
        let (mut id, mut dir, mut verify_peer) = (None, None, true);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                return Err(format!(
                    "'{p}' is not KEY=VALUE (values cannot hold a comma)"
                ));
            };
            match k {
                "id" => id = Some(v.to_owned()),
                "dir" => dir = Some(PathBuf::from(v)),
                "endpoint" => {
                    if v != "server" {
                        return Err(format!(
                            "endpoint={v}: qblk's credentials serve its NBD server only (endpoint=server)"
                        ));
                    }
                }
                "verify-peer" => {
                    verify_peer = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(format!("verify-peer={v}: give on or off")),
                    }
                }
                _ => {
                    return Err(format!(
                        "'{k}' is not supported: give id, dir, endpoint=server and verify-peer"
                    ));
                }
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .ok_or("tls-creds-x509 needs id=ID")?;
        let dir = dir
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or("tls-creds-x509 needs dir=DIR")?;
        Ok(Self {
            id,
            dir,
            verify_peer,
        })
    }
}

/// Credentials read and checked: the server's TLS configuration.
pub struct TlsCreds {
    pub spec: CredsSpec,
    pub(crate) config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("spec", &self.spec)
            .finish()
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Reads the directory's PEM files and builds the TLS configuration.
    pub fn load(spec: CredsSpec) -> Result<Self, String> {
        let id = &spec.id;
        let inner = || -> Result<ServerConfig, String> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let chain = certs(&spec.dir.join(SERVER_CERT))?;
            let key_path = spec.dir.join(SERVER_KEY);
            let key_bytes =
                std::fs::read(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&key_bytes)
                .map_err(|e| format!("{}: no PEM private key: {e}", key_path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            let ca_path = spec.dir.join(CA_CERT);
            for c in certs(&ca_path)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", ca_path.display()))?;
            }
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let builder = if spec.verify_peer {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("{}: {e}", ca_path.display()))?;
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            builder
                .with_single_cert(chain, key)
                .map_err(|e| format!("{SERVER_CERT} and {SERVER_KEY}: {e}"))
        };
        let config = inner().map_err(|m| format!("TLS credentials '{id}': {m}"))?;
        Ok(Self {
            spec,
            config: Arc::new(config),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_object_syntax_is_parsed_and_bad_input_refused() {
        let s = CredsSpec::parse("tls-creds-x509,id=tls0,dir=/etc/pki/qblk,endpoint=server")
            .expect("parses");
        assert_eq!(s.id, "tls0");
        assert_eq!(s.dir, Path::new("/etc/pki/qblk"));
        assert!(s.verify_peer);
        let s = CredsSpec::parse("tls-creds-x509,id=a,dir=d,verify-peer=off").expect("parses");
        assert!(!s.verify_peer);
        for bad in [
            "tls-creds-psk,id=a,dir=d",
            "tls-creds-x509,id=a,dir=d,endpoint=client",
            "tls-creds-x509,dir=d",
            "tls-creds-x509,id=a",
            "tls-creds-x509,id=a,dir=d,priority=NORMAL",
            "tls-creds-x509,id=a,dir=d,verify-peer=maybe",
            "tls-creds-x509,id=a,dir=d,x",
        ] {
            assert!(CredsSpec::parse(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn a_directory_without_the_files_is_refused_with_the_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let spec = CredsSpec {
            id: "tls0".into(),
            dir: d.path().into(),
            verify_peer: true,
        };
        let e = TlsCreds::load(spec).expect_err("no files");
        assert!(e.contains("server-cert.pem"), "{e}");
        std::fs::write(d.path().join(SERVER_CERT), "not PEM").expect("write");
        std::fs::write(d.path().join(SERVER_KEY), "not PEM").expect("write");
        std::fs::write(d.path().join(CA_CERT), "not PEM").expect("write");
        let spec = CredsSpec {
            id: "tls0".into(),
            dir: d.path().into(),
            verify_peer: true,
        };
        let e = TlsCreds::load(spec).expect_err("no PEM");
        assert!(e.contains("server-cert.pem"), "{e}");
    }
}
