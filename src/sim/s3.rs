//! A real S3 endpoint over the data folder, built on the `s3s` crate.
//!
//! s3s brings the protocol, routing and SigV4 checking; this module brings
//! the few read operations a mount uses (GetObject with Range and If-Match,
//! HeadObject, ListObjectsV2), answering straight from disk with a large
//! read buffer so the server is not the bottleneck, and accepting only the
//! temporary credentials the emulator issued, scoped to their dataset.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream;
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

use super::store::{Entry, ObjectFile, BUCKET};
use super::SimState;

pub struct SimS3(pub Arc<SimState>);
pub struct SimAuth(pub Arc<SimState>);

#[async_trait]
impl S3Auth for SimAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let creds = self.0.creds();
        match creds.get(access_key) {
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
            Some(c) if c.expires <= Instant::now() => {
                self.0
                    .stats
                    .expired_rejections
                    .fetch_add(1, Ordering::Relaxed);
                Err(s3_error!(ExpiredToken, "The provided token has expired."))
            }
            Some(c) => Ok(SecretKey::from(c.secret.as_str())),
        }
    }
}

fn etag(e: &str) -> ETag {
    ETag::Strong(e.to_string())
}

impl SimS3 {
    /// The session token must match the access key. As the data store's
    /// STS policy does, it allows ListBucket on the whole bucket and
    /// GetObject only inside the dataset prefix (`key: None` is a listing).
    fn authorize<T>(&self, req: &S3Request<T>, bucket: &str, key: Option<&str>) -> S3Result<()> {
        let Some(cred) = &req.credentials else {
            return Err(s3_error!(AccessDenied, "Anonymous access is not allowed"));
        };
        let creds = self.0.creds();
        let Some(issued) = creds.get(&cred.access_key) else {
            return Err(s3_error!(InvalidAccessKeyId));
        };
        let token = req
            .headers
            .get("x-amz-security-token")
            .and_then(|v| v.to_str().ok());
        if token != Some(issued.session.as_str()) {
            return Err(s3_error!(
                InvalidToken,
                "The provided token is malformed or otherwise invalid."
            ));
        }
        if bucket != BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        // The policy covers the dataset prefix; tools also probe the
        // prefix itself without its slash (is it a file?).
        let Some(key) = key else { return Ok(()) };
        let inside =
            key.starts_with(&issued.s3_prefix) || key == issued.s3_prefix.trim_end_matches('/');
        if !inside {
            tracing::debug!(key, allowed = %issued.s3_prefix, "S3 request outside the dataset prefix");
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        Ok(())
    }

    fn object(&self, key: &str) -> S3Result<ObjectFile> {
        self.0
            .store
            .object(key)
            .ok_or_else(|| s3_error!(NoSuchKey, "The specified key does not exist."))
    }
}

fn check_if_match(cond: &Option<IfMatch>, obj: &ObjectFile) -> S3Result<()> {
    match cond {
        Some(ETagCondition::ETag(ETag::Strong(e) | ETag::Weak(e)))
            if e.trim_matches('"') != obj.etag =>
        {
            Err(s3_error!(
                PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold"
            ))
        }
        _ => Ok(()),
    }
}

#[async_trait]
impl S3 for SimS3 {
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        if req.input.bucket != BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        if req.input.bucket != BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: Some(BucketLocationConstraint::from_static("ap-southeast-2")),
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.authorize(&req, &req.input.bucket, Some(&req.input.key))?;
        let st = &self.0.stats;
        st.gets.fetch_add(1, Ordering::Relaxed);
        let input = req.input;
        let obj = self.object(&input.key)?;
        check_if_match(&input.if_match, &obj)?;
        let (range, content_range) = match input.range {
            None => (0..obj.size, None),
            Some(r) => {
                let mut r = r.check(obj.size).map_err(|_| s3_error!(InvalidRange))?;
                if self.0.faults.s3_range_shifted(&obj.key) && r.end < obj.size {
                    // The wrong piece, of the right length, said honestly.
                    r = r.start + 1..r.end + 1;
                }
                let cr = format!("bytes {}-{}/{}", r.start, r.end - 1, obj.size);
                (r, Some(cr))
            }
        };
        let len = range.end - range.start;
        tracing::debug!(key = %obj.key, start = range.start, len, "GetObject");
        st.get_bytes.fetch_add(len, Ordering::Relaxed);
        if let Some(data) = &obj.data {
            let chunk = data.slice(range.start as usize..range.end as usize);
            return Ok(S3Response::new(GetObjectOutput {
                body: Some(StreamingBlob::wrap(stream::once(async move {
                    Ok::<Bytes, std::io::Error>(chunk)
                }))),
                content_length: Some(len as i64),
                content_range,
                accept_ranges: Some("bytes".into()),
                e_tag: Some(etag(&obj.etag)),
                last_modified: Some(Timestamp::from(obj.modified)),
                ..Default::default()
            }));
        }
        // The very file (version) whose ETag was checked above.
        let Some(file) = obj.file.clone() else {
            return Err(s3_error!(NoSuchKey));
        };
        // Stream the range in 1 MiB chunks, each one positioned read on the
        // blocking pool: s3s-fs's 4 KiB reads would make the server, not the
        // client, the bottleneck of every benchmark.
        let body = stream::unfold(Some((file, range.start, len)), |state| async move {
            let (file, at, left) = state?;
            if left == 0 {
                return None;
            }
            let n = left.min(1 << 20);
            let r = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; n as usize];
                let mut got = 0usize;
                let read = loop {
                    match file.read_at(&mut buf[got..], at + got as u64) {
                        Ok(0) => break Ok(()),
                        Ok(k) => {
                            got += k;
                            if got == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(got);
                (file, read.map(|_| buf))
            })
            .await;
            match r {
                Ok((file, Ok(buf))) if buf.len() as u64 == n => Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(buf)),
                    Some((file, at + n, left - n)),
                )),
                Ok((_, Ok(_))) => {
                    Some((Err(std::io::Error::other("file shrank while read")), None))
                }
                Ok((_, Err(e))) => Some((Err(e), None)),
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        });
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(len as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&obj.etag)),
            last_modified: Some(Timestamp::from(obj.modified)),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.authorize(&req, &req.input.bucket, Some(&req.input.key))?;
        self.0.stats.heads.fetch_add(1, Ordering::Relaxed);
        let obj = self.object(&req.input.key)?;
        check_if_match(&req.input.if_match, &obj)?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(obj.size as i64),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&obj.etag)),
            last_modified: Some(Timestamp::from(obj.modified)),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let prefix = req.input.prefix.clone().unwrap_or_default();
        self.authorize(&req, &req.input.bucket, None)?;
        let input = req.input;
        let url = wants_url(&input.encoding_type);
        let page = self.page(
            &prefix,
            input.delimiter.as_deref(),
            input.max_keys,
            input.marker.clone(),
            url,
        )?;
        let next_marker = page
            .truncated
            .then(|| page.last.as_deref().map(|m| s3_url_encode(m, url)))
            .flatten();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(s3_url_encode(&prefix, url)),
            delimiter: input.delimiter,
            marker: input.marker,
            encoding_type: input.encoding_type,
            max_keys: Some(page.max),
            is_truncated: Some(page.truncated),
            next_marker,
            contents: Some(page.contents),
            common_prefixes: Some(page.prefixes),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let prefix = req.input.prefix.clone().unwrap_or_default();
        self.authorize(&req, &req.input.bucket, None)?;
        let input = req.input;
        let marker = match &input.continuation_token {
            Some(t) => Some(
                hex::decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        s3_error!(
                            InvalidArgument,
                            "The continuation token provided is incorrect"
                        )
                    })?,
            ),
            None => input.start_after.clone(),
        };
        let url = wants_url(&input.encoding_type);
        let page = self.page(
            &prefix,
            input.delimiter.as_deref(),
            input.max_keys,
            marker,
            url,
        )?;
        let mut next = page
            .truncated
            .then(|| page.last.as_ref().map(hex::encode))
            .flatten();
        if next.is_some() && self.0.faults.s3_list_loops(&prefix) {
            // The token it was asked with, or the first page's again.
            next = Some(
                input
                    .continuation_token
                    .clone()
                    .unwrap_or_else(|| hex::encode(input.start_after.clone().unwrap_or_default())),
            );
        }
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(s3_url_encode(&prefix, url)),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            max_keys: Some(page.max),
            key_count: Some((page.contents.len() + page.prefixes.len()) as i32),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(page.truncated),
            next_continuation_token: next,
            contents: Some(page.contents),
            common_prefixes: Some(page.prefixes),
            ..Default::default()
        }))
    }
}

struct Page {
    contents: Vec<Object>,
    prefixes: Vec<CommonPrefix>,
    truncated: bool,
    last: Option<String>,
    max: i32,
}

impl SimS3 {
    /// One listing page after `marker`, shared by ListObjects and ListObjectsV2.
    fn page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        max_keys: Option<i32>,
        marker: Option<String>,
        url: bool,
    ) -> S3Result<Page> {
        self.0.stats.lists.fetch_add(1, Ordering::Relaxed);
        let delimited = match delimiter {
            None | Some("") => false,
            Some("/") => true,
            Some(_) => {
                return Err(s3_error!(
                    NotImplemented,
                    "only '/' is supported as delimiter"
                ))
            }
        };
        let max = max_keys
            .unwrap_or(1000)
            .clamp(1, 1000)
            .min(self.0.cfg.s3_page_size as i32) as usize;
        let (page, truncated) = self
            .0
            .store
            .list_page(prefix, delimited, marker.as_deref(), max);
        let mut contents = Vec::new();
        let mut prefixes = Vec::new();
        let last = page.last().map(|e| e.key().to_string());
        for e in page {
            match e {
                Entry::Object(o) => contents.push(Object {
                    key: Some(s3_url_encode(&o.key, url)),
                    size: Some(o.size as i64),
                    e_tag: Some(etag(&o.etag)),
                    last_modified: Some(Timestamp::from(o.modified)),
                    storage_class: Some(ObjectStorageClass::from_static(
                        ObjectStorageClass::STANDARD,
                    )),
                    ..Default::default()
                }),
                Entry::Prefix(p) => prefixes.push(CommonPrefix {
                    prefix: Some(s3_url_encode(&p, url)),
                }),
            }
        }
        Ok(Page {
            contents,
            prefixes,
            truncated,
            last,
            max: max as i32,
        })
    }
}

fn wants_url(e: &Option<EncodingType>) -> bool {
    e.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL)
}

/// What S3 does to keys in a listing asked with `encoding-type=url`:
/// form encoding (space as `+`), `/` and unreserved characters kept. XML
/// 1.0 cannot carry most control characters, so without it such keys
/// would make the whole page unparseable.
pub fn s3_url_encode(s: &str, url: bool) -> String {
    if !url {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
