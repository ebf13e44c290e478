//! The local certificate authority: an ECDSA P-256 CA that issues server
//! certificates (DNS and IP SANs) and client certificates carrying a
//! `PeerIdentity` URI SAN, and signs the requests processes send for their
//! identity.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};

use super::{PkiError, files, generate, new_key};
use crate::tls::identity::{IdentityError, PeerIdentity, PeerRole};

/// How long the CA certificate is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued server or client certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far in the past `not_before` is put, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate and its private key, both PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (`CERTIFICATE` block).
    pub cert_pem: String,
    /// The private key (`PRIVATE KEY` block, PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes the certificate to `cert` and the key to `key` (mode 0600), each atomically.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        files::write_private(key, self.key_pem.as_bytes())?;
        files::write_public(cert, self.cert_pem.as_bytes())
    }
}

/// A certificate authority held in memory, able to issue certificates.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A fresh CA with a new ECDSA P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("infermesh local development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(generate("self-sign the CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and PEM private key, e.g. written by `write_dev_pki`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(generate("parse the CA private key"))?;
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::BadCa {
                reason: format!("no PEM certificate: {e}"),
            })?;
        check_ca(&der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::BadCa {
            reason: e.to_string(),
        })?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM-encoded: what peers put in their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM-encoded: keep it next to the CA only in development.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate naming `identity` for the key of `csr_pem` (PKCS#10;
    /// its signature, the proof that the caller holds the key, is checked),
    /// valid for `validity` from now. The CSR's own subject and names are
    /// ignored: the identity is the CA's decision. Usable both as a client
    /// certificate and as a server certificate (a sidecar serves with the
    /// identity it registers with). Returns the PEM and its expiry.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        identity: &PeerIdentity,
        validity: Duration,
    ) -> Result<(String, SystemTime), PkiError> {
        let identity: PeerIdentity = identity.uri().parse()?;
        let uri = Ia5String::try_from(identity.uri()).map_err(|_| IdentityError::InvalidName {
            name: identity.name.clone(),
        })?;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(generate("read the certificate signing request"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&identity.to_string());
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        // Short lives are not backdated by an hour: a 60 s certificate
        // must not be valid for 61 minutes.
        let now = SystemTime::now();
        params.not_before = (now - validity.min(BACKDATE) / 10).into();
        let not_after = now + validity;
        params.not_after = not_after.into();
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(generate("sign a certificate"))?;
        Ok((cert.pem(), not_after))
    }

    /// A server certificate valid for `dns_names` and `ips`.
    pub fn issue_server(&self, dns_names: &[&str], ips: &[IpAddr]) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for dns in dns_names {
            sans.push(SanType::DnsName(dns_name(dns)?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        let common_name = match (dns_names.first(), ips.first()) {
            (Some(dns), _) => (*dns).to_owned(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => return Err(PkiError::NoServerNames),
        };
        self.issue(
            &common_name,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A certificate whose only URI SAN is `identity.uri()`: a client
    /// certificate, and for edges and sidecars, which also serve the
    /// mesh's mutual TLS, a server certificate too.
    pub fn issue_client(&self, identity: &PeerIdentity) -> Result<IssuedCert, PkiError> {
        // Re-validate: the fields are public, so the identity may not have come from `new`.
        let identity: PeerIdentity = identity.uri().parse()?;
        // A validated name is ASCII, so this cannot fail; still, no panic on the path.
        let uri = Ia5String::try_from(identity.uri()).map_err(|_| IdentityError::InvalidName {
            name: identity.name.clone(),
        })?;
        let usages = match identity.role {
            PeerRole::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
            PeerRole::Edge | PeerRole::Sidecar => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        };
        self.issue(&identity.to_string(), vec![SanType::URI(uri)], usages)
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<IssuedCert, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("sign a certificate"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// `name` as a DNS SAN, refusing anything that is not a host name (a leading `*.` is allowed).
pub(super) fn dns_name(name: &str) -> Result<Ia5String, PkiError> {
    let bad = || PkiError::BadDnsName {
        name: name.to_owned(),
    };
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.parse::<IpAddr>().is_ok() || DnsName::try_from(host).is_err() {
        return Err(bad());
    }
    Ia5String::try_from(name).map_err(|_| bad())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "infermesh");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + validity).into();
    // A random positive serial whose first byte is non-zero keeps the DER INTEGER minimal.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

/// Checks that `der` is a CA certificate and that `key` is its key.
fn check_ca(der: &[u8], key: &KeyPair) -> Result<(), PkiError> {
    use rcgen::PublicKeyData;
    let bad = |reason: String| PkiError::BadCa { reason };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    if !cert.is_ca() {
        return Err(bad(
            "it is not a CA certificate (basicConstraints cA is false)".into(),
        ));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            "the private key does not match the CA certificate".into()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::new_key_and_csr;

    #[test]
    fn a_client_certificate_carries_the_identity_it_was_issued_for() {
        let ca = LocalCa::generate().unwrap();
        let identity = PeerIdentity::new(PeerRole::Sidecar, "llama-0").unwrap();
        let issued = ca.issue_client(&identity).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(PeerIdentity::from_der(&der).unwrap(), identity);
    }

    #[test]
    fn a_server_certificate_has_no_identity() {
        let ca = LocalCa::generate().unwrap();
        let issued = ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(PeerIdentity::from_der(&der), Err(IdentityError::NoUriSan));
        assert!(matches!(
            ca.issue_server(&[], &[]),
            Err(PkiError::NoServerNames)
        ));
    }

    #[test]
    fn a_loaded_ca_issues_certificates_and_refuses_a_foreign_key() {
        let ca = LocalCa::generate().unwrap();
        let loaded = LocalCa::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        loaded.issue_server(&["localhost"], &[]).unwrap();

        let other = LocalCa::generate().unwrap();
        let mismatched = LocalCa::load(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(
            mismatched.to_string().contains("does not match"),
            "{mismatched}"
        );

        let leaf = ca.issue_server(&["localhost"], &[]).unwrap();
        let not_ca = LocalCa::load(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(not_ca.to_string().contains("not a CA"), "{not_ca}");
    }

    #[test]
    fn a_csr_gets_a_certificate_naming_the_identity_the_ca_chose() {
        let ca = LocalCa::generate().unwrap();
        let (key_pem, csr_pem) = new_key_and_csr().unwrap();
        let identity = PeerIdentity::sidecar("eu", "llama-eu", "vllm-0").unwrap();
        let (cert_pem, not_after) = ca
            .issue_for_csr(&csr_pem, &identity, Duration::from_secs(60))
            .unwrap();
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(PeerIdentity::from_der(&der).unwrap(), identity);
        let left = not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        // The certificate is for the CSR's key.
        use rcgen::PublicKeyData;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            parsed.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        drop(cert_pem);
        let mut tampered = csr_pem.into_bytes();
        let middle = tampered.len() / 2;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(
            ca.issue_for_csr(&tampered, &identity, Duration::from_secs(60))
                .is_err()
        );
    }
}
