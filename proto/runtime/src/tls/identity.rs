//! Who is on the other end of a mutually authenticated connection: the
//! SPIFFE-style URI SAN carried in a client certificate, parsed into a
//! `PeerIdentity`:
//!
//! - `spiffe://infermesh/edge/<region>`
//! - `spiffe://infermesh/sidecar/<region>/<pool>/<endpoint>`: a sidecar
//!   bound to the one endpoint it may register;
//! - `spiffe://infermesh/sidecar/<name>`: an unbound sidecar identity
//!   (one certificate shared by many pods), which the control plane does
//!   not let register unless told to;
//! - `spiffe://infermesh/admin/<name>`.
//!
//! This module only reads names; whether a peer is trusted is the TLS
//! verifier's job, and what a role may do is decided by whoever reads the
//! identity.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The trust domain every infermesh identity lives in.
pub const TRUST_DOMAIN: &str = "infermesh";

const SCHEME: &str = "spiffe://";
const MAX_NAME_LEN: usize = 128;

/// What kind of process a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// An edge gateway; its name is the region it serves.
    Edge,
    /// A sidecar in front of one engine replica.
    Sidecar,
    /// An operator or tool using the admin API.
    Admin,
}

impl PeerRole {
    /// The role as it appears in the identity URI.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Edge => "edge",
            PeerRole::Sidecar => "sidecar",
            PeerRole::Admin => "admin",
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PeerRole {
    type Err = IdentityError;

    fn from_str(role: &str) -> Result<Self, Self::Err> {
        match role {
            "edge" => Ok(PeerRole::Edge),
            "sidecar" => Ok(PeerRole::Sidecar),
            "admin" => Ok(PeerRole::Admin),
            other => Err(IdentityError::UnknownRole {
                role: other.to_owned(),
            }),
        }
    }
}

/// The identity of an authenticated peer, e.g. `edge/eu-west-1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// What kind of process the peer is.
    pub role: PeerRole,
    /// Which one of its kind: a region for edges, an endpoint id (or, when
    /// unbound, any name) for sidecars.
    pub name: String,
    /// Bound sidecars: the region and pool their endpoint belongs to.
    pub scope: Option<SidecarScope>,
}

/// Where a bound sidecar identity's endpoint lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SidecarScope {
    /// Region of the endpoint.
    pub region: String,
    /// Pool of the endpoint.
    pub pool: String,
}

/// Why a certificate or URI does not carry a usable infermesh identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The DER bytes are not an X.509 certificate.
    #[error("not a valid X.509 certificate: {reason}")]
    BadCertificate {
        /// What the parser reported.
        reason: String,
    },
    /// The certificate has no URI subject alternative name.
    #[error(
        "certificate has no URI subject alternative name (expected spiffe://{TRUST_DOMAIN}/<role>/<name>)"
    )]
    NoUriSan,
    /// The certificate has more than one URI SAN, so its identity is ambiguous.
    #[error("certificate has {count} URI subject alternative names; exactly one is allowed")]
    SeveralUriSans {
        /// How many URI SANs were found.
        count: usize,
    },
    /// The URI is not of the form `spiffe://<domain>/<role>/<name>`.
    #[error("identity URI {uri:?} is not of the form spiffe://{TRUST_DOMAIN}/<role>/<name>")]
    Malformed {
        /// The offending URI.
        uri: String,
    },
    /// The URI names a trust domain other than `infermesh`.
    #[error("identity URI is in trust domain {domain:?}, expected {TRUST_DOMAIN:?}")]
    WrongTrustDomain {
        /// The trust domain found.
        domain: String,
    },
    /// The role segment is not `edge`, `sidecar` or `admin`.
    #[error("unknown peer role {role:?} (expected edge, sidecar or admin)")]
    UnknownRole {
        /// The role found.
        role: String,
    },
    /// The name segment is empty.
    #[error("identity has an empty name")]
    EmptyName,
    /// The name holds characters outside `[A-Za-z0-9._-]`, starts with `.`, or is too long.
    #[error(
        "identity name {name:?} must be 1-{MAX_NAME_LEN} characters of [A-Za-z0-9._-] not starting with '.'"
    )]
    InvalidName {
        /// The name found.
        name: String,
    },
}

impl PeerIdentity {
    /// An identity, checking that `name` is usable in a URI and a file name.
    pub fn new(role: PeerRole, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self {
            role,
            name,
            scope: None,
        })
    }

    /// A sidecar identity bound to endpoint `endpoint` of `pool` in `region`.
    pub fn sidecar(
        region: impl Into<String>,
        pool: impl Into<String>,
        endpoint: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (region, pool) = (region.into(), pool.into());
        validate_name(&region)?;
        validate_name(&pool)?;
        let mut identity = Self::new(PeerRole::Sidecar, endpoint)?;
        identity.scope = Some(SidecarScope { region, pool });
        Ok(identity)
    }

    /// The identity of the peer whose end-entity certificate is `der`.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            IdentityError::BadCertificate {
                reason: e.to_string(),
            }
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate {
                reason: e.to_string(),
            })?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoUriSan),
            [uri] => uri.parse(),
            several => Err(IdentityError::SeveralUriSans {
                count: several.len(),
            }),
        }
    }

    /// The identity in a verified peer's end-entity certificate, if it carries one.
    pub fn from_presented(chain: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        let end_entity = chain?.first()?;
        match Self::from_der(end_entity) {
            Ok(identity) => Some(identity),
            Err(error) => {
                // The CA vouched for the certificate, so this is a mis-issued cert, not an attack.
                tracing::debug!(%error, "peer certificate carries no infermesh identity");
                None
            }
        }
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{TRUST_DOMAIN}/{self}")
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => write!(
                f,
                "{}/{}/{}/{}",
                self.role, scope.region, scope.pool, self.name
            ),
            None => write!(f, "{}/{}", self.role, self.name),
        }
    }
}

impl FromStr for PeerIdentity {
    type Err = IdentityError;

    /// Parses `spiffe://infermesh/<role>/<name>` and
    /// `spiffe://infermesh/sidecar/<region>/<pool>/<endpoint>`.
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let malformed = || IdentityError::Malformed {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix(SCHEME).ok_or_else(malformed)?;
        let (domain, path) = rest.split_once('/').ok_or_else(malformed)?;
        if domain != TRUST_DOMAIN {
            return Err(IdentityError::WrongTrustDomain {
                domain: domain.to_owned(),
            });
        }
        let (role, name) = path.split_once('/').ok_or_else(malformed)?;
        let role: PeerRole = role.parse()?;
        if name.contains(['?', '#']) {
            return Err(malformed());
        }
        match (role, name.split('/').collect::<Vec<_>>().as_slice()) {
            (_, [name]) => Self::new(role, *name),
            (PeerRole::Sidecar, [region, pool, endpoint]) => {
                Self::sidecar(*region, *pool, *endpoint)
            }
            _ => Err(malformed()),
        }
    }
}

/// Serial (lowercase hex) and validity (Unix ms) of the first certificate in `pem`.
pub fn serial_and_validity(pem: &str) -> Option<(String, i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let validity = cert.validity();
    Some((
        hex::encode(cert.raw_serial()),
        validity.not_before.timestamp() * 1000,
        validity.not_after.timestamp() * 1000,
    ))
}

/// The serial number of the certificate `der`, lowercase hex, as issued.
pub fn serial_hex(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

fn validate_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() {
        return Err(IdentityError::EmptyName);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.len() > MAX_NAME_LEN || name.starts_with('.') || !name.chars().all(allowed) {
        return Err(IdentityError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_for_every_role() {
        for role in [PeerRole::Edge, PeerRole::Sidecar, PeerRole::Admin] {
            let identity = PeerIdentity::new(role, "eu-west-1").unwrap();
            let parsed: PeerIdentity = identity.uri().parse().unwrap();
            assert_eq!(parsed, identity);
        }
        let bound = PeerIdentity::sidecar("eu-west", "llama-eu", "vllm-0").unwrap();
        assert_eq!(
            bound.uri(),
            "spiffe://infermesh/sidecar/eu-west/llama-eu/vllm-0"
        );
        assert_eq!(bound.uri().parse::<PeerIdentity>().unwrap(), bound);
        assert_eq!(bound.name, "vllm-0");
        assert_eq!(
            PeerIdentity::new(PeerRole::Edge, "eu-west-1")
                .unwrap()
                .uri(),
            "spiffe://infermesh/edge/eu-west-1"
        );
    }

    #[test]
    fn uris_outside_the_infermesh_shape_are_refused_with_the_reason() {
        let cases = [
            ("https://infermesh/edge/a", "Malformed"),
            ("spiffe://infermesh", "Malformed"),
            ("spiffe://infermesh/edge", "Malformed"),
            ("spiffe://infermesh/edge/a/b", "Malformed"),
            ("spiffe://infermesh/edge/eu/pool/a", "Malformed"),
            ("spiffe://infermesh/sidecar/eu/pool", "Malformed"),
            ("spiffe://infermesh/sidecar/eu/pool/a/b", "Malformed"),
            ("spiffe://infermesh/sidecar/eu//a", "EmptyName"),
            ("spiffe://example.org/edge/a", "WrongTrustDomain"),
            ("spiffe://infermesh/router/a", "UnknownRole"),
            ("spiffe://infermesh/edge/", "EmptyName"),
            ("spiffe://infermesh/edge/..", "InvalidName"),
            ("spiffe://infermesh/edge/a b", "InvalidName"),
        ];
        for (uri, expected) in cases {
            let error = uri.parse::<PeerIdentity>().unwrap_err();
            assert!(
                format!("{error:?}").starts_with(expected),
                "{uri}: got {error:?}, want {expected}"
            );
        }
    }

    #[test]
    fn certificates_without_a_usable_identity_say_why() {
        let with_dns = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let server = with_dns.self_signed(&key).unwrap();
        assert_eq!(
            PeerIdentity::from_der(server.der()),
            Err(IdentityError::NoUriSan)
        );

        let with_uris = |uris: &[&str]| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = uris
                .iter()
                .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
                .collect();
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().clone()
        };
        let cases: [(&[&str], IdentityError); 5] = [
            (
                &["spiffe://example.org/edge/eu"],
                IdentityError::WrongTrustDomain {
                    domain: "example.org".into(),
                },
            ),
            (
                &["spiffe://infermesh/router/eu"],
                IdentityError::UnknownRole {
                    role: "router".into(),
                },
            ),
            (&["spiffe://infermesh/edge/"], IdentityError::EmptyName),
            (
                &["https://infermesh/edge/eu"],
                IdentityError::Malformed {
                    uri: "https://infermesh/edge/eu".into(),
                },
            ),
            (
                &["spiffe://infermesh/edge/a", "spiffe://infermesh/edge/b"],
                IdentityError::SeveralUriSans { count: 2 },
            ),
        ];
        for (uris, expected) in cases {
            assert_eq!(
                PeerIdentity::from_der(&with_uris(uris)),
                Err(expected),
                "{uris:?}"
            );
        }
        assert!(PeerIdentity::from_der(b"\x30\x03\x02\x01\x00").is_err());
    }

    #[test]
    fn garbage_der_is_not_a_certificate() {
        assert!(matches!(
            PeerIdentity::from_der(b"not a certificate"),
            Err(IdentityError::BadCertificate { .. })
        ));
    }
}
