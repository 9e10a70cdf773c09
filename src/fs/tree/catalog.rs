//! The catalog of datasets: which handles exist for this user, where each
//! dataset's objects live, and the registry listing behind the root folder.
//!
//! The registry is listed at most once per registry TTL, however many
//! `ls` run, by one task whose result every caller shares (a caller that
//! gives up at its own deadline does not cancel it). A handle that is not
//! listed is fetched by itself (`fetch-dataset`), never by listing the
//! registry. With pinned datasets (`--dataset`) the registry is never
//! listed at all.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::{FutureExt, Shared};
use tracing::{info_span, warn, Instrument};

use crate::api::{ApiError, DataStoreClient};
use crate::fs::FsError;
use crate::retry::Deadline;
use crate::s3::{ObjectStore, StoreFactory};
use crate::wire::{split_handle, ItemDataset};

/// The data store registry, as the catalog needs it.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Every dataset the user may see (all pages).
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError>;
    /// One dataset's record.
    async fn fetch(&self, handle: &str, deadline: Deadline) -> Result<ItemDataset, ApiError>;
}

#[async_trait]
impl Registry for DataStoreClient {
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError> {
        self.list_datasets().await
    }
    async fn fetch(&self, handle: &str, deadline: Deadline) -> Result<ItemDataset, ApiError> {
        self.fetch_dataset(handle, deadline).await
    }
}

/// One dataset: where its objects live and how to reach them.
pub struct Dataset {
    pub handle: String,
    pub bucket: String,
    /// Key prefix, always ending in `/`.
    pub prefix: String,
    pub updated: SystemTime,
    /// Human-readable name from the registry, for `by-name/`.
    pub name: Option<String>,
    /// Its release status as the registry said it last (see [`Release`]):
    /// updated by every listing or fetch that sees the record, since a
    /// `PENDING` release may still be denied.
    pub release: Release,
    pub store: Arc<dyn ObjectStore>,
}

/// A dataset's release status (`release_status` in the registry record,
/// source: `../shared/docs/provena-api.md`): `RELEASED` data no longer
/// changes; `PENDING` waits for a reviewer, who may still deny it (and the
/// owner then change it again); anything else may change at any time.
#[derive(Default)]
pub struct Release(std::sync::atomic::AtomicU8);

impl Release {
    const OPEN: u8 = 0;
    const PENDING: u8 = 1;
    const RELEASED: u8 = 2;

    fn set(&self, status: Option<&str>) {
        let v = match status {
            Some("RELEASED") => Self::RELEASED,
            Some("PENDING") => Self::PENDING,
            _ => Self::OPEN,
        };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_released(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == Self::RELEASED
    }

    pub fn is_pending(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == Self::PENDING
    }
}

type Listed = Result<Arc<BTreeSet<String>>, FsError>;
type Flight = Shared<Pin<Box<dyn Future<Output = Listed> + Send>>>;

#[derive(Default)]
struct State {
    datasets: HashMap<String, Arc<Dataset>>,
    /// Handles the registry listed last, and when.
    listed: Option<(Instant, Arc<BTreeSet<String>>)>,
    /// Handles resolved by path although not listed (still shown).
    resolved: HashSet<String>,
    /// The registry listing in progress.
    listing: Option<Flight>,
}

pub struct Catalog {
    registry: Arc<dyn Registry>,
    stores: Arc<dyn StoreFactory>,
    /// How long a registry listing is trusted.
    ttl: Duration,
    /// Only these handles exist (`--dataset`).
    pinned: Option<Vec<String>>,
    mounted_at: SystemTime,
    state: Mutex<State>,
}

impl Catalog {
    pub fn new(
        registry: Arc<dyn Registry>,
        stores: Arc<dyn StoreFactory>,
        ttl: Duration,
        pinned: Option<Vec<String>>,
        mounted_at: SystemTime,
    ) -> Self {
        Self {
            registry,
            stores,
            ttl,
            pinned,
            mounted_at,
            state: Mutex::new(State::default()),
        }
    }

    /// Datasets resolved so far (their S3 location known).
    pub fn resolved_count(&self) -> usize {
        self.lock().datasets.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `handle` may exist in this mount (always, unless pinned).
    pub fn allows(&self, handle: &str) -> bool {
        self.pinned
            .as_ref()
            .is_none_or(|p| p.iter().any(|h| h == handle))
    }

    /// Whether a dataset with handle prefix `prefix` may exist here.
    pub fn allows_prefix(&self, prefix: &str) -> bool {
        self.pinned.as_ref().is_none_or(|p| {
            p.iter()
                .any(|h| split_handle(h).is_some_and(|(hp, _)| hp == prefix))
        })
    }

    /// The dataset `handle`, if already known (listed or resolved).
    pub fn known(&self, handle: &str) -> Option<Arc<Dataset>> {
        self.lock().datasets.get(handle).cloned()
    }

    /// `handle`'s record, fetched by itself (never by listing the registry).
    pub async fn fetch(&self, handle: &str, deadline: Deadline) -> Result<Arc<Dataset>, FsError> {
        if let Some(ds) = self.known(handle) {
            return Ok(ds);
        }
        let item = self
            .registry
            .fetch(handle, deadline)
            .await
            .map_err(|e| match e {
                // The service's words do not name the dataset.
                ApiError::PermissionDenied(d) => {
                    ApiError::PermissionDenied(format!("dataset {handle}: {d}"))
                }
                e => e,
            })?;
        if item.id != handle {
            warn!(asked = %handle, got = %item.id, "fetch-dataset returned another handle");
            return Err(FsError::NotFound);
        }
        // A dataset reached by its path is about to be read: its
        // credentials are asked for now, in the background, but only now
        // that its record says it exists (a typo, or a script probing
        // handles, costs the data store no credentials call: each is a
        // service token and an STS call there).
        self.stores.warm(handle, deadline);
        let mut st = self.lock();
        st.resolved.insert(handle.to_string());
        Ok(self.remember(&mut st, &item))
    }

    fn remember(&self, st: &mut State, item: &ItemDataset) -> Arc<Dataset> {
        if let Some(ds) = st.datasets.get(&item.id) {
            ds.release.set(item.release_status.as_deref());
            return ds.clone();
        }
        let mut prefix = item.s3.path.trim_start_matches('/').to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let ds = Arc::new(Dataset {
            handle: item.id.clone(),
            bucket: item.s3.bucket_name.clone(),
            store: self.stores.open(&item.id, &item.s3.bucket_name),
            prefix,
            name: item.name().map(str::to_string),
            release: Release::default(),
            updated: item
                .updated_timestamp
                .or(item.created_timestamp)
                .filter(|t| *t > 0)
                .map(|t| UNIX_EPOCH + Duration::from_secs(t as u64))
                .unwrap_or(self.mounted_at),
        });
        ds.release.set(item.release_status.as_deref());
        st.datasets.insert(item.id.clone(), ds.clone());
        ds
    }

    /// Every handle shown: the registry's (listed at most once per TTL),
    /// or the pinned ones, plus those resolved by path.
    pub async fn handles(
        self: &Arc<Self>,
        deadline: Deadline,
    ) -> Result<Vec<Arc<Dataset>>, FsError> {
        let listed = match &self.pinned {
            Some(pinned) => {
                for h in pinned {
                    self.fetch(h, deadline).await?;
                }
                Arc::new(pinned.iter().cloned().collect())
            }
            None => self.listed(deadline).await?,
        };
        let st = self.lock();
        Ok(st
            .datasets
            .values()
            .filter(|d| listed.contains(&d.handle) || st.resolved.contains(&d.handle))
            .filter(|d| self.allows(&d.handle))
            .cloned()
            .collect())
    }

    /// The registry's handles, from a listing no older than the TTL.
    async fn listed(self: &Arc<Self>, deadline: Deadline) -> Listed {
        let flight = {
            let mut st = self.lock();
            if let Some((at, set)) = &st.listed {
                if at.elapsed() < self.ttl {
                    return Ok(set.clone());
                }
            }
            match &st.listing {
                Some(f) => f.clone(),
                None => {
                    let me = self.clone();
                    let task = tokio::spawn(
                        async move { me.list_registry().await }.instrument(info_span!("registry")),
                    );
                    let f: Flight = (Box::pin(task.map(|r| match r {
                        Ok(listed) => listed,
                        Err(_) => Err(FsError::Io("the registry listing was interrupted".into())),
                    }))
                        as Pin<Box<dyn Future<Output = Listed> + Send>>)
                        .shared();
                    st.listing = Some(f.clone());
                    f
                }
            }
        };
        match deadline.run(flight).await {
            Some(r) => r,
            None => Err(FsError::TimedOut),
        }
    }

    async fn list_registry(&self) -> Listed {
        // However this ends (even by a panic), the next caller may list again.
        struct Done<'a>(&'a Catalog);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.lock().listing = None;
            }
        }
        let _done = Done(self);
        let result = self.registry.list().await;
        let mut st = self.lock();
        let items = result?;
        let mut set = BTreeSet::new();
        for item in &items {
            if split_handle(&item.id).is_none() {
                warn!(handle = %item.id, "registry returned a malformed handle; skipped");
                continue;
            }
            self.remember(&mut st, item);
            set.insert(item.id.clone());
        }
        let set = Arc::new(set);
        st.listed = Some((Instant::now(), set.clone()));
        Ok(set)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::s3::memory::MemoryStore;

    /// A dataset over an empty in-memory bucket, for table tests.
    pub fn dataset(handle: &str) -> Arc<Dataset> {
        Arc::new(Dataset {
            handle: handle.into(),
            bucket: "b".into(),
            prefix: format!("datasets/{}/", handle.replace(['.', '/'], "-")),
            updated: UNIX_EPOCH,
            name: None,
            release: Release::default(),
            store: Arc::new(MemoryStore::new()),
        })
    }
}
