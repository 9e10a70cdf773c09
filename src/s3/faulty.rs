//! An [`ObjectStore`] wrapper that injects what the network does to real
//! requests: stalls (accepted, never answered), failures and panics, each
//! for the keys containing a given text. For unit tests of the layers above.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectMeta, ObjectStore, S3Error};
use crate::retry::Deadline;

/// What happens to a request whose key (or listing prefix) matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Never answers: the call ends at its deadline with `TimedOut`.
    Hang,
    /// Fails at once with a network error.
    Fail,
    /// The task making the request panics.
    Panic,
}

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Mutex<Vec<(String, Fault)>>,
    /// Requests that met a fault.
    pub injected: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            faults: Mutex::new(Vec::new()),
            injected: AtomicU64::new(0),
        }
    }

    /// Requests for keys containing `text` meet `fault` from now on.
    pub fn inject(&self, text: &str, fault: Fault) {
        self.lock().push((text.to_string(), fault));
    }

    /// No more faults.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Fault)>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn gate(&self, key: &str, deadline: Deadline) -> Result<(), S3Error> {
        let fault = self
            .lock()
            .iter()
            .find(|(t, _)| key.contains(t.as_str()))
            .map(|(_, f)| f.clone());
        let Some(fault) = fault else {
            return Ok(());
        };
        self.injected.fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::Hang => {
                deadline.run(std::future::pending::<()>()).await;
                Err(S3Error::TimedOut)
            }
            Fault::Fail => Err(S3Error::Network("injected failure".into())),
            Fault::Panic => panic!("injected panic for {key}"),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
        deadline: Deadline,
    ) -> Result<ListPage, S3Error> {
        self.gate(prefix, deadline).await?;
        self.inner
            .list(prefix, delimiter, continuation, max_keys, deadline)
            .await
    }

    async fn head(&self, key: &str, deadline: Deadline) -> Result<ObjectMeta, S3Error> {
        self.gate(key, deadline).await?;
        self.inner.head(key, deadline).await
    }

    async fn get_first(
        &self,
        key: &str,
        len: u64,
        deadline: Deadline,
    ) -> Result<Option<(Bytes, ObjectMeta)>, S3Error> {
        self.gate(key, deadline).await?;
        self.inner.get_first(key, len, deadline).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        deadline: Deadline,
    ) -> Result<Bytes, S3Error> {
        self.gate(key, deadline).await?;
        self.inner.get_range(key, range, version, deadline).await
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        piece: u64,
        deadline: Deadline,
    ) -> Result<Vec<Bytes>, S3Error> {
        self.gate(key, deadline).await?;
        self.inner
            .get_pieces(key, range, version, piece, deadline)
            .await
    }

    async fn get_pieces_each(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        piece: u64,
        deadline: Deadline,
        sink: &(dyn Fn(Bytes) + Send + Sync),
    ) -> Result<(), S3Error> {
        self.gate(key, deadline).await?;
        self.inner
            .get_pieces_each(key, range, version, piece, deadline, sink)
            .await
    }
}
