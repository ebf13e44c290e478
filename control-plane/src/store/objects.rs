//! Typed reads of registry objects: decode the stored protobuf and stamp it
//! with its key's mod_revision, which is what update guards compare against.

use infermesh_proto::v1::{Adapter, ApiKey, Endpoint, Model, Pool, Region, Tenant};
use infermesh_runtime::table_delta::Keyed;

use super::{ObjectKind, Store, StoreError, decode};

/// A registry object stored as one key, named by its `Keyed` key.
pub trait Object: Keyed + prost::Message + Default + Clone + 'static {
    /// Which directory it lives in.
    const KIND: ObjectKind;
    /// Its unique name (the last key segment).
    fn name(&self) -> &str {
        self.key()
    }
    /// The revision it carries.
    fn revision(&self) -> i64;
    /// Stamps the revision read from etcd.
    fn set_revision(&mut self, revision: i64);
}

macro_rules! revisioned_object {
    ($ty:ty, $kind:expr) => {
        impl Object for $ty {
            const KIND: ObjectKind = $kind;
            fn revision(&self) -> i64 {
                self.revision
            }
            fn set_revision(&mut self, revision: i64) {
                self.revision = revision;
            }
        }
    };
}

revisioned_object!(Model, ObjectKind::Model);
revisioned_object!(Pool, ObjectKind::Pool);
revisioned_object!(Region, ObjectKind::Region);
revisioned_object!(Tenant, ObjectKind::Tenant);
revisioned_object!(Adapter, ObjectKind::Adapter);
// A key is stored under its id; its `name` field is only a label.
revisioned_object!(ApiKey, ObjectKind::ApiKey);

impl Object for Endpoint {
    const KIND: ObjectKind = ObjectKind::Endpoint;
    fn revision(&self) -> i64 {
        0
    }
    fn set_revision(&mut self, _revision: i64) {}
}

/// Decodes a stored object and stamps its revision.
pub fn stored<T: Object>(kv: &etcd_client::KeyValue) -> Result<T, StoreError> {
    let mut object: T = decode(kv)?;
    object.set_revision(kv.mod_revision());
    Ok(object)
}

impl Store {
    /// One object by name, if it exists.
    pub async fn read<T: Object>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let key = self.keys().object(T::KIND, name);
        self.get(&key).await?.as_ref().map(stored::<T>).transpose()
    }

    /// Every object of a kind, sorted by name, and the revision of the read.
    pub async fn list<T: Object>(&self) -> Result<(Vec<T>, i64), StoreError> {
        let (kvs, revision) = self.get_prefix(&self.keys().dir(T::KIND)).await?;
        let objects = kvs.iter().map(stored::<T>).collect::<Result<Vec<T>, _>>()?;
        Ok((objects, revision))
    }
}
