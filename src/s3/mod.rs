//! Object access for one dataset: the [`ObjectStore`] trait, its aws-sdk-s3
//! implementation ([`aws::AwsObjectStore`]), an in-memory one
//! ([`memory::MemoryStore`]) for fast unit tests of the layers above, and a
//! wrapper that injects stalls, failures and panics ([`faulty::FaultyStore`]).

pub mod aws;
pub mod faulty;
pub mod memory;
pub mod pieces;

use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

use crate::api::ApiError;
use crate::retry::Deadline;

/// What a listing or HEAD says about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
}

/// One ListObjectsV2 page.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes, each ending in the delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page, `None` on the last.
    pub next: Option<String>,
}

/// A listing's walk through its pages (ListObjectsV2 continuation
/// tokens), refusing a server that would make it go on for ever: one that
/// hands back the token it was just given, whose pages stop moving past
/// the keys listed before (S3 lists in key order), or that sends empty
/// page after empty page. Every listing loop walks with one.
#[derive(Debug, Default)]
pub struct Pages {
    /// The token of the next page.
    next: Option<String>,
    /// The token the last page was asked with.
    asked: Option<String>,
    /// The greatest key or prefix listed so far.
    reached: Option<String>,
    /// Empty pages in a row.
    empty: u32,
}

/// Empty pages in a row a listing accepts before it takes the server for
/// one that never ends.
const MAX_EMPTY_PAGES: u32 = 1000;

impl Pages {
    pub fn new() -> Pages {
        Pages::default()
    }

    /// The continuation token to ask the next page with (none for the
    /// first page).
    pub fn token(&mut self) -> Option<String> {
        self.asked = self.next.take();
        self.asked.clone()
    }

    /// Takes in the page just listed: `Ok(true)` while more pages follow.
    /// Errors: the server is going in circles (see the type's docs).
    pub fn advance(&mut self, page: &ListPage) -> Result<bool, S3Error> {
        let last = page
            .objects
            .last()
            .map(|o| &o.key)
            .into_iter()
            .chain(page.prefixes.last())
            .max();
        match last {
            Some(l) if self.reached.as_ref().is_some_and(|r| l <= r) => {
                return Err(S3Error::Other(format!(
                    "S3 listed {l:?} again after {:?}: its continuation tokens go in circles",
                    self.reached.as_deref().unwrap_or("")
                )))
            }
            Some(l) => {
                self.reached = Some(l.clone());
                self.empty = 0;
            }
            None => self.empty += 1,
        }
        let Some(next) = &page.next else {
            return Ok(false);
        };
        if self.asked.as_ref() == Some(next) || self.empty > MAX_EMPTY_PAGES {
            return Err(S3Error::Other(
                "S3 keeps handing back the same continuation token: the listing would never end"
                    .into(),
            ));
        }
        self.next = Some(next.clone());
        Ok(true)
    }
}

#[derive(Debug, Error)]
pub enum S3Error {
    #[error("no such object")]
    NotFound,
    #[error("the object changed since it was opened")]
    Stale,
    #[error("access denied by S3")]
    AccessDenied,
    /// S3 refused the read credentials themselves: `ExpiredToken`,
    /// `InvalidAccessKeyId` (revoked), `SignatureDoesNotMatch` (re-keyed),
    /// `RequestTimeTooSkewed` (a wrong clock). New ones may fix it.
    #[error("S3 refused the read credentials ({0})")]
    CredentialsRejected(String),
    #[error("cannot get read credentials: {0}")]
    Credentials(#[from] ApiError),
    #[error("S3 asked us to slow down")]
    Throttled,
    #[error("S3 answered HTTP {0}")]
    Server(u16),
    #[error("S3 request failed: {0}")]
    Network(String),
    #[error("S3 sent {got} bytes where {expected} were due")]
    ShortBody { expected: u64, got: u64 },
    /// One attempt made no progress for the stall timeout (no answer, or
    /// a body that stopped flowing); worth another attempt.
    #[error("S3 stopped answering")]
    Stalled,
    #[error("S3 did not answer within --request-timeout")]
    TimedOut,
    /// S3 says the bucket lives in this other region (a `301
    /// PermanentRedirect` or `x-amz-bucket-region`): sign for it instead.
    #[error("the bucket is in S3 region {0} (check --s3-region)")]
    WrongRegion(String),
    /// HTTP 400 with no error code: not refused credentials (renewing them
    /// would not help) but most likely a wrong region or endpoint.
    #[error(
        "S3 answered HTTP 400 without a reason (signed for region {region} at {endpoint}; \
         check --s3-region and --s3-endpoint)"
    )]
    BareBadRequest { region: String, endpoint: String },
    #[error("S3 error: {0}")]
    Other(String),
}

impl S3Error {
    /// Worth another attempt: the next try may well succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Throttled
            | S3Error::Network(_)
            | S3Error::ShortBody { .. }
            | S3Error::Stalled => true,
            S3Error::Server(s) => *s >= 500 || *s == 429,
            S3Error::Credentials(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The request ran out of time (S3, or the credentials it needed).
    pub fn is_timeout(&self) -> bool {
        match self {
            S3Error::TimedOut => true,
            S3Error::Credentials(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// Read access to one dataset's objects in one bucket. Every call ends by
/// its `deadline`, retries included (then `TimedOut`).
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// One ListObjectsV2 page under `prefix`.
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
        deadline: Deadline,
    ) -> Result<ListPage, S3Error>;

    async fn head(&self, key: &str, deadline: Deadline) -> Result<ObjectMeta, S3Error>;

    /// Gets ready to serve: for S3, obtains the dataset's read credentials,
    /// so the first listing does not wait for them and a dataset the user
    /// may not read is known before anything is read.
    async fn prepare(&self, _deadline: Deadline) -> Result<(), S3Error> {
        Ok(())
    }

    /// Bytes `range` of `key`; with `version`, only from that version, else
    /// `Stale`: `If-Match` its ETag, or, for a store that gives no ETags,
    /// `If-Unmodified-Since` its time and a check of the answer's time and
    /// length. Returns exactly `range.len()` bytes or an error, never fewer.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        deadline: Deadline,
    ) -> Result<Bytes, S3Error>;

    /// The first `len` bytes of `key` (all of it if shorter), whatever its
    /// version, with the version they come from (its size, ETag and
    /// `Last-Modified`, from the answer's headers): a lookup asks for them
    /// beside its LIST, so a file's first read costs no request of its
    /// own. One attempt, no retries: it is a guess. `Ok(None)` where the
    /// store cannot tell the version (then nothing is guessed).
    async fn get_first(
        &self,
        _key: &str,
        _len: u64,
        _deadline: Deadline,
    ) -> Result<Option<(Bytes, ObjectMeta)>, S3Error> {
        Ok(None)
    }

    /// Like [`get_range`](Self::get_range), split into pieces of `piece`
    /// bytes (the last may be shorter), each in its own allocation, so a
    /// cache can drop one piece and really free its memory.
    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        piece: u64,
        deadline: Deadline,
    ) -> Result<Vec<Bytes>, S3Error> {
        let all = self.get_range(key, range, version, deadline).await?;
        Ok(all
            .chunks(piece.max(1) as usize)
            .map(Bytes::copy_from_slice)
            .collect())
    }

    /// Like [`get_pieces`](Self::get_pieces), handing each piece to `sink`
    /// as soon as it is whole, in order, so a reader can use the start of a
    /// long GET before its end. On an error the pieces handed out so far
    /// are right (each whole, from the version asked for); no more come.
    async fn get_pieces_each(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        piece: u64,
        deadline: Deadline,
        sink: &(dyn Fn(Bytes) + Send + Sync),
    ) -> Result<(), S3Error> {
        for p in self
            .get_pieces(key, range, version, piece, deadline)
            .await?
        {
            sink(p);
        }
        Ok(())
    }
}

/// Opens the [`ObjectStore`] of a dataset, given its handle and bucket.
pub trait StoreFactory: Send + Sync {
    fn open(&self, handle: &str, bucket: &str) -> std::sync::Arc<dyn ObjectStore>;

    /// Starts getting ready for dataset `handle` (its read credentials)
    /// before its record, and so its bucket, is known: the data store
    /// answers both from the handle alone, so the two calls overlap and a
    /// dataset's first file waits for one API round trip, not two. The
    /// store [`open`](Self::open) then makes uses what this started.
    fn warm(&self, _handle: &str, _deadline: Deadline) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(keys: &[&str], next: Option<&str>) -> ListPage {
        ListPage {
            objects: keys
                .iter()
                .map(|k| ObjectMeta {
                    key: k.to_string(),
                    size: 0,
                    etag: String::new(),
                    last_modified: SystemTime::UNIX_EPOCH,
                })
                .collect(),
            prefixes: Vec::new(),
            next: next.map(str::to_string),
        }
    }

    #[test]
    fn a_listing_that_goes_in_circles_is_an_error_not_a_hang() {
        let mut p = Pages::new();
        assert_eq!(p.token(), None);
        assert!(p.advance(&page(&["a", "b"], Some("t1"))).unwrap());
        assert_eq!(p.token().as_deref(), Some("t1"));
        assert!(p.advance(&page(&["c"], Some("t2"))).unwrap());
        assert_eq!(p.token().as_deref(), Some("t2"));
        assert!(!p.advance(&page(&["d"], None)).unwrap());
        // The same token handed back: an error.
        let mut p = Pages::new();
        p.token();
        p.advance(&page(&["a"], Some("t"))).unwrap();
        p.token();
        assert!(p.advance(&page(&[], Some("t"))).is_err());
        // New tokens, the same keys again: an error.
        let mut p = Pages::new();
        p.token();
        p.advance(&page(&["a", "b"], Some("t1"))).unwrap();
        p.token();
        assert!(p.advance(&page(&["a", "b"], Some("t2"))).is_err());
        // Empty pages for ever: an error, after many.
        let mut p = Pages::new();
        let mut r = Ok(true);
        for i in 0..2000 {
            p.token();
            r = p.advance(&page(&[], Some(&format!("t{i}"))));
            if r.is_err() {
                break;
            }
        }
        assert!(r.is_err());
    }
}
