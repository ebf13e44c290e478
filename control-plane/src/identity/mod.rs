//! IdentityService: the control plane as the mesh's certificate authority.
//!
//! - An admin makes a join token for a role and a region (and, for
//!   sidecars, a pool), with a lifetime and a number of uses; it is stored
//!   hashed under `jointokens/<id>` and its secret shown once.
//! - An edge or sidecar sends a CSR with the token and gets a short-lived
//!   certificate (`--identity-ttl`, 24 h) naming `spiffe://infermesh/edge/<region>`
//!   or `spiffe://infermesh/sidecar/<region>/<pool>/<endpoint>`; each
//!   certificate uses up one use, in a transaction guarded by the token's
//!   revision, so two control-plane replicas cannot both spend the last one.
//! - It renews before expiry by sending a new CSR over mutual TLS with the
//!   certificate it holds; the new certificate names the same identity.
//! - Every certificate issued is recorded under `identities/<identity>`
//!   (serial and validity, expired ones pruned), so an admin can list them
//!   and revoke an identity: its serials go into `revocations/<identity>`,
//!   which every replica's snapshot carries; revoked certificates are
//!   refused and their streams closed (`auth`), and a sidecar identity's
//!   endpoint is deleted in the same transaction. The garbage collector
//!   removes both records once their certificates have expired.
//!
//! The CSR's own names are ignored: what a certificate names is decided
//! here, from the token's scope or the presented identity. Secrets are never
//! logged.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_proto::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, DeleteJoinTokenRequest, DeleteResponse,
    Endpoint, IssueRequest, IssueResponse, IssuedIdentity, JoinToken, ListIssuedIdentitiesRequest,
    ListIssuedIdentitiesResponse, ListJoinTokensRequest, ListJoinTokensResponse, Revocation,
    RevokeIdentityRequest, RevokeIdentityResponse, identity_service_server::IdentityService,
};
use infermesh_runtime::api_key;
use infermesh_runtime::time::now_unix_ms;
use infermesh_runtime::tls::pki::LocalCa;
use infermesh_runtime::tls::{PeerIdentity, PeerRole, peer_identity};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::registry::validate;
use crate::store::{ObjectKind, Store, decode, identity_name as stored_name};
use crate::token_review::TokenReviewer;
use join_token::{PREFIX, redacted};

mod issued;
mod join_token;

/// Attempts at a contended use before giving up.
const ATTEMPTS: usize = 8;

/// See the module docs.
pub struct IdentityApi {
    store: Store,
    auth: Arc<Authorizer>,
    ca: Option<Arc<LocalCa>>,
    ttl: Duration,
    tokens: Option<TokenReviewer>,
}

impl IdentityApi {
    /// Issues certificates from `ca` (none: Issue is refused) valid for `ttl`.
    pub fn new(store: Store, auth: Arc<Authorizer>, ca: Option<LocalCa>, ttl: Duration) -> Self {
        Self {
            store,
            auth,
            ca: ca.map(Arc::new),
            ttl,
            tokens: None,
        }
    }

    /// Also issues for Kubernetes service-account tokens, checked by `reviewer`.
    pub fn with_token_review(mut self, reviewer: Option<TokenReviewer>) -> Self {
        self.tokens = reviewer;
        self
    }
}

/// `identity` as given to the admin API: `sidecar/<region>/<pool>/<endpoint>`,
/// `edge/<region>`, with or without `spiffe://infermesh/`.
fn parse_identity(identity: &str) -> Result<PeerIdentity, Status> {
    let path = identity
        .strip_prefix("spiffe://infermesh/")
        .unwrap_or(identity);
    let parsed: PeerIdentity = format!("spiffe://infermesh/{path}")
        .parse()
        .map_err(|e| Status::invalid_argument(format!("identity: {identity:?}: {e}")))?;
    if parsed.role == PeerRole::Admin {
        return Err(Status::invalid_argument(
            "identity: admin identities are not issued by the control plane",
        ));
    }
    Ok(parsed)
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = self.auth.admin(&request)?;
        let r = request.into_inner();
        match r.role.as_str() {
            "edge" if r.pool.is_empty() => {}
            "edge" => {
                return Err(Status::invalid_argument(
                    "pool: must be empty for an edge token",
                ));
            }
            "sidecar" => validate::dns_label("pool", &r.pool)?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "role: {other:?} is not \"edge\" or \"sidecar\""
                )));
            }
        }
        validate::dns_label("region", &r.region)?;
        let ttl = match r.ttl_seconds {
            0 => 3600,
            t @ 60..=2_592_000 => t,
            t => {
                return Err(Status::invalid_argument(format!(
                    "ttl_seconds: {t} is outside 60..=2592000"
                )));
            }
        };
        let uses = match r.uses {
            0 => 1,
            u @ 1..=100_000 => u,
            u => {
                return Err(Status::invalid_argument(format!(
                    "uses: {u} is outside 1..=100000"
                )));
            }
        };
        for _ in 0..ATTEMPTS {
            let made = api_key::generate();
            let secret = format!(
                "{PREFIX}{}",
                made.secret
                    .trim_start_matches(|c| c != '_')
                    .trim_start_matches('_')
            );
            let now = now_unix_ms();
            let mut token = JoinToken {
                id: made.id.clone(),
                role: r.role.clone(),
                region: r.region.clone(),
                pool: r.pool.clone(),
                expires_at_unix_ms: now + i64::from(ttl) * 1000,
                uses_left: uses,
                secret_sha256: api_key::digest(&secret).to_vec(),
                created_at_unix_ms: now,
                revision: 0,
            };
            let key = self.token_key(&token.id);
            let compares = vec![Compare::version(key.clone(), CompareOp::Equal, 0)];
            let ops = vec![TxnOp::put(key, token.encode_to_vec(), None::<PutOptions>)];
            if let Some(revision) = self
                .store
                .guarded(compares, ops)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
            {
                token.revision = revision;
                tracing::info!(token = %token.id, role = %token.role, region = %token.region, pool = %token.pool, uses, ttl, %caller, "join token created");
                return Ok(Response::new(CreateJoinTokenResponse {
                    token: Some(redacted(token)),
                    secret,
                }));
            }
        }
        Err(Status::aborted("could not pick a free token id; retry"))
    }

    async fn list_join_tokens(
        &self,
        request: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        self.auth.admin(&request)?;
        let (kvs, _) = self
            .store
            .get_prefix(&self.store.keys().dir(ObjectKind::JoinToken))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let tokens = kvs
            .iter()
            .map(|kv| {
                decode::<JoinToken>(kv).map(|mut t| {
                    t.revision = kv.mod_revision();
                    redacted(t)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ListJoinTokensResponse { tokens }))
    }

    async fn delete_join_token(
        &self,
        request: Request<DeleteJoinTokenRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.auth.admin(&request)?;
        let id = request.into_inner().id;
        if !api_key::is_valid_id(&id) {
            return Err(Status::invalid_argument(format!(
                "id: {id:?} is not a join token id"
            )));
        }
        let key = self.token_key(&id);
        let compares = vec![Compare::version(key.clone(), CompareOp::Greater, 0)];
        let ops = vec![TxnOp::delete(key, None)];
        match self
            .store
            .guarded(compares, ops)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
        {
            Some(revision) => {
                tracing::info!(token = %id, "join token deleted");
                Ok(Response::new(DeleteResponse { revision }))
            }
            None => Err(Status::not_found(format!(
                "join token {id:?} does not exist"
            ))),
        }
    }

    async fn issue(
        &self,
        request: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        let Some(ca) = self.ca.clone() else {
            return Err(Status::failed_precondition(
                "this control plane issues no certificates (start it with --ca-cert and --ca-key)",
            ));
        };
        let peer = peer_identity(&request);
        let presented = Authorizer::presented(&request);
        let r = request.into_inner();
        if r.csr_pem.len() > 16 * 1024 {
            return Err(Status::invalid_argument("csr_pem: larger than 16 KiB"));
        }
        let via;
        let identity = if !r.service_account_token.is_empty() {
            let Some(reviewer) = &self.tokens else {
                return Err(Status::failed_precondition(
                    "this control plane does not take service-account tokens (start it with --kubernetes-token-review)",
                ));
            };
            let identity = reviewer
                .identity_for(&r.service_account_token, &r.endpoint_id)
                .await?;
            via = "serviceaccount".to_string();
            tracing::info!(identity = %identity.uri(), "service-account token accepted");
            identity
        } else if r.join_token.is_empty() {
            via = "renewal".to_string();
            // Renewal: the identity of the certificate presented now.
            let peer = peer.ok_or_else(|| {
                Status::unauthenticated(
                    "renewing needs the current certificate (mutual TLS), or a join_token",
                )
            })?;
            self.auth.not_revoked(presented.as_ref())?;
            match (peer.role, &peer.scope) {
                (PeerRole::Edge, _) | (PeerRole::Sidecar, Some(_)) => peer,
                _ => {
                    return Err(Status::permission_denied(format!(
                        "{} is not an identity this control plane renews",
                        peer.uri()
                    )));
                }
            }
        } else {
            let token = self.spend(&r.join_token).await?;
            via = format!("token:{}", token.id);
            let identity = Self::identity_for(&token, &r.endpoint_id)?;
            tracing::info!(token = %token.id, uses_left = token.uses_left, identity = %identity.uri(), "join token used");
            identity
        };
        let (certificate_pem, not_after) = ca
            .issue_for_csr(&r.csr_pem, &identity, self.ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
        let not_after_unix_ms = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let serial = self.record(&identity, &certificate_pem, via).await?;
        tracing::info!(identity = %identity.uri(), %serial, ttl = ?self.ttl, "certificate issued");
        Ok(Response::new(IssueResponse {
            certificate_pem,
            ca_pem: ca.cert_pem().to_string(),
            identity: identity.uri(),
            not_after_unix_ms,
        }))
    }

    async fn list_issued_identities(
        &self,
        request: Request<ListIssuedIdentitiesRequest>,
    ) -> Result<Response<ListIssuedIdentitiesResponse>, Status> {
        self.auth.admin(&request)?;
        let prefix = request.into_inner().prefix;
        let matches = |identity: &str| identity.starts_with(&prefix);
        let keys = self.store.keys();
        let read = |kind| async move {
            self.store
                .get_prefix(&keys.dir(kind))
                .await
                .map(|(kvs, _)| kvs)
                .map_err(|e| Status::unavailable(e.to_string()))
        };
        let now = now_unix_ms();
        let mut identities = Vec::new();
        for kv in read(ObjectKind::IssuedIdentity).await? {
            let mut record =
                decode::<IssuedIdentity>(&kv).map_err(|e| Status::internal(e.to_string()))?;
            record.certificates.retain(|c| c.not_after_unix_ms > now);
            if matches(&record.identity) && !record.certificates.is_empty() {
                record.revision = kv.mod_revision();
                identities.push(record);
            }
        }
        let mut revocations = Vec::new();
        for kv in read(ObjectKind::Revocation).await? {
            let mut revocation =
                decode::<Revocation>(&kv).map_err(|e| Status::internal(e.to_string()))?;
            if matches(&revocation.identity) {
                revocation.revision = kv.mod_revision();
                revocations.push(revocation);
            }
        }
        Ok(Response::new(ListIssuedIdentitiesResponse {
            identities,
            revocations,
        }))
    }

    async fn revoke_identity(
        &self,
        request: Request<RevokeIdentityRequest>,
    ) -> Result<Response<RevokeIdentityResponse>, Status> {
        let caller = self.auth.admin(&request)?;
        let identity = parse_identity(&request.into_inner().identity)?;
        let name = stored_name(&identity);
        let keys = self.store.keys();
        let issued_key = keys.object(ObjectKind::IssuedIdentity, &name);
        let revocation_key = keys.object(ObjectKind::Revocation, &name);
        let unavailable = |e: crate::store::StoreError| Status::unavailable(e.to_string());
        for _ in 0..ATTEMPTS {
            let issued = self.store.get(&issued_key).await.map_err(unavailable)?;
            let earlier = self.store.get(&revocation_key).await.map_err(unavailable)?;
            let mut compares = vec![match &issued {
                Some(kv) => {
                    Compare::mod_revision(issued_key.clone(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::version(issued_key.clone(), CompareOp::Equal, 0),
            }];
            let now = now_unix_ms();
            let mut revocation = match &earlier {
                Some(kv) => {
                    decode::<Revocation>(kv).map_err(|e| Status::internal(e.to_string()))?
                }
                None => Revocation {
                    identity: identity.to_string(),
                    ..Default::default()
                },
            };
            compares.push(match &earlier {
                Some(kv) => Compare::mod_revision(
                    revocation_key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ),
                None => Compare::version(revocation_key.clone(), CompareOp::Equal, 0),
            });
            let certificates = match &issued {
                Some(kv) => {
                    decode::<IssuedIdentity>(kv)
                        .map_err(|e| Status::internal(e.to_string()))?
                        .certificates
                }
                None => Vec::new(),
            };
            let valid: Vec<_> = certificates
                .into_iter()
                .filter(|c| c.not_after_unix_ms > now)
                .collect();
            if valid.is_empty() {
                return Err(Status::not_found(format!(
                    "no certificate issued to {identity} is still valid",
                )));
            }
            for certificate in &valid {
                if !revocation.serials.contains(&certificate.serial) {
                    revocation.serials.push(certificate.serial.clone());
                }
                revocation.expires_at_unix_ms = revocation
                    .expires_at_unix_ms
                    .max(certificate.not_after_unix_ms);
            }
            revocation.revoked_at_unix_ms = now;
            revocation.revoked_by = caller.to_string();
            revocation.revision = 0;
            let mut ops = vec![
                TxnOp::put(
                    revocation_key.clone(),
                    revocation.encode_to_vec(),
                    None::<PutOptions>,
                ),
                TxnOp::delete(issued_key.clone(), None),
            ];
            // A sidecar identity's own endpoint, if it is registered where the identity says.
            let mut removed = Vec::new();
            if let (PeerRole::Sidecar, Some(scope)) = (identity.role, &identity.scope) {
                let endpoint_key = keys.object(ObjectKind::Endpoint, &identity.name);
                if let Some(kv) = self.store.get(&endpoint_key).await.map_err(unavailable)? {
                    let endpoint =
                        decode::<Endpoint>(&kv).map_err(|e| Status::internal(e.to_string()))?;
                    if endpoint.pool == scope.pool && endpoint.region == scope.region {
                        compares.push(Compare::mod_revision(
                            endpoint_key.clone(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ));
                        ops.push(TxnOp::delete(endpoint_key, None));
                        removed.push(identity.name.clone());
                    }
                }
            }
            if let Some(revision) = self
                .store
                .guarded(compares, ops)
                .await
                .map_err(unavailable)?
            {
                revocation.revision = revision;
                tracing::warn!(identity = %identity, serials = revocation.serials.len(), endpoints_removed = ?removed, %caller, "identity revoked");
                return Ok(Response::new(RevokeIdentityResponse {
                    revocation: Some(revocation),
                    endpoints_removed: removed,
                }));
            }
        }
        Err(Status::aborted(
            "the identity's records kept changing; retry",
        ))
    }
}
