//! The record of certificates issued to each identity: serial and
//! validity of every certificate still valid, which revocation reads.

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_proto::v1::{IssuedCertificate, IssuedIdentity};
use infermesh_runtime::time::now_unix_ms;
use infermesh_runtime::tls::PeerIdentity;
use prost::Message;
use tonic::Status;

use super::{ATTEMPTS, IdentityApi};
use crate::store::{ObjectKind, decode, identity_name as stored_name};

impl IdentityApi {
    /// Records the certificate `pem` issued to `identity` (pruning expired
    /// ones); returns its serial.
    pub(super) async fn record(
        &self,
        identity: &PeerIdentity,
        pem: &str,
        via: String,
    ) -> Result<String, Status> {
        let issued = issued_certificate(pem, via)
            .ok_or_else(|| Status::internal("the issued certificate does not parse"))?;
        let key = self
            .store
            .keys()
            .object(ObjectKind::IssuedIdentity, &stored_name(identity));
        for _ in 0..ATTEMPTS {
            let kv = self
                .store
                .get(&key)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let (mut record, compare) = match &kv {
                Some(kv) => (
                    decode::<IssuedIdentity>(kv).map_err(|e| Status::internal(e.to_string()))?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    IssuedIdentity {
                        identity: identity.to_string(),
                        ..Default::default()
                    },
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                ),
            };
            let now = now_unix_ms();
            record.certificates.retain(|c| c.not_after_unix_ms > now);
            record.certificates.push(issued.clone());
            record.revision = 0;
            let ops = vec![TxnOp::put(
                key.clone(),
                record.encode_to_vec(),
                None::<PutOptions>,
            )];
            if self
                .store
                .guarded(vec![compare], ops)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .is_some()
            {
                return Ok(issued.serial);
            }
        }
        Err(Status::aborted(
            "the record of issued certificates kept changing; retry",
        ))
    }
}

/// Serial and validity of the certificate in `pem`.
fn issued_certificate(pem: &str, via: String) -> Option<IssuedCertificate> {
    let (serial, not_before_unix_ms, not_after_unix_ms) =
        infermesh_runtime::tls::identity::serial_and_validity(pem)?;
    Some(IssuedCertificate {
        serial,
        not_before_unix_ms,
        not_after_unix_ms,
        via,
    })
}
