//! The model registry and region topology: create, update and delete of
//! models, pools and regions as etcd transactions. Each write reads what it
//! depends on, then commits only if none of it changed (compare on
//! revisions); when a guard fails the checks run again, so a refusal always
//! describes the state the caller would see. An update merges the request
//! into the object stored at the revision the caller read, as its update
//! mask says, and validates the result before anything is written.

mod access;
mod adapters;
mod error;
mod mask;
pub mod validate;

use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_proto::v1::{Model, Pool, Region};
use prost::Message;
use prost_types::FieldMask;

pub use access::redacted;
pub use adapters::check_adapter;
pub use error::RegistryError;
use mask::{Masked, UpdateMask};

use crate::store::objects::Object;
use crate::store::{ObjectKind, Store, prefix_end};

/// How often a write re-reads and retries when a concurrent write moved what it depends on.
const ATTEMPTS: usize = 5;

/// Registry operations over the store.
#[derive(Clone)]
pub struct Registry {
    store: Store,
}

fn put(key: String, value: Vec<u8>) -> TxnOp {
    TxnOp::put(key, value, None::<PutOptions>)
}

impl Registry {
    /// A registry over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The store the registry writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn key(&self, kind: ObjectKind, name: &str) -> String {
        self.store.keys().object(kind, name)
    }

    /// One object, or `NotFound`.
    pub async fn get<T: Object>(&self, name: &str) -> Result<T, RegistryError> {
        self.store
            .read::<T>(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                kind: T::KIND,
                name: name.to_string(),
            })
    }

    /// Every object of a kind, sorted by name.
    pub async fn list<T: Object>(&self) -> Result<Vec<T>, RegistryError> {
        Ok(self.store.list::<T>().await?.0)
    }

    /// Which model owns each of `names` (model names and aliases share one namespace).
    async fn owners(&self, names: &[&str]) -> Result<Vec<Option<String>>, RegistryError> {
        let mut owners = Vec::with_capacity(names.len());
        for name in names {
            let kv = self.store.get(&self.key(ObjectKind::Name, name)).await?;
            owners.push(kv.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()));
        }
        Ok(owners)
    }

    fn stale<T: Object>(name: &str, given: i64, current: i64) -> RegistryError {
        RegistryError::StaleRevision {
            kind: T::KIND,
            name: name.to_string(),
            given,
            current,
        }
    }

    fn contended<T: Object>(name: &str) -> RegistryError {
        RegistryError::Contended {
            kind: T::KIND,
            name: name.to_string(),
        }
    }

    /// Reads the stored object for an update or delete and checks the caller's revision.
    /// `required`: an update must name the revision it read; a delete may leave it 0.
    async fn current<T: Object>(
        &self,
        name: &str,
        given: i64,
        required: bool,
    ) -> Result<T, RegistryError> {
        let current: T = self.get(name).await?;
        if required && given == 0 {
            return Err(RegistryError::invalid(
                format!("{}.revision", T::KIND.noun()),
                format!(
                    "required for update: send the revision you read (current revision is {})",
                    current.revision()
                ),
            ));
        }
        if given != 0 && given != current.revision() {
            return Err(Self::stale::<T>(name, given, current.revision()));
        }
        Ok(current)
    }

    /// The stored object at the caller's revision with `sent` applied as
    /// `mask` says: what an update writes, once validated.
    async fn merged<T: Object + Masked>(
        &self,
        sent: &T,
        mask: &UpdateMask<T>,
    ) -> Result<(T, T), RegistryError> {
        let current: T = self.current(sent.name(), sent.revision(), true).await?;
        let next = mask.apply(&current, sent)?;
        Ok((current, next))
    }

    /// Creates a model; its name and aliases must be free.
    pub async fn create_model(&self, mut model: Model) -> Result<Model, RegistryError> {
        validate::model(&model)?;
        model.revision = 0;
        let mut names: Vec<&str> = vec![model.name.as_str()];
        names.extend(model.aliases.iter().map(String::as_str));
        for _ in 0..ATTEMPTS {
            for (name, owner) in names.iter().zip(self.owners(&names).await?) {
                if let Some(owner) = owner {
                    return Err(RegistryError::AlreadyExists(if owner == *name {
                        format!("model {name:?} already exists")
                    } else {
                        format!(
                            "name {name:?} is already used by {}",
                            adapters::owner_phrase(&owner)
                        )
                    }));
                }
            }
            let mut compares = vec![Compare::version(
                self.key(ObjectKind::Model, &model.name),
                CompareOp::Equal,
                0,
            )];
            let mut ops = vec![put(
                self.key(ObjectKind::Model, &model.name),
                model.encode_to_vec(),
            )];
            for name in &names {
                compares.push(Compare::version(
                    self.key(ObjectKind::Name, name),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(put(
                    self.key(ObjectKind::Name, name),
                    model.name.clone().into_bytes(),
                ));
            }
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                model.revision = revision;
                return Ok(model);
            }
        }
        Err(Self::contended::<Model>(&model.name))
    }

    /// Changes the fields `mask` names (without one, those set in `sent`)
    /// of the model whose stored revision equals `sent.revision`.
    pub async fn update_model(
        &self,
        sent: Model,
        mask: Option<FieldMask>,
    ) -> Result<Model, RegistryError> {
        let mask = UpdateMask::parse(mask)?;
        validate::model_name("model.name", &sent.name)?;
        let given = sent.revision;
        for _ in 0..ATTEMPTS {
            let (current, mut model) = self.merged(&sent, &mask).await?;
            validate::model(&model)?;
            let old: BTreeSet<&str> = current.aliases.iter().map(String::as_str).collect();
            let new: BTreeSet<&str> = model.aliases.iter().map(String::as_str).collect();
            let added: Vec<&str> = new.difference(&old).copied().collect();
            for (alias, owner) in added.iter().zip(self.owners(&added).await?) {
                if let Some(owner) = owner {
                    return Err(RegistryError::AlreadyExists(format!(
                        "name {alias:?} is already used by {}",
                        adapters::owner_phrase(&owner)
                    )));
                }
            }
            let key = self.key(ObjectKind::Model, &model.name);
            let mut compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, given)];
            let mut ops = vec![put(key, model.encode_to_vec())];
            for alias in &added {
                compares.push(Compare::version(
                    self.key(ObjectKind::Name, alias),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(put(
                    self.key(ObjectKind::Name, alias),
                    model.name.clone().into_bytes(),
                ));
            }
            for alias in old.difference(&new) {
                ops.push(TxnOp::delete(self.key(ObjectKind::Name, alias), None));
            }
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                model.revision = revision;
                return Ok(model);
            }
        }
        Err(Self::contended::<Model>(&sent.name))
    }

    /// Names of the pools that satisfy `uses`, and the revision of the read.
    async fn pools_using(
        &self,
        uses: impl Fn(&Pool) -> bool,
    ) -> Result<(Vec<String>, i64), RegistryError> {
        let (pools, revision) = self.store.list::<Pool>().await?;
        let names = pools
            .into_iter()
            .filter(|p| uses(p))
            .map(|p| p.name)
            .collect();
        Ok((names, revision))
    }

    /// A guard that fails if any pool was written after `revision`.
    fn no_pool_changed_since(&self, revision: i64) -> Compare {
        self.none_changed_since(ObjectKind::Pool, revision)
    }

    /// A guard that fails if any object of `kind` was written after `revision`.
    fn none_changed_since(&self, kind: ObjectKind, revision: i64) -> Compare {
        let dir = self.store.keys().dir(kind);
        Compare::mod_revision(dir.clone(), CompareOp::Less, revision + 1)
            .with_range(prefix_end(&dir))
    }

    /// Deletes a model no pool serves.
    pub async fn delete_model(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        for _ in 0..ATTEMPTS {
            let current: Model = self.current(name, given, false).await?;
            let (users, read_at) = self.pools_using(|p| p.model == name).await?;
            if !users.is_empty() {
                return Err(RegistryError::InUse {
                    kind: ObjectKind::Model,
                    name: name.to_string(),
                    by_kind: "pools",
                    by: users,
                });
            }
            let (adapters, adapters_read_at) = self.adapters_on(name).await?;
            if !adapters.is_empty() {
                return Err(RegistryError::InUse {
                    kind: ObjectKind::Model,
                    name: name.to_string(),
                    by_kind: "adapters",
                    by: adapters,
                });
            }
            let key = self.key(ObjectKind::Model, name);
            let compares = vec![
                Compare::mod_revision(key.clone(), CompareOp::Equal, current.revision),
                self.no_pool_changed_since(read_at),
                self.none_changed_since(ObjectKind::Adapter, adapters_read_at),
            ];
            let mut ops = vec![
                TxnOp::delete(key, None),
                TxnOp::delete(self.key(ObjectKind::Name, name), None),
            ];
            for alias in &current.aliases {
                ops.push(TxnOp::delete(self.key(ObjectKind::Name, alias), None));
            }
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                return Ok(revision);
            }
        }
        Err(Self::contended::<Model>(name))
    }

    /// Guards that the model and region a pool names exist, or says which does not.
    async fn pool_references(&self, pool: &Pool) -> Result<Vec<Compare>, RegistryError> {
        if self.store.read::<Model>(&pool.model).await?.is_none() {
            return Err(RegistryError::MissingReference {
                field: "pool.model".into(),
                kind: ObjectKind::Model,
                name: pool.model.clone(),
            });
        }
        if self.store.read::<Region>(&pool.region).await?.is_none() {
            return Err(RegistryError::MissingReference {
                field: "pool.region".into(),
                kind: ObjectKind::Region,
                name: pool.region.clone(),
            });
        }
        Ok(vec![
            Compare::version(
                self.key(ObjectKind::Model, &pool.model),
                CompareOp::Greater,
                0,
            ),
            Compare::version(
                self.key(ObjectKind::Region, &pool.region),
                CompareOp::Greater,
                0,
            ),
        ])
    }

    /// Creates a pool of an existing model in an existing region.
    pub async fn create_pool(&self, mut pool: Pool) -> Result<Pool, RegistryError> {
        validate::pool(&pool)?;
        pool.revision = 0;
        let key = self.key(ObjectKind::Pool, &pool.name);
        for _ in 0..ATTEMPTS {
            if self.store.read::<Pool>(&pool.name).await?.is_some() {
                return Err(RegistryError::AlreadyExists(format!(
                    "pool {:?} already exists",
                    pool.name
                )));
            }
            let mut compares = self.pool_references(&pool).await?;
            compares.push(Compare::version(key.clone(), CompareOp::Equal, 0));
            let ops = vec![put(key.clone(), pool.encode_to_vec())];
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                pool.revision = revision;
                return Ok(pool);
            }
        }
        Err(Self::contended::<Pool>(&pool.name))
    }

    /// Changes the fields `mask` names (without one, those set in `sent`)
    /// of the pool whose stored revision equals `sent.revision`.
    pub async fn update_pool(
        &self,
        sent: Pool,
        mask: Option<FieldMask>,
    ) -> Result<Pool, RegistryError> {
        let mask = UpdateMask::parse(mask)?;
        validate::dns_label("pool.name", &sent.name)?;
        let given = sent.revision;
        let key = self.key(ObjectKind::Pool, &sent.name);
        for _ in 0..ATTEMPTS {
            let (_, mut pool) = self.merged(&sent, &mask).await?;
            validate::pool(&pool)?;
            let mut compares = self.pool_references(&pool).await?;
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, given));
            let ops = vec![put(key.clone(), pool.encode_to_vec())];
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                pool.revision = revision;
                return Ok(pool);
            }
        }
        Err(Self::contended::<Pool>(&sent.name))
    }

    /// Deletes a pool; its endpoints stay registered but leave routing tables.
    pub async fn delete_pool(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        self.delete_plain::<Pool>(name, given).await
    }

    async fn delete_plain<T: Object>(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        for _ in 0..ATTEMPTS {
            let current: T = self.current(name, given, false).await?;
            let key = self.key(T::KIND, name);
            let compares = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                current.revision(),
            )];
            if let Some(revision) = self
                .store
                .guarded(compares, vec![TxnOp::delete(key, None)])
                .await?
            {
                return Ok(revision);
            }
        }
        Err(Self::contended::<T>(name))
    }

    /// Creates a region.
    pub async fn create_region(&self, region: Region) -> Result<Region, RegistryError> {
        validate::region(&region)?;
        self.create_plain(region).await
    }

    /// Changes the fields `mask` names (without one, those set in `sent`)
    /// of the region whose stored revision equals `sent.revision`.
    pub async fn update_region(
        &self,
        sent: Region,
        mask: Option<FieldMask>,
    ) -> Result<Region, RegistryError> {
        let mask = UpdateMask::parse(mask)?;
        validate::dns_label("region.name", &sent.name)?;
        let (_, region) = self.merged(&sent, &mask).await?;
        validate::region(&region)?;
        self.update_plain(region).await
    }

    /// Creates an object that refers to nothing else.
    async fn create_plain<T: Object>(&self, mut object: T) -> Result<T, RegistryError> {
        object.set_revision(0);
        let key = self.key(T::KIND, object.name());
        let compares = vec![Compare::version(key.clone(), CompareOp::Equal, 0)];
        match self
            .store
            .guarded(compares, vec![put(key, object.encode_to_vec())])
            .await?
        {
            Some(revision) => {
                object.set_revision(revision);
                Ok(object)
            }
            None => Err(RegistryError::AlreadyExists(format!(
                "{} {:?} already exists",
                T::KIND.noun(),
                object.name()
            ))),
        }
    }

    /// Replaces an object that refers to nothing else, guarded by its revision.
    async fn update_plain<T: Object>(&self, mut object: T) -> Result<T, RegistryError> {
        let given = object.revision();
        let key = self.key(T::KIND, object.name());
        for _ in 0..ATTEMPTS {
            self.current::<T>(object.name(), given, true).await?;
            let compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, given)];
            if let Some(revision) = self
                .store
                .guarded(compares, vec![put(key.clone(), object.encode_to_vec())])
                .await?
            {
                object.set_revision(revision);
                return Ok(object);
            }
        }
        Err(Self::contended::<T>(object.name()))
    }

    /// Deletes a region no pool runs in.
    pub async fn delete_region(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        for _ in 0..ATTEMPTS {
            let current: Region = self.current(name, given, false).await?;
            let (users, read_at) = self.pools_using(|p| p.region == name).await?;
            if !users.is_empty() {
                return Err(RegistryError::InUse {
                    kind: ObjectKind::Region,
                    name: name.to_string(),
                    by_kind: "pools",
                    by: users,
                });
            }
            let key = self.key(ObjectKind::Region, name);
            let compares = vec![
                Compare::mod_revision(key.clone(), CompareOp::Equal, current.revision),
                self.no_pool_changed_since(read_at),
            ];
            if let Some(revision) = self
                .store
                .guarded(compares, vec![TxnOp::delete(key, None)])
                .await?
            {
                return Ok(revision);
            }
        }
        Err(Self::contended::<Region>(name))
    }
}
