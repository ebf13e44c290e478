//! Who may call what on the control plane.
//!
//! - Discovery and load reports: with TLS, the caller's client certificate
//!   names its role (`spiffe://infermesh/<role>/<name>`). Only an edge
//!   certificate may subscribe as an edge (and so receive key hashes), and
//!   only for the region it names; only a sidecar certificate may subscribe
//!   as a sidecar or report load. Under `--insecure-plaintext` there are no
//!   identities and these checks are off.
//! - Admin: an admin client certificate, or `authorization: Bearer <token>`
//!   matching a hash in the admin tokens file. Anything else is refused with
//!   UNAUTHENTICATED; a certificate of another role with PERMISSION_DENIED.
//!
//! - Registrations: a sidecar may register only the endpoint its
//!   certificate names, at its own address (`registration`).
//! - Revoked certificates (`IdentityService/RevokeIdentity`) are refused,
//!   and streams opened with one end when it is revoked (`until_revoked`).
//!
//! Health and reflection stay open: probes and `grpcurl describe` need them,
//! and they reveal no data.

mod registration;

use std::net::IpAddr;
use std::sync::Arc;

use infermesh_proto::v1::Register;
pub use registration::RegistrationPolicy;

use infermesh_proto::v1::SubscriberRole;
use infermesh_runtime::admin_token::TokenSet;
use infermesh_runtime::tls::{PeerIdentity, PeerRole, peer_identity, peer_serial};
use tokio::sync::watch;

use crate::snapshot::Snapshot;
use tonic::{Request, Status};

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub struct Authorizer {
    /// Whether subscribers must present a certificate of their role.
    mtls: bool,
    /// Accepted admin bearer tokens.
    admin_tokens: TokenSet,
    /// What sidecars may register.
    registrations: Arc<RegistrationPolicy>,
    /// Snapshots carrying the revocations in force.
    revocations: Option<watch::Receiver<Arc<Snapshot>>>,
}

/// The certificate a caller presented: its identity and serial.
pub type Presented = (PeerIdentity, String);

/// Who made an admin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCaller {
    /// An admin client certificate with this name.
    Certificate(String),
    /// The bearer token with this name.
    Token(String),
}

impl std::fmt::Display for AdminCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminCaller::Certificate(name) => write!(f, "cert:{name}"),
            AdminCaller::Token(name) => write!(f, "token:{name}"),
        }
    }
}

impl Authorizer {
    /// Checks certificates when `mtls`, accepts `admin_tokens` for admin calls.
    pub fn new(mtls: bool, admin_tokens: TokenSet) -> Self {
        Self {
            mtls,
            admin_tokens,
            registrations: Arc::new(RegistrationPolicy::new(false, 30)),
            revocations: None,
        }
    }

    /// Refuses certificates revoked in `snapshots`.
    pub fn with_revocations(mut self, snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        self.revocations = Some(snapshots);
        self
    }

    /// The identity and serial of the certificate on `request`, if any.
    pub fn presented<T>(request: &Request<T>) -> Option<Presented> {
        Some((peer_identity(request)?, peer_serial(request)?))
    }

    /// Refuses a revoked certificate with PERMISSION_DENIED.
    pub fn not_revoked(&self, presented: Option<&Presented>) -> Result<(), Status> {
        let (Some(snapshots), Some((identity, serial))) = (&self.revocations, presented) else {
            return Ok(());
        };
        if snapshots
            .borrow()
            .is_revoked(&crate::store::identity_name(identity), serial)
        {
            return Err(revoked(identity));
        }
        Ok(())
    }

    /// Resolves when the certificate `presented` is revoked; never without one.
    pub fn until_revoked(
        &self,
        presented: Option<Presented>,
    ) -> impl std::future::Future<Output = Status> + Send + 'static {
        let snapshots = self.revocations.clone();
        async move {
            let (Some(mut snapshots), Some((identity, serial))) = (snapshots, presented) else {
                return std::future::pending().await;
            };
            // Named once: this runs on every snapshot change for every stream.
            let name = crate::store::identity_name(&identity);
            loop {
                if snapshots.borrow_and_update().is_revoked(&name, &serial) {
                    return revoked(&identity);
                }
                if snapshots.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Registrations follow `policy` (with certificates; plaintext has no identities).
    pub fn with_registrations(mut self, policy: RegistrationPolicy) -> Self {
        self.registrations = Arc::new(policy);
        self
    }

    /// Whether subscriber identities are checked.
    pub fn checks_identities(&self) -> bool {
        self.mtls
    }

    /// May the caller with `peer` subscribe as `role` for `region`?
    pub fn subscriber(
        &self,
        peer: Option<&PeerIdentity>,
        role: SubscriberRole,
        region: &str,
    ) -> Result<(), Status> {
        if !self.mtls {
            return Ok(());
        }
        let wanted = match role {
            SubscriberRole::Edge => PeerRole::Edge,
            _ => PeerRole::Sidecar,
        };
        let Some(peer) = peer else {
            return Err(Status::unauthenticated(format!(
                "subscribing as {} needs a client certificate with a spiffe://infermesh/{}/<name> identity",
                wanted, wanted
            )));
        };
        if peer.role != wanted {
            return Err(Status::permission_denied(format!(
                "identity {} may not subscribe as {wanted}",
                peer.uri()
            )));
        }
        if wanted == PeerRole::Edge && peer.name != region {
            return Err(Status::permission_denied(format!(
                "identity {} may not subscribe as an edge of region {region:?}",
                peer.uri()
            )));
        }
        Ok(())
    }

    /// May the caller with `peer` report load as a sidecar?
    pub fn reporter(&self, peer: Option<&PeerIdentity>) -> Result<(), Status> {
        self.subscriber(peer, SubscriberRole::Sidecar, "")
    }

    /// May the caller with `peer`, connected from `remote`, make `register`?
    pub fn registration(
        &self,
        peer: Option<&PeerIdentity>,
        register: &Register,
        remote: Option<IpAddr>,
    ) -> Result<(), Status> {
        if !self.mtls {
            return Ok(());
        }
        let Some(peer) = peer else {
            return Err(Status::unauthenticated(
                "registering needs a sidecar client certificate",
            ));
        };
        self.registrations.check(peer, register, remote)
    }

    /// Authenticates an admin call.
    pub fn admin<T>(&self, request: &Request<T>) -> Result<AdminCaller, Status> {
        if let Some(peer) = peer_identity(request) {
            if peer.role == PeerRole::Admin {
                return Ok(AdminCaller::Certificate(peer.name));
            }
            if request.metadata().get("authorization").is_none() {
                return Err(Status::permission_denied(format!(
                    "identity {} may not use the admin API",
                    peer.uri()
                )));
            }
        }
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "the admin API needs an admin client certificate or `authorization: Bearer <admin token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("authorization: expected `Bearer <admin token>`")
            })?;
        match self.admin_tokens.verify(token) {
            Some(name) => Ok(AdminCaller::Token(name.to_string())),
            None => Err(Status::unauthenticated("admin token not recognised")),
        }
    }
}

fn revoked(identity: &PeerIdentity) -> Status {
    Status::permission_denied(format!("the certificate of {} was revoked", identity.uri()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_runtime::admin_token;

    fn identity(role: PeerRole, name: &str) -> PeerIdentity {
        PeerIdentity::new(role, name).unwrap()
    }

    #[test]
    fn a_sidecar_certificate_cannot_subscribe_as_an_edge() {
        let auth = Authorizer::new(true, TokenSet::default());
        let sidecar = identity(PeerRole::Sidecar, "replica-0");
        let error = auth
            .subscriber(Some(&sidecar), SubscriberRole::Edge, "eu")
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        assert!(
            auth.subscriber(Some(&sidecar), SubscriberRole::Sidecar, "eu")
                .is_ok()
        );
        assert!(auth.reporter(Some(&sidecar)).is_ok());
    }

    #[test]
    fn an_edge_certificate_is_bound_to_its_region_and_cannot_report_load() {
        let auth = Authorizer::new(true, TokenSet::default());
        let edge = identity(PeerRole::Edge, "eu");
        assert!(
            auth.subscriber(Some(&edge), SubscriberRole::Edge, "eu")
                .is_ok()
        );
        let other = auth
            .subscriber(Some(&edge), SubscriberRole::Edge, "us")
            .unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            auth.reporter(Some(&edge)).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let admin = identity(PeerRole::Admin, "ops");
        assert_eq!(
            auth.subscriber(Some(&admin), SubscriberRole::Edge, "eu")
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn without_a_certificate_subscribing_is_unauthenticated_unless_plaintext() {
        let auth = Authorizer::new(true, TokenSet::default());
        let error = auth
            .subscriber(None, SubscriberRole::Sidecar, "eu")
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
        let plaintext = Authorizer::new(false, TokenSet::default());
        assert!(
            plaintext
                .subscriber(None, SubscriberRole::Edge, "eu")
                .is_ok()
        );
    }

    #[test]
    fn admin_calls_need_a_known_bearer_token() {
        let (secret, entry) = admin_token::generate("ops").unwrap();
        let tokens = TokenSet::parse(&entry.line()).unwrap();
        let auth = Authorizer::new(false, tokens);
        let call = |value: Option<&str>| {
            let mut request = Request::new(());
            if let Some(value) = value {
                request
                    .metadata_mut()
                    .insert("authorization", value.parse().unwrap());
            }
            auth.admin(&request)
        };
        assert_eq!(
            call(Some(&format!("Bearer {secret}"))).unwrap(),
            AdminCaller::Token("ops".into())
        );
        for (value, expected) in [
            (None, "admin client certificate"),
            (Some("Bearer imadm_nope"), "not recognised"),
            (Some(secret.as_str()), "expected `Bearer"),
            (Some("Bearer "), "expected `Bearer"),
            (Some("Basic b3BzOm9wcw=="), "expected `Bearer"),
        ] {
            let error = call(value).unwrap_err();
            assert_eq!(error.code(), tonic::Code::Unauthenticated, "{value:?}");
            assert!(
                error.message().contains(expected),
                "{value:?}: {}",
                error.message()
            );
        }
    }
}
