//! The development PKI layout: one directory holding a fresh CA, a server
//! certificate and one client certificate per peer, created at run time by
//! scripts and tests (`infermesh-certs generate`). The layout is fixed so
//! every process and script finds the same files:
//!
//! ```text
//! DIR/ca.pem                     CA certificate: the trust anchor for servers and clients
//! DIR/ca-key.pem                 CA key (0600), so `LocalCa::load` can issue more later
//! DIR/server.pem, server-key.pem serving certificate for localhost, 127.0.0.1, ::1 and --host names
//! DIR/admin.pem, admin-key.pem   client spiffe://infermesh/admin/admin
//! DIR/edge-<region>.pem, -key.pem   client spiffe://infermesh/edge/<region>
//! DIR/sidecar-<name>.pem, -key.pem  client spiffe://infermesh/sidecar/<name>
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::{LocalCa, PkiError, files};
use crate::tls::identity::{PeerIdentity, PeerRole, TRUST_DOMAIN};

/// The name in the admin client certificate's identity.
pub const ADMIN_NAME: &str = "admin";

/// What to put in a development PKI directory.
#[derive(Clone, Debug, Default)]
pub struct DevPki {
    /// Extra server names (DNS names or IP literals) beyond localhost, 127.0.0.1 and ::1.
    pub hosts: Vec<String>,
    /// Regions to issue edge client certificates for.
    pub edges: Vec<String>,
    /// Names to issue sidecar client certificates for.
    pub sidecars: Vec<String>,
    /// Replace an existing CA in the directory instead of refusing.
    pub overwrite: bool,
}

/// Where a certificate and its key were written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key (0600).
    pub key: PathBuf,
}

impl CertPaths {
    /// `DIR/<stem>.pem` and `DIR/<stem>-key.pem`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    /// Where the client certificate for `identity` lives in a development PKI directory.
    pub fn for_identity(dir: &Path, identity: &PeerIdentity) -> Self {
        match identity.role {
            PeerRole::Admin if identity.name == ADMIN_NAME => Self::in_dir(dir, "admin"),
            role => Self::in_dir(dir, &format!("{role}-{}", identity.name)),
        }
    }
}

/// Every file `write_dev_pki` wrote.
#[derive(Clone, Debug)]
pub struct DevPkiPaths {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The CA private key.
    pub ca_key: PathBuf,
    /// The server certificate.
    pub server: CertPaths,
    /// The admin client certificate.
    pub admin: CertPaths,
    /// Edge client certificates, by region.
    pub edges: Vec<(String, CertPaths)>,
    /// Sidecar client certificates, by name.
    pub sidecars: Vec<(String, CertPaths)>,
}

impl DevPkiPaths {
    /// Every path written, CA first.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.ca.as_path(), self.ca_key.as_path()];
        let pairs = [&self.server, &self.admin]
            .into_iter()
            .chain(self.edges.iter().map(|(_, paths)| paths))
            .chain(self.sidecars.iter().map(|(_, paths)| paths));
        for paths in pairs {
            files.push(&paths.cert);
            files.push(&paths.key);
        }
        files
    }
}

/// Creates `dir` if needed and writes a fresh CA plus the certificates `spec` asks for.
pub fn write_dev_pki(dir: &Path, spec: &DevPki) -> Result<DevPkiPaths, PkiError> {
    let ca_path = dir.join("ca.pem");
    if !spec.overwrite && ca_path.exists() {
        return Err(PkiError::Exists { path: ca_path });
    }
    // Validate every name before writing anything, so a typo leaves the directory untouched.
    let (dns, ips) = server_names(&spec.hosts);
    for name in &dns {
        super::ca::dns_name(name)?;
    }
    let edges = identities(PeerRole::Edge, &spec.edges)?;
    let sidecars = identities(PeerRole::Sidecar, &spec.sidecars)?;
    let admin = PeerIdentity::new(PeerRole::Admin, ADMIN_NAME)?;

    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca = LocalCa::generate()?;
    let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
    let server = CertPaths::in_dir(dir, "server");
    ca.issue_server(&dns, &ips)?
        .write(&server.cert, &server.key)?;
    let issue = |identity: &PeerIdentity| -> Result<CertPaths, PkiError> {
        let paths = CertPaths::for_identity(dir, identity);
        ca.issue_client(identity)?.write(&paths.cert, &paths.key)?;
        Ok(paths)
    };
    let admin = issue(&admin)?;
    let edges = issue_all(&edges, issue)?;
    let sidecars = issue_all(&sidecars, issue)?;
    // The CA goes last: its presence marks a complete directory.
    let ca_key = dir.join("ca-key.pem");
    files::write_private(&ca_key, ca.key_pem().as_bytes())?;
    files::write_public(&ca_path, ca.cert_pem().as_bytes())?;
    Ok(DevPkiPaths {
        ca: ca_path,
        ca_key,
        server,
        admin,
        edges,
        sidecars,
    })
}

fn issue_all(
    identities: &[PeerIdentity],
    issue: impl Fn(&PeerIdentity) -> Result<CertPaths, PkiError>,
) -> Result<Vec<(String, CertPaths)>, PkiError> {
    identities
        .iter()
        .map(|identity| Ok((identity.name.clone(), issue(identity)?)))
        .collect()
}

fn identities(role: PeerRole, names: &[String]) -> Result<Vec<PeerIdentity>, PkiError> {
    let mut identities: Vec<PeerIdentity> = Vec::with_capacity(names.len());
    for name in names {
        // `name`, or for sidecars `region/pool/endpoint` (a bound identity).
        let identity: PeerIdentity = format!("spiffe://{TRUST_DOMAIN}/{role}/{name}").parse()?;
        if !identities.contains(&identity) {
            identities.push(identity);
        }
    }
    Ok(identities)
}

/// Loopback names plus `hosts`, split into DNS names and IP addresses, without duplicates.
fn server_names(hosts: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec!["localhost".to_owned()];
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for host in hosts {
        let host = host.trim();
        match host.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.iter().any(|d| d == host) => dns.push(host.to_owned()),
            Err(_) => {}
        }
    }
    (dns, ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_holds_the_documented_layout_and_refuses_a_second_ca() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DevPki {
            hosts: vec!["edge.local".into(), "10.0.0.7".into(), "localhost".into()],
            edges: vec!["eu-west-1".into()],
            sidecars: vec!["llama-0".into()],
            overwrite: false,
        };
        let paths = write_dev_pki(dir.path(), &spec).unwrap();
        let names: Vec<String> = paths
            .files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca-key.pem",
                "server.pem",
                "server-key.pem",
                "admin.pem",
                "admin-key.pem",
                "edge-eu-west-1.pem",
                "edge-eu-west-1-key.pem",
                "sidecar-llama-0.pem",
                "sidecar-llama-0-key.pem",
            ]
        );
        for file in paths.files() {
            assert!(file.is_file(), "{} missing", file.display());
        }
        assert!(matches!(
            write_dev_pki(dir.path(), &spec),
            Err(PkiError::Exists { .. })
        ));
        let again = DevPki {
            overwrite: true,
            ..spec
        };
        write_dev_pki(dir.path(), &again).unwrap();
    }

    #[test]
    fn an_invalid_peer_or_host_name_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DevPki {
            hosts: vec!["not a host".into()],
            ..DevPki::default()
        };
        assert!(matches!(
            write_dev_pki(dir.path(), &spec),
            Err(PkiError::BadDnsName { .. })
        ));
        let spec = DevPki {
            edges: vec!["../escape".into()],
            ..DevPki::default()
        };
        assert!(matches!(
            write_dev_pki(dir.path(), &spec),
            Err(PkiError::Identity(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn loopback_names_are_always_present_once() {
        let (dns, ips) = server_names(&["::1".into(), "api.example".into()]);
        assert_eq!(dns, ["localhost", "api.example"]);
        assert_eq!(ips.len(), 2);
    }
}
