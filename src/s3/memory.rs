//! An in-memory bucket with S3's listing rules, for unit tests.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use md5::Digest;

use super::{ListPage, ObjectMeta, ObjectStore, S3Error, StoreFactory};
use crate::retry::Deadline;

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, String)>>,
    pub lists: AtomicU64,
    pub heads: AtomicU64,
    pub gets: AtomicU64,
    pub page_size: usize,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            page_size: 1000,
            ..Default::default()
        }
    }

    /// A store whose listings answer at most `n` keys per page.
    pub fn with_page_size(n: usize) -> Self {
        Self {
            page_size: n,
            ..Self::default()
        }
    }

    /// Removes `key` (as a delete on S3 would).
    pub fn delete(&self, key: &str) {
        if let Ok(mut o) = self.objects.lock() {
            o.remove(key);
        }
    }

    pub fn put(&self, key: &str, data: impl Into<Bytes>) {
        let data = data.into();
        let etag = hex::encode(md5::Md5::digest(&data));
        if let Ok(mut o) = self.objects.lock() {
            o.insert(key.to_string(), (data, etag));
        }
    }

    fn meta(key: &str, data: &Bytes, etag: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
            etag: etag.to_string(),
            last_modified: SystemTime::UNIX_EPOCH,
        }
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
        _deadline: Deadline,
    ) -> Result<ListPage, S3Error> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        // The smaller of what was asked and what this store serves (0: any).
        let serves = if self.page_size == 0 {
            usize::MAX
        } else {
            self.page_size
        };
        let max = max_keys
            .map(|m| m.max(1) as usize)
            .unwrap_or(usize::MAX)
            .min(serves);
        let objects = self
            .objects
            .lock()
            .map_err(|_| S3Error::Other("poisoned".into()))?;
        let mut page = ListPage::default();
        let mut last: Option<String> = None;
        let mut count = 0;
        for (key, (data, etag)) in objects.range(continuation.clone().unwrap_or_default()..) {
            if !key.starts_with(prefix) || continuation.as_deref() == Some(key.as_str()) {
                continue;
            }
            let rest = &key[prefix.len()..];
            let entry = match delimiter.and_then(|d| rest.find(d).map(|i| (i, d))) {
                Some((i, d)) => {
                    let p = format!("{}{}", &key[..prefix.len() + i], d);
                    if page.prefixes.last() == Some(&p) {
                        continue;
                    }
                    Err(p)
                }
                None => Ok(Self::meta(key, data, etag)),
            };
            if count == max {
                page.next = last;
                return Ok(page);
            }
            count += 1;
            match entry {
                Err(p) => {
                    // Continue after every key under this prefix.
                    last = Some(format!("{p}\u{10FFFF}"));
                    page.prefixes.push(p);
                }
                Ok(m) => {
                    last = Some(key.clone());
                    page.objects.push(m);
                }
            }
        }
        Ok(page)
    }

    async fn head(&self, key: &str, _deadline: Deadline) -> Result<ObjectMeta, S3Error> {
        self.heads.fetch_add(1, Ordering::Relaxed);
        let objects = self
            .objects
            .lock()
            .map_err(|_| S3Error::Other("poisoned".into()))?;
        objects
            .get(key)
            .map(|(d, e)| Self::meta(key, d, e))
            .ok_or(S3Error::NotFound)
    }

    async fn get_first(
        &self,
        key: &str,
        len: u64,
        _deadline: Deadline,
    ) -> Result<Option<(Bytes, ObjectMeta)>, S3Error> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let objects = self
            .objects
            .lock()
            .map_err(|_| S3Error::Other("poisoned".into()))?;
        let (data, e) = objects.get(key).ok_or(S3Error::NotFound)?;
        if data.is_empty() {
            // As S3: a range of an empty object is unsatisfiable (416).
            return Err(S3Error::Server(416));
        }
        let meta = ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
            etag: e.clone(),
            last_modified: std::time::SystemTime::UNIX_EPOCH,
        };
        let end = (len as usize).min(data.len());
        Ok(Some((data.slice(..end), meta)))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        _deadline: Deadline,
    ) -> Result<Bytes, S3Error> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let objects = self
            .objects
            .lock()
            .map_err(|_| S3Error::Other("poisoned".into()))?;
        let (data, e) = objects.get(key).ok_or(S3Error::NotFound)?;
        let other = |v: &ObjectMeta| match v.etag.as_str() {
            "" => v.size != data.len() as u64,
            t => t != e,
        };
        if version.is_some_and(other) {
            return Err(S3Error::Stale);
        }
        let end = range.end.min(data.len() as u64) as usize;
        let start = (range.start as usize).min(end);
        Ok(data.slice(start..end))
    }
}

/// Every dataset served from the same in-memory bucket.
pub struct MemoryFactory(pub Arc<MemoryStore>);

impl StoreFactory for MemoryFactory {
    fn open(&self, _handle: &str, _bucket: &str) -> Arc<dyn ObjectStore> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

    #[tokio::test]
    async fn lists_with_delimiter_and_pages() {
        let s = MemoryStore {
            page_size: 2,
            ..MemoryStore::new()
        };
        for k in ["d/a", "d/b/1", "d/b/2", "d/c", "d/e/x", "other"] {
            s.put(k, "x");
        }
        let mut names = vec![];
        let mut token = None;
        loop {
            let p = s
                .list("d/", Some("/"), token, None, Deadline::after(SECOND))
                .await
                .unwrap();
            names.extend(p.objects.iter().map(|o| o.key.clone()));
            names.extend(p.prefixes.iter().cloned());
            token = p.next;
            if token.is_none() {
                break;
            }
        }
        names.sort();
        assert_eq!(names, ["d/a", "d/b/", "d/c", "d/e/"]);
    }
}
