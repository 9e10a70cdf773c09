//! [`ObjectStore`] over aws-sdk-s3, one client per dataset.
//!
//! The SDK's own retries are off: this layer retries with backoff itself, so
//! it can treat a short body, an `ExpiredToken` answer (refresh credentials
//! once, then retry) and throttling in one place, within a bounded budget.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use bytes::{Bytes, BytesMut};
use tracing::{debug, info_span, warn, Instrument};

use super::{ListPage, ObjectMeta, ObjectStore, S3Error, StoreFactory};
use crate::api::DataStoreClient;
use crate::credentials::{DatasetCredentials, SdkProvider};

#[derive(Clone, Debug)]
pub struct S3Config {
    /// Custom endpoint (emulator, other S3); `None` means AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// Attempts per request for transient failures.
    pub attempts: u32,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "ap-southeast-2".into(),
            attempts: 6,
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

/// Builds per-dataset stores that share one HTTP connection pool.
pub struct AwsFactory {
    config: S3Config,
    api: Arc<DataStoreClient>,
    base: aws_sdk_s3::config::Builder,
}

impl AwsFactory {
    pub fn new(config: S3Config, api: Arc<DataStoreClient>) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build_https();
        let mut base = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .identity_cache(aws_sdk_s3::config::IdentityCache::no_cache())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(config.attempt_timeout)
                    .build(),
            );
        if let Some(ep) = &config.endpoint {
            base = base.endpoint_url(ep).force_path_style(true);
        }
        Self { config, api, base }
    }
}

impl StoreFactory for AwsFactory {
    fn open(&self, handle: &str, bucket: &str) -> Arc<dyn ObjectStore> {
        let creds = Arc::new(DatasetCredentials::new(handle, self.api.clone()));
        let conf = self
            .base
            .clone()
            .credentials_provider(SdkProvider(creds.clone()))
            .build();
        Arc::new(AwsObjectStore {
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: bucket.to_string(),
            creds,
            attempts: self.config.attempts.max(1),
        })
    }
}

pub struct AwsObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    creds: Arc<DatasetCredentials>,
    attempts: u32,
}

impl AwsObjectStore {
    /// Runs `op` with fresh credentials, retrying transient failures with
    /// backoff and refreshing credentials once when S3 calls them expired.
    async fn with_retries<T, F, Fut>(&self, what: &str, op: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Fetch (or reuse) credentials first so a refusal surfaces as an
            // API error (EACCES), not an opaque SDK construction failure.
            let key_id = self.creds.get().await?.access_key_id().to_string();
            match op().await {
                Ok(v) => return Ok(v),
                Err(S3Error::ExpiredCredentials) if attempt < self.attempts => {
                    debug!(what, "credentials expired at S3; refreshing");
                    self.creds.invalidate(&key_id).await;
                }
                Err(e) if e.is_transient() && attempt < self.attempts => {
                    let wait = crate::retry::backoff(attempt);
                    warn!(what, attempt, error = %e, "S3 request failed, retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn map_err<E: ProvideErrorMetadata + std::error::Error + 'static>(e: SdkError<E>) -> S3Error {
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or_default();
            classify(status, code)
        }
        // The answer could not be read (cut short, garbled): try again.
        SdkError::ResponseError(_) => S3Error::Network("unreadable answer".into()),
        SdkError::TimeoutError(_) => S3Error::Network("timed out".into()),
        SdkError::DispatchFailure(d) => S3Error::Network(
            if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection error"
            } else {
                "dispatch failure"
            }
            .into(),
        ),
        _ => S3Error::Other(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string()),
    }
}

fn classify(status: u16, code: &str) -> S3Error {
    match (status, code) {
        (_, "ExpiredToken") | (_, "TokenRefreshRequired") => S3Error::ExpiredCredentials,
        (_, "NoSuchKey") | (404, _) => S3Error::NotFound,
        (412, _) | (_, "PreconditionFailed") => S3Error::Stale,
        (_, "SlowDown") | (503, _) | (429, _) => S3Error::Throttled,
        // A HEAD answer has no body, so an expired token shows only as 400.
        (400, "") => S3Error::ExpiredCredentials,
        (403, _) | (_, "AccessDenied") => S3Error::AccessDenied,
        (s, _) => S3Error::Server(s),
    }
}

fn meta(
    key: &str,
    size: Option<i64>,
    etag: Option<&str>,
    lm: Option<&aws_smithy_types::DateTime>,
) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: size.unwrap_or(0).max(0) as u64,
        etag: etag.unwrap_or_default().trim_matches('"').to_string(),
        last_modified: lm
            .and_then(|d| SystemTime::try_from(*d).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

#[async_trait]
impl ObjectStore for AwsObjectStore {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error> {
        let span = info_span!("s3_list", bucket = %self.bucket, prefix);
        self.with_retries("ListObjectsV2", || async {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(continuation.clone())
                .set_max_keys(max_keys)
                // Keys may hold characters XML 1.0 cannot carry (control
                // characters): ask for them encoded, decode below.
                .encoding_type(aws_sdk_s3::types::EncodingType::Url)
                .send()
                .await
                .map_err(map_err)?;
            let objects = out
                .contents()
                .iter()
                .filter_map(|o| {
                    o.key()
                        .and_then(url_decode)
                        .map(|k| meta(&k, o.size(), o.e_tag(), o.last_modified()))
                })
                .collect();
            let prefixes = out
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().and_then(url_decode))
                .collect();
            let next = if out.is_truncated().unwrap_or(false) {
                out.next_continuation_token().map(str::to_string)
            } else {
                None
            };
            Ok(ListPage {
                objects,
                prefixes,
                next,
            })
        })
        .instrument(span)
        .await
    }

    async fn prepare(&self) -> Result<(), S3Error> {
        self.creds
            .get()
            .await
            .map(|_| ())
            .map_err(S3Error::Credentials)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, S3Error> {
        let span = info_span!("s3_head", bucket = %self.bucket, key);
        self.with_retries("HeadObject", || async {
            let out = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(map_err)?;
            Ok(meta(
                key,
                out.content_length(),
                out.e_tag(),
                out.last_modified(),
            ))
        })
        .instrument(span)
        .await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes, S3Error> {
        let len = range.end.saturating_sub(range.start).max(1);
        let mut pieces = self.get_pieces(key, range, etag, len).await?;
        Ok(pieces.pop().unwrap_or_default())
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        piece: u64,
    ) -> Result<Vec<Bytes>, S3Error> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let piece = piece.max(1);
        let span = info_span!("s3_get", bucket = %self.bucket, key, start = range.start, len = range.end - range.start);
        self.with_retries("GetObject", || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={}-{}", range.start, range.end - 1))
                .set_if_match(etag.map(|e| format!("\"{e}\"")))
                .send()
                .await
                .map_err(map_err)?;
            // Copy each chunk into its piece as it arrives: one copy, one
            // allocation per piece, and a body of the wrong length is an
            // error, never data.
            let expected = range.end - range.start;
            let mut pieces: Vec<Bytes> = Vec::with_capacity(expected.div_ceil(piece) as usize);
            let new_piece =
                |done: u64| BytesMut::with_capacity(piece.min(expected - done) as usize);
            let mut cur = new_piece(0);
            let mut done = 0u64;
            let mut body = out.body;
            loop {
                let chunk = match body.try_next().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, got = done, "body cut short");
                        return Err(S3Error::ShortBody {
                            expected,
                            got: done,
                        });
                    }
                };
                if done + chunk.len() as u64 > expected {
                    return Err(S3Error::Other("S3 sent more bytes than the range".into()));
                }
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let room = cur.capacity() - cur.len();
                    let n = room.min(rest.len());
                    cur.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    done += n as u64;
                    if cur.len() == cur.capacity() && done < expected {
                        pieces.push(std::mem::replace(&mut cur, new_piece(done)).freeze());
                    }
                }
            }
            if done != expected {
                return Err(S3Error::ShortBody {
                    expected,
                    got: done,
                });
            }
            pieces.push(cur.freeze());
            Ok(pieces)
        })
        .instrument(span)
        .await
    }
}

/// Undoes S3's `encoding-type=url` (form encoding: `+` is a space). A key
/// that does not decode to UTF-8 is dropped with a warning rather than
/// shown under a wrong name.
fn url_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(k) => Some(k),
        Err(_) => {
            warn!(key = %s, "listing returned a key that is not UTF-8; skipped");
            None
        }
    }
}

#[cfg(test)]
mod url_tests {
    use super::url_decode;

    #[test]
    fn decodes_s3_url_encoding() {
        assert_eq!(url_decode("a/b+c%2Bd").as_deref(), Some("a/b c+d"));
        assert_eq!(url_decode("ctl%01name").as_deref(), Some("ctl\u{1}name"));
        assert_eq!(url_decode("%C3%A9.txt").as_deref(), Some("é.txt"));
        assert_eq!(url_decode("100%").as_deref(), Some("100%"));
        assert_eq!(url_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(url_decode("%FF"), None);
    }

    #[test]
    fn round_trips_the_emulator_encoding() {
        for k in ["sp ace/é.txt", "a+b", "nl\nname", "50%/x", "ctl\u{1}"] {
            let e = crate::sim::s3::s3_url_encode(k, true);
            assert_eq!(url_decode(&e).as_deref(), Some(k));
        }
    }
}
