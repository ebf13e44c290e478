//! Registered replicas: each endpoint key is bound to an etcd lease that the
//! control plane keeps alive while the sidecar's stream lives, so a replica
//! whose sidecar or control plane dies leaves every table on its own.

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use infermesh_proto::v1::Endpoint;
use prost::Message;

use super::{LeaseError, ObjectKind, Store, StoreError};

/// Whether `error` says the lease it concerns no longer exists: NOT_FOUND,
/// or the client's own "lease not found" when a keep-alive answers TTL 0.
pub fn lease_gone(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::NotFound,
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        _ => false,
    }
}

impl Store {
    /// A new lease of `ttl_seconds`.
    pub async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        Ok(self
            .call("lease_grant", |mut client| async move {
                client.lease_grant(ttl_seconds, None).await
            })
            .await?
            .id())
    }

    /// Opens the keep-alive stream of a lease.
    pub async fn keep_alive(
        &self,
        lease: i64,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), StoreError> {
        Ok(self.client().lease_keep_alive(lease).await?)
    }

    /// Renews a lease once; an error when it has expired or etcd cannot be reached.
    pub async fn renew_lease(&self, lease: i64) -> Result<(), StoreError> {
        let expired = || StoreError::from(LeaseError::Expired { lease });
        let gone = |error: etcd_client::Error| {
            if lease_gone(&error) {
                expired()
            } else {
                StoreError::from(error)
            }
        };
        let (mut keeper, mut responses) =
            self.client().lease_keep_alive(lease).await.map_err(gone)?;
        keeper.keep_alive().await.map_err(gone)?;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), responses.message())
            .await
            .map_err(|_| LeaseError::Unanswered { lease })?
            .map_err(gone)?;
        match answer {
            Some(response) if response.ttl() > 0 => Ok(()),
            Some(_) => Err(expired()),
            None => Err(LeaseError::StreamClosed { lease }.into()),
        }
    }

    /// Ends a lease now, deleting the keys still bound to it.
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.call("lease_revoke", |mut client| async move {
            client.lease_revoke(lease).await
        })
        .await?;
        Ok(())
    }

    /// Deletes an endpoint if its key is still bound to `lease`; whether it was.
    pub async fn delete_endpoint(&self, id: &str, lease: i64) -> Result<bool, StoreError> {
        let key = self.keys().object(ObjectKind::Endpoint, id);
        let resp = self
            .call("txn", |mut client| {
                let txn = etcd_client::Txn::new()
                    .when(vec![etcd_client::Compare::lease(
                        key.clone(),
                        etcd_client::CompareOp::Equal,
                        lease,
                    )])
                    .and_then(vec![etcd_client::TxnOp::delete(key.clone(), None)]);
                async move { client.txn(txn).await }
            })
            .await?;
        if resp.succeeded()
            && let Some(header) = resp.header()
        {
            self.committed(header.revision());
        }
        Ok(resp.succeeded())
    }

    /// Writes an endpoint bound to `lease` (re-binding it if it had another).
    pub async fn put_endpoint(&self, endpoint: &Endpoint, lease: i64) -> Result<(), StoreError> {
        let key = self.keys().object(ObjectKind::Endpoint, &endpoint.id);
        let value = endpoint.encode_to_vec();
        let resp = self
            .call("put", |mut client| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    client
                        .put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await?;
        if let Some(header) = resp.header() {
            self.committed(header.revision());
        }
        Ok(())
    }
}

impl Store {
    /// Writes a value that is in no routing table (a load digest, a
    /// decision), bound to `lease` when given; not counted as a registry write.
    pub async fn put_aux(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let key = key.to_string();
        self.call("put", |mut client| {
            let (key, value) = (key.clone(), value.clone());
            let options = lease.map(|l| PutOptions::new().with_lease(l));
            async move { client.put(key, value, options).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes one key that is in no routing table.
    pub async fn delete_aux(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.call("delete", |mut client| {
            let key = key.clone();
            async move { client.delete(key, None).await }
        })
        .await?;
        Ok(())
    }
}
