//! Join tokens: the store key of each, spending one use of a token in a
//! transaction guarded by its revision, and the identity a token's scope
//! yields. Secrets are compared by digest and never logged.

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_proto::v1::JoinToken;
use infermesh_runtime::api_key;
use infermesh_runtime::time::now_unix_ms;
use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use prost::Message;
use tonic::Status;

use super::{ATTEMPTS, IdentityApi};
use crate::registry::validate;
use crate::store::{ObjectKind, decode};

/// The visible start of every join-token secret.
pub(super) const PREFIX: &str = "imjt_";

impl IdentityApi {
    /// The store key of join token `id`.
    pub(super) fn token_key(&self, id: &str) -> String {
        self.store.keys().object(ObjectKind::JoinToken, id)
    }

    /// The identity a token yields for `endpoint_id`.
    pub(super) fn identity_for(
        token: &JoinToken,
        endpoint_id: &str,
    ) -> Result<PeerIdentity, Status> {
        let bad =
            |e: infermesh_runtime::tls::IdentityError| Status::invalid_argument(e.to_string());
        match token.role.as_str() {
            "edge" => PeerIdentity::new(PeerRole::Edge, token.region.as_str()).map_err(bad),
            "sidecar" => {
                validate::endpoint_id("endpoint_id", endpoint_id)?;
                PeerIdentity::sidecar(token.region.as_str(), token.pool.as_str(), endpoint_id)
                    .map_err(bad)
            }
            other => Err(Status::failed_precondition(format!(
                "join token {} has an unknown role {other:?}",
                token.id
            ))),
        }
    }

    /// Spends one use of the token whose secret is `secret`; returns it.
    pub(super) async fn spend(&self, secret: &str) -> Result<JoinToken, Status> {
        let refused = || Status::unauthenticated("join token not recognised");
        let id = claimed_id(secret).ok_or_else(refused)?;
        let key = self.token_key(id);
        for _ in 0..ATTEMPTS {
            let kv = self
                .store
                .get(&key)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(refused)?;
            let mut token: JoinToken = decode(&kv).map_err(|e| Status::internal(e.to_string()))?;
            if !api_key::matches(secret, &token.secret_sha256) {
                return Err(refused());
            }
            if token.expires_at_unix_ms <= now_unix_ms() {
                return Err(Status::permission_denied(format!(
                    "join token {} has expired",
                    token.id
                )));
            }
            if token.uses_left == 0 {
                return Err(Status::permission_denied(format!(
                    "join token {} is used up",
                    token.id
                )));
            }
            token.uses_left -= 1;
            let compares = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )];
            let ops = vec![TxnOp::put(
                key.clone(),
                token.encode_to_vec(),
                None::<PutOptions>,
            )];
            match self.store.guarded(compares, ops).await {
                Ok(Some(_)) => return Ok(token),
                Ok(None) => continue,
                Err(error) => return Err(Status::unavailable(error.to_string())),
            }
        }
        Err(Status::aborted(
            "join token used concurrently by many callers; retry",
        ))
    }
}

/// The token id a secret claims, if it has a join token's shape.
fn claimed_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    (api_key::is_valid_id(id) && !random.is_empty()).then_some(id)
}

/// `token` without its hash, for answers.
pub(super) fn redacted(mut token: JoinToken) -> JoinToken {
    token.secret_sha256.clear();
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_secrets_of_the_join_token_shape_claim_an_id() {
        assert_eq!(claimed_id("imjt_abcdefghijkl_xyz"), Some("abcdefghijkl"));
        for not in [
            "imk_abcdefghijkl_xyz",
            "imjt_short_xyz",
            "imjt_abcdefghijkl_",
            "imjt_abcdefghijkl",
        ] {
            assert_eq!(claimed_id(not), None, "{not}");
        }
    }
}
