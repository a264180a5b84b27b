//! Connecting to PostgreSQL, with TLS as libpq does it: every connection of hmis-flow goes
//! through [`connect`].
//!
//! ```text
//!  database_url ──► split_url ──► sslmode, sslrootcert  (URL parameters, libpq's names)
//!       │                              │  else the config's database_sslmode / _sslrootcert
//!       ▼                              ▼
//!  tokio-postgres Config  ◄──  rustls ClientConfig (ring): which certificates to accept
//!       │
//!       ▼
//!  tokio_postgres::connect ──► Client (its connection driven on the current runtime)
//! ```
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require` and no CA file, so the
//! TLS parameters are taken out of the URL here and turned into a rustls configuration
//! ([tokio-postgres-rustls](https://crates.io/crates/tokio-postgres-rustls), pure Rust):
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (default) | if the server offers TLS | no |
//! | `require` | yes | no; against `sslrootcert` if one is given (libpq: then as `verify-ca`) |
//! | `verify-ca` | yes | chain up to a CA of `sslrootcert` |
//! | `verify-full` | yes | chain, and the host name (or IP) in the URL is the certificate's |
//!
//! `verify-ca` and `verify-full` need a CA file: `sslrootcert`, else `~/.postgresql/root.crt`
//! (libpq's default). `sslmode=allow` and `sslrootcert=system` are refused with an error
//! saying so; client certificates (`sslcert`, `sslkey`) are not supported.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use crate::SinkError;

/// libpq's `sslmode` (see the module docs for what each one checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without checking its certificate.
    Prefer,
    /// TLS, the certificate not checked (unless a CA file is given).
    Require,
    /// TLS, the certificate chain checked against the CA file.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported (use disable, prefer, require, \
                            verify-ca or verify-full)"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "unknown sslmode `{other}` (disable, prefer, require, verify-ca or verify-full)"
                ))
            }
        })
    }
}

/// TLS settings of a PostgreSQL connection. As defaults (the config file's), the URL's own
/// `sslmode` / `sslrootcert` parameters override them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgTls {
    /// `None`: `prefer`, libpq's default.
    pub sslmode: Option<SslMode>,
    /// CA certificates (PEM) the server's certificate must chain up to.
    pub sslrootcert: Option<PathBuf>,
}

impl PgTls {
    /// `self` with the settings of `over` that are given.
    pub fn overridden_by(&self, over: &PgTls) -> PgTls {
        PgTls {
            sslmode: over.sslmode.or(self.sslmode),
            sslrootcert: over
                .sslrootcert
                .clone()
                .or_else(|| self.sslrootcert.clone()),
        }
    }

    /// The mode in force.
    pub fn mode(&self) -> SslMode {
        self.sslmode.unwrap_or(SslMode::Prefer)
    }
}

fn config_error(message: impl Into<String>) -> SinkError {
    SinkError::Config(message.into())
}

/// Takes libpq's TLS parameters (`sslmode`, `sslrootcert`) out of a connection string (URL
/// or `key=value` form): returns the string tokio-postgres understands and the settings.
pub fn split_url(url: &str) -> Result<(String, PgTls), SinkError> {
    let mut tls = PgTls::default();
    let mut take = |key: &str, value: &str| -> Result<bool, SinkError> {
        match key {
            "sslmode" => {
                tls.sslmode = Some(value.parse().map_err(config_error)?);
                Ok(true)
            }
            "sslrootcert" => {
                if value == "system" {
                    return Err(config_error(
                        "sslrootcert=system is not supported: give the CA file's path",
                    ));
                }
                tls.sslrootcert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), tls));
        };
        let mut kept = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            if !take(&percent_decode(k)?, &percent_decode(v)?)? {
                kept.push(param);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in key_values(url)? {
            if !take(&k, &v)? {
                kept.push(format!(
                    "{k}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        kept.join(" ")
    };
    Ok((rest, tls))
}

fn percent_decode(s: &str) -> Result<String, SinkError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| config_error("database URL: invalid percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| config_error("database URL: parameter is not UTF-8"))
}

/// libpq's `key=value` connection string: keys, `=` (spaces around it allowed), values bare
/// or single-quoted with backslash escapes.
fn key_values(s: &str) -> Result<Vec<(String, String)>, SinkError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(config_error(format!(
                "connection string: `{key}` is not followed by `=`"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(config_error("connection string: unterminated quoted value"))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Connects to PostgreSQL with the TLS settings of `url` over `defaults`, and drives the
/// connection on the current tokio runtime. The error says which sslmode and CA file were
/// used (a refused certificate reads `... invalid peer certificate: UnknownIssuer`).
pub async fn connect(url: &str, defaults: &PgTls) -> Result<Client, SinkError> {
    let (rest, from_url) = split_url(url)?;
    let tls = defaults.overridden_by(&from_url);
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(SinkError::pg("parse the database URL"))?;
    let mode = tls.mode();
    let context = match &tls.sslrootcert {
        Some(ca) => format!(
            "connect (sslmode={}, sslrootcert={})",
            mode.as_str(),
            ca.display()
        ),
        None => format!("connect (sslmode={})", mode.as_str()),
    };
    let client = if mode == SslMode::Disable {
        config.ssl_mode(PgSslMode::Disable);
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(SinkError::pg(context))?;
        spawn_connection(connection);
        client
    } else {
        config.ssl_mode(if mode == SslMode::Prefer {
            PgSslMode::Prefer
        } else {
            PgSslMode::Require
        });
        let rustls = rustls_config(&tls)?;
        let make = tokio_postgres_rustls::MakeRustlsConnect::new(rustls);
        let (client, connection) = config.connect(make).await.map_err(SinkError::pg(context))?;
        spawn_connection(connection);
        client
    };
    Ok(client)
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "postgres connection ended");
        }
    });
}

/// The rustls client configuration for `tls` (not for `disable`).
pub fn rustls_config(tls: &PgTls) -> Result<rustls::ClientConfig, SinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mode = tls.mode();
    let ca_file = match (&tls.sslrootcert, mode) {
        (Some(path), _) => Some(path.clone()),
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            let default = std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".postgresql/root.crt"))
                .filter(|p| p.exists());
            Some(default.ok_or_else(|| {
                config_error(format!(
                    "sslmode={} needs a CA file: sslrootcert=<path> in the database URL, \
                     database_sslrootcert in the config file, or ~/.postgresql/root.crt",
                    mode.as_str()
                ))
            })?)
        }
        (None, _) => None,
    };
    // libpq: `prefer` never checks; `require` with a CA file checks like `verify-ca`.
    let ca_file = if mode == SslMode::Prefer {
        None
    } else {
        ca_file
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match ca_file {
        None => Arc::new(NoVerification(provider)),
        Some(path) => {
            let roots = load_roots(&path)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| config_error(format!("CA file {}: {e}", path.display())))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn load_roots(path: &Path) -> Result<RootCertStore, SinkError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| config_error(format!("CA file {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(config_error(format!(
            "CA file {}: no usable certificate in it",
            path.display()
        )));
    }
    Ok(roots)
}

/// `prefer` and `require` without a CA file: any certificate is accepted (the connection is
/// encrypted, the server not authenticated), the handshake's signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the name is not (rustls checks the name last, so a
/// name mismatch means everything else held).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_a_url() {
        let (rest, tls) = split_url(
            "postgres://u@h:5432/db?sslmode=verify-full&options=-c%20search_path%3Ds&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:5432/db?options=-c%20search_path%3Ds");
        assert_eq!(tls.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(tls.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));

        let (rest, tls) = split_url("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(tls.mode(), SslMode::Require);

        let (rest, tls) = split_url("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(tls, PgTls::default());
        assert_eq!(tls.mode(), SslMode::Prefer, "libpq's default");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_values() {
        let (rest, tls) = split_url(
            "host=h port=5 sslmode = verify-ca sslrootcert='/a b/ca.pem' options='-c x=\\'y\\''",
        )
        .unwrap();
        assert_eq!(tls.sslmode, Some(SslMode::VerifyCa));
        assert_eq!(tls.sslrootcert, Some(PathBuf::from("/a b/ca.pem")));
        assert_eq!(rest, "host='h' port='5' options='-c x=\\'y\\''");
        tokio_postgres::Config::from_str(&rest).expect("tokio-postgres reads what is left");
    }

    #[test]
    fn unsupported_settings_are_refused_clearly() {
        let err = split_url("postgres://h/db?sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode=allow is not supported"), "{err}");
        let err = split_url("postgres://h/db?sslmode=verify")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown sslmode `verify`"), "{err}");
        let err = split_url("postgres://h/db?sslrootcert=system")
            .unwrap_err()
            .to_string();
        assert!(err.contains("system"), "{err}");
    }

    #[test]
    fn url_parameters_override_the_defaults() {
        let defaults = PgTls {
            sslmode: Some(SslMode::VerifyFull),
            sslrootcert: Some("/d/ca.pem".into()),
        };
        let (_, url) = split_url("postgres://h/db?sslmode=require").unwrap();
        let tls = defaults.overridden_by(&url);
        assert_eq!(tls.mode(), SslMode::Require);
        assert_eq!(tls.sslrootcert, Some(PathBuf::from("/d/ca.pem")));
    }

    #[test]
    fn verify_modes_need_a_ca_file() {
        let dir = std::env::temp_dir().join(format!("hmis-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let tls = PgTls {
            sslmode: Some(SslMode::VerifyFull),
            sslrootcert: Some(missing.clone()),
        };
        let err = rustls_config(&tls).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let tls = PgTls {
            sslmode: Some(SslMode::VerifyCa),
            sslrootcert: Some(empty),
        };
        let err = rustls_config(&tls).unwrap_err().to_string();
        assert!(err.contains("no usable certificate"), "{err}");
        assert!(rustls_config(&PgTls {
            sslmode: Some(SslMode::Require),
            sslrootcert: None
        })
        .is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
