//! Certificates for a test system, made in the test's own directory by the
//! project's CA code: a server certificate for loopback, and client
//! certificates with infermesh identities, issued on demand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use infermesh_runtime::tls::pki::LocalCa;
use infermesh_runtime::tls::{PeerIdentity, PeerRole};

/// A certificate file and its key file.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// A CA and the files it issued under one directory.
pub struct TestPki {
    dir: PathBuf,
    ca: LocalCa,
    /// Serialises issuing, so concurrent callers never pair one call's key with another's certificate.
    issuing: Mutex<()>,
    /// The CA certificate every peer trusts.
    pub ca_cert: PathBuf,
    /// The CA's private key (mode 0600), for a control plane that issues identities.
    pub ca_key: PathBuf,
    /// The server certificate for localhost, 127.0.0.1 and ::1.
    pub server: CertPair,
}

impl TestPki {
    /// A fresh CA and server certificate under `dir`.
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let ca = LocalCa::generate().expect("generate CA");
        let ca_cert = dir.join("ca.pem");
        std::fs::write(&ca_cert, ca.cert_pem()).expect("write CA");
        let ca_key = dir.join("ca-key.pem");
        infermesh_runtime::fs::write_private(&ca_key, ca.key_pem().as_bytes())
            .expect("write CA key");
        let pki = Self {
            server: CertPair {
                cert: dir.join("server.pem"),
                key: dir.join("server-key.pem"),
            },
            dir: dir.to_path_buf(),
            ca,
            issuing: Mutex::new(()),
            ca_cert,
            ca_key,
        };
        pki.reissue_server(&pki.server);
        pki
    }

    /// Writes a new loopback server certificate (new key, new serial) to `pair`.
    pub fn reissue_server(&self, pair: &CertPair) {
        let loopback = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        self.ca
            .issue_server(&["localhost"], &loopback)
            .expect("issue server certificate")
            .write(&pair.cert, &pair.key)
            .expect("write server certificate");
    }

    /// The client certificate for `role`/`name`, issued on first use.
    pub fn client(&self, role: PeerRole, name: &str) -> CertPair {
        let identity = PeerIdentity::new(role, name).expect("valid identity");
        self.issued(&format!("{role}-{name}"), &identity)
    }

    /// The certificate for `identity` under `DIR/<stem>.pem`, issued on first use.
    fn issued(&self, stem: &str, identity: &PeerIdentity) -> CertPair {
        let pair = CertPair {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
        };
        let _issuing = self.issuing.lock().unwrap_or_else(|e| e.into_inner());
        if !pair.cert.exists() {
            self.ca
                .issue_client(identity)
                .expect("issue client certificate")
                .write(&pair.cert, &pair.key)
                .expect("write client certificate");
        }
        pair
    }

    /// A sidecar certificate bound to endpoint `endpoint` of `pool` in `region`.
    pub fn sidecar(&self, region: &str, pool: &str, endpoint: &str) -> CertPair {
        let identity = PeerIdentity::sidecar(region, pool, endpoint).expect("valid identity");
        self.issued(&format!("sidecar-{region}-{pool}-{endpoint}"), &identity)
    }

    /// A certificate from another CA, with the identity `role`/`name`.
    pub fn foreign_client(dir: &Path, role: PeerRole, name: &str) -> CertPair {
        let ca = LocalCa::generate().expect("generate CA");
        let pair = CertPair {
            cert: dir.join(format!("foreign-{role}-{name}.pem")),
            key: dir.join(format!("foreign-{role}-{name}-key.pem")),
        };
        ca.issue_client(&PeerIdentity::new(role, name).expect("valid identity"))
            .expect("issue client certificate")
            .write(&pair.cert, &pair.key)
            .expect("write client certificate");
        pair
    }
}
