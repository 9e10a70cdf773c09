//! [`ObjectStore`] over aws-sdk-s3, one client per dataset.
//!
//! The SDK's own retries are off: this layer retries with backoff itself,
//! within each call's deadline, so it can treat a short body, a stall, an
//! answer refusing the credentials (renew them once, then retry) and
//! throttling in one place. An attempt that makes no progress for the stall
//! timeout (no answer, or no body bytes) is abandoned and retried.
//!
//! A bucket in another region than `--s3-region` answers a redirect naming
//! its region (`301 PermanentRedirect`, `x-amz-bucket-region`): the request
//! is signed again for that region, once, and every store of the factory
//! remembers it for that bucket. A bare HTTP 400 (no error code: a HEAD, or
//! an endpoint that is not the bucket's) is not taken for refused
//! credentials: renewing them cannot help and costs the data store a call.
//!
//! The HTTP client takes its proxies from the environment like reqwest
//! does (see [`crate::http`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use bytes::Bytes;
use tracing::{debug, info, info_span, warn, Instrument};

use super::{ListPage, ObjectMeta, ObjectStore, S3Error, StoreFactory};
use crate::api::DataStoreClient;
use crate::credentials::{DatasetCredentials, SdkProvider};
use crate::retry::{stall_timeout, Deadline};

#[derive(Clone, Debug)]
pub struct S3Config {
    /// Custom endpoint (emulator, other S3); `None` means AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// Attempts per request for transient failures (within its deadline).
    pub attempts: u32,
    /// Bound of one request, retries included (`--request-timeout`); a
    /// third of it is the stall timeout of one attempt.
    pub request_timeout: Duration,
    /// How long a dataset whose files the user may not read is refused
    /// from memory (the metadata TTL).
    pub refusal_ttl: Duration,
    /// Read credentials shared with this user's other processes through a
    /// shared cache folder, with a name for the user and deployment (see
    /// [`crate::credentials::DatasetCredentials::new`]).
    pub shared: Option<(crate::shared_lease::SharedLeases, String)>,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "ap-southeast-2".into(),
            attempts: 6,
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
            refusal_ttl: Duration::from_secs(60),
            shared: None,
        }
    }
}

/// What all stores of one factory sent to S3, for `provenafs status`.
#[derive(Debug, Default)]
pub struct S3Counters {
    /// Requests sent (every attempt, retries included).
    pub requests: std::sync::atomic::AtomicU64,
    /// Object bytes received in GetObject bodies.
    pub bytes: std::sync::atomic::AtomicU64,
}

/// What S3 told about buckets, shared by all stores of one factory (many
/// datasets live in one bucket).
#[derive(Debug, Default)]
struct BucketNotes {
    /// The region each redirected bucket lives in.
    regions: Mutex<HashMap<String, String>>,
}

impl BucketNotes {
    fn regions(&self) -> MutexGuard<'_, HashMap<String, String>> {
        // A panic elsewhere while holding it leaves a map still worth using.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn region(&self, bucket: &str) -> Option<String> {
        self.regions().get(bucket).cloned()
    }

    /// Remembers `region` for `bucket`; whether that changed anything (so
    /// that many requests redirected at once say it once).
    fn remember(&self, bucket: &str, region: &str) -> bool {
        self.regions()
            .insert(bucket.to_string(), region.to_string())
            .as_deref()
            != Some(region)
    }
}

/// Builds per-dataset stores that share one HTTP connection pool.
pub struct AwsFactory {
    config: S3Config,
    api: Arc<DataStoreClient>,
    base: aws_sdk_s3::config::Builder,
    counters: Arc<S3Counters>,
    notes: Arc<BucketNotes>,
    /// Credentials [`StoreFactory::warm`] started fetching, by handle, for
    /// `open` to take.
    warmed: std::sync::Mutex<std::collections::HashMap<String, Arc<DatasetCredentials>>>,
}

/// The HTTP client of all S3 stores: rustls with aws-lc, and the proxies
/// of the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`,
/// `NO_PROXY`, also lower-case), as aws-sdk-s3's own default client does
/// for newer behavior versions. Its `Builder::build_https` knows no proxy,
/// hence the connector function (the SDK's own default client is built
/// the same way); connectors are cached per connector settings, so all
/// stores share one pool.
fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::{proxy::ProxyConfig, tls, Builder, Connector};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut conn = Connector::builder()
            .proxy_config(ProxyConfig::from_env())
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ));
        conn.set_connector_settings(settings.cloned());
        if let Some(c) = components {
            conn.set_sleep_impl(c.sleep_impl());
        }
        conn.build()
    })
}

impl AwsFactory {
    pub fn new(config: S3Config, api: Arc<DataStoreClient>) -> Self {
        let http = http_client();
        let endpoint = endpoint_url(&config);
        match crate::http::proxy_for(&endpoint) {
            Some(proxy) => debug!(%endpoint, %proxy, "S3 requests go through a proxy"),
            None => debug!(%endpoint, "S3 requests go direct (no proxy for it)"),
        }
        let stall = stall_timeout(config.request_timeout);
        let mut base = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .identity_cache(aws_sdk_s3::config::IdentityCache::no_cache())
            // Attempts are bounded here, by deadline and stall timeout.
            .timeout_config(TimeoutConfig::builder().connect_timeout(stall).build());
        if let Some(ep) = &config.endpoint {
            base = base.endpoint_url(ep).force_path_style(true);
        }
        Self {
            config,
            api,
            base,
            counters: Arc::default(),
            notes: Arc::default(),
            warmed: Default::default(),
        }
    }

    fn credentials(&self, handle: &str) -> Arc<DatasetCredentials> {
        Arc::new(DatasetCredentials::new(
            handle,
            self.api.clone(),
            self.config.request_timeout,
            self.config.refusal_ttl,
            self.config
                .shared
                .as_ref()
                .map(|(s, who)| (s.clone(), who.as_str())),
        ))
    }

    /// What the stores of this factory sent and received.
    pub fn counters(&self) -> Arc<S3Counters> {
        self.counters.clone()
    }
}

impl StoreFactory for AwsFactory {
    fn warm(&self, handle: &str, deadline: Deadline) {
        let creds = self.credentials(handle);
        {
            let mut warmed = self.warmed.lock().unwrap_or_else(|p| p.into_inner());
            if warmed.len() > 1000 {
                // Warmed and never opened (their records were refused).
                warmed.clear();
            }
            warmed.insert(handle.to_string(), creds.clone());
        }
        // A refusal is remembered by the credentials themselves and
        // answered to the first S3 call; nothing to do with it here.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = creds.get(deadline).await;
            });
        }
    }

    fn open(&self, handle: &str, bucket: &str) -> Arc<dyn ObjectStore> {
        let warmed = self
            .warmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(handle);
        let creds = warmed.unwrap_or_else(|| self.credentials(handle));
        let conf = self
            .base
            .clone()
            .credentials_provider(SdkProvider(creds.clone()))
            .build();
        Arc::new(AwsObjectStore {
            s3: BucketClient::new(conf, &self.config, self.notes.clone(), bucket.to_string()),
            bucket: bucket.to_string(),
            creds,
            attempts: self.config.attempts.max(1),
            stall: stall_timeout(self.config.request_timeout),
            counters: self.counters.clone(),
        })
    }
}

/// The S3 client of one bucket, signing for its region: `--s3-region`, or
/// the one S3 redirected the bucket to.
struct BucketClient {
    /// The client in use and the region it signs for.
    current: Mutex<(String, aws_sdk_s3::Client)>,
    /// What a client for another region is built from.
    conf: aws_sdk_s3::Config,
    /// `--s3-region`.
    region: String,
    /// `--s3-endpoint`; `None` for AWS S3, whose endpoint follows the region.
    custom_endpoint: Option<String>,
    notes: Arc<BucketNotes>,
    bucket: String,
}

impl BucketClient {
    fn new(
        conf: aws_sdk_s3::Config,
        config: &S3Config,
        notes: Arc<BucketNotes>,
        bucket: String,
    ) -> Self {
        let client = aws_sdk_s3::Client::from_conf(conf.clone());
        Self {
            current: Mutex::new((config.region.clone(), client)),
            conf,
            region: config.region.clone(),
            custom_endpoint: config.endpoint.clone(),
            notes,
            bucket,
        }
    }

    /// The endpoint requests signed for `region` go to.
    fn endpoint_for(&self, region: &str) -> String {
        match &self.custom_endpoint {
            Some(e) => e.clone(),
            None => format!("https://s3.{region}.amazonaws.com"),
        }
    }

    /// The client for this bucket's region (rebuilt when S3 redirected the
    /// bucket since), and that region.
    fn get(&self) -> (String, aws_sdk_s3::Client) {
        let want = self
            .notes
            .region(&self.bucket)
            .unwrap_or_else(|| self.region.clone());
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0 != want {
            // With AWS S3 the SDK derives the endpoint from the region;
            // a custom endpoint stays, only the signing region changes.
            let conf = self
                .conf
                .to_builder()
                .region(Region::new(want.clone()))
                .build();
            *cur = (want, aws_sdk_s3::Client::from_conf(conf));
        }
        cur.clone()
    }
}

pub struct AwsObjectStore {
    s3: BucketClient,
    bucket: String,
    creds: Arc<DatasetCredentials>,
    attempts: u32,
    /// An attempt without progress for this long has stalled.
    stall: Duration,
    counters: Arc<S3Counters>,
}

impl AwsObjectStore {
    /// Runs `op` (given the client and its stall timeout) with fresh
    /// credentials until `deadline`: transient failures are retried with
    /// backoff; an answer refusing the credentials renews them once and
    /// retries once; a redirect to the bucket's region is followed once.
    async fn with_retries<T, F, Fut>(
        &self,
        what: &str,
        deadline: Deadline,
        op: F,
    ) -> Result<T, S3Error>
    where
        F: Fn(aws_sdk_s3::Client, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut attempt = 0;
        let mut renewed = false;
        let mut redirected = false;
        loop {
            attempt += 1;
            // Fetch (or reuse) credentials first so a refusal surfaces as an
            // API error (EACCES), not an opaque SDK construction failure.
            let key_id = self.creds.get(deadline).await?.key_id;
            let stall = deadline.attempt(self.stall);
            if stall.is_zero() {
                return Err(S3Error::TimedOut);
            }
            let (region, client) = self.s3.get();
            self.counters
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let result = match deadline.run(op(client, stall)).await {
                Some(r) => r,
                None => Err(S3Error::TimedOut),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(S3Error::CredentialsRejected(code)) if !renewed => {
                    info!(
                        what,
                        code, "S3 refused the read credentials; renewing them and retrying once"
                    );
                    self.creds.invalidate(&key_id);
                    renewed = true;
                }
                Err(S3Error::WrongRegion(to)) if !redirected && to != region => {
                    let endpoint = self.s3.endpoint_for(&to);
                    if self.s3.notes.remember(&self.bucket, &to) {
                        warn!(
                            bucket = %self.bucket,
                            from = %region,
                            to = %to,
                            %endpoint,
                            "S3 bucket {} is in region {to}, not {region}: following S3's redirect, \
                             its requests now go to {endpoint} signed for {to} \
                             (--s3-region {to} saves the detour)",
                            self.bucket
                        );
                    }
                    redirected = true;
                }
                // Redirected again, or to the region already signed for
                // (an --s3-endpoint that is not this bucket's): give up.
                // Said by whoever fails on it (the file system logs each
                // cause once a minute), not here on every request.
                Err(S3Error::WrongRegion(to)) => {
                    let endpoint = self.s3.endpoint_for(&region);
                    debug!(
                        what,
                        bucket = %self.bucket,
                        region = %region,
                        %endpoint,
                        "S3 redirects bucket {} to region {to} although signed for {region}",
                        self.bucket
                    );
                    return Err(S3Error::WrongRegion(format!(
                        "{to}, but S3 at {endpoint} still redirects requests signed for it; \
                         check --s3-endpoint"
                    )));
                }
                Err(S3Error::BareBadRequest { .. }) => {
                    // The error names the region and endpoint and says what
                    // to check; whoever fails on it logs it (the file
                    // system at warn), so one line per failure.
                    let endpoint = self.s3.endpoint_for(&region);
                    debug!(what, bucket = %self.bucket, %region, %endpoint, "S3 answered a bare 400");
                    return Err(S3Error::BareBadRequest { region, endpoint });
                }
                Err(e) if e.is_transient() && attempt < self.attempts => {
                    let wait = crate::retry::backoff(attempt);
                    if !deadline.allows(wait) {
                        return Err(out_of_time(e));
                    }
                    warn!(what, attempt, error = %e, "S3 request failed, retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(S3Error::Network(m)) => {
                    let endpoint = self.s3.endpoint_for(&region);
                    // Through a proxy, the failure is most likely the proxy's.
                    let via = crate::http::proxy_for(&endpoint)
                        .map(|p| format!(" via proxy {p}"))
                        .unwrap_or_default();
                    return Err(S3Error::Network(format!("{m} (S3 at {endpoint}{via})")));
                }
                Err(e) => return Err(out_of_time(e)),
            }
        }
    }
}

/// The S3 endpoint `config` names: `--s3-endpoint`, else AWS S3 of the region.
pub fn endpoint_url(config: &S3Config) -> String {
    match &config.endpoint {
        Some(e) => e.clone(),
        None => format!("https://s3.{}.amazonaws.com", config.region),
    }
}

/// Whether anything answers HTTP at the S3 endpoint: one unsigned `HEAD /`
/// (any status will do; it costs the data store nothing), so a mount with
/// a wrong `--s3-endpoint` fails before mounting, not at every read.
/// Errors: one line naming the endpoint.
pub async fn probe(config: &S3Config) -> Result<(), String> {
    let url = endpoint_url(config);
    let http = crate::http::client()?;
    let span = tracing::info_span!("s3_probe", url = %url);
    let sent = http
        .head(&url)
        .timeout(stall_timeout(config.request_timeout))
        .send()
        .instrument(span)
        .await;
    match sent {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot reach S3 at {url}: {} (check --s3-endpoint)",
            crate::http::describe_reqwest(&e)
        )),
    }
}

/// The error to give when no attempt is left: a stall then means the
/// request as a whole ran out of time.
fn out_of_time(e: S3Error) -> S3Error {
    match e {
        S3Error::Stalled => S3Error::TimedOut,
        e => e,
    }
}

/// The first bytes of an answer within `stall`, or a (transient) stall.
async fn answered<T, E: ProvideErrorMetadata + std::error::Error + 'static>(
    stall: Duration,
    send: impl std::future::Future<Output = Result<T, SdkError<E>>>,
) -> Result<T, S3Error> {
    match tokio::time::timeout(stall, send).await {
        Ok(r) => r.map_err(map_err),
        Err(_) => Err(S3Error::Stalled),
    }
}

fn map_err<E: ProvideErrorMetadata + std::error::Error + 'static>(e: SdkError<E>) -> S3Error {
    match &e {
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let status = raw.status().as_u16();
            let code = se.err().code().unwrap_or_default();
            if code == "RequestTimeTooSkewed" {
                report_skew(raw.headers().get("date"));
            }
            if let Some(region) = bucket_region(
                status,
                code,
                raw.headers().get("x-amz-bucket-region"),
                raw.body().bytes(),
            ) {
                return S3Error::WrongRegion(region);
            }
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

/// Says once, in words, how far this machine's clock is from S3's (read
/// from the refusing answer's `Date`). aws-sdk-s3 then signs with S3's
/// time, so reads go on; the clock should still be fixed.
fn report_skew(date: Option<&str>) {
    static SAID: AtomicBool = AtomicBool::new(false);
    let server = date
        .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
        .map(SystemTime::from);
    let Some(server) = server else {
        return;
    };
    if SAID.swap(true, Ordering::Relaxed) {
        return;
    }
    let now = SystemTime::now();
    let (secs, way) = match server.duration_since(now) {
        Ok(d) => (d.as_secs(), "behind"),
        Err(e) => (e.duration().as_secs(), "ahead of"),
    };
    // `Date` has whole seconds and the answer took a while: a skew of
    // minutes is told in minutes.
    let secs = if secs >= 120 {
        (secs + 30) / 60 * 60
    } else {
        secs
    };
    warn!(
        "this machine's clock is about {} {way} S3's: S3 refused a request as signed at the wrong time. \
         Requests are now signed with S3's time, but fix the clock (NTP): other tools will fail",
        words(secs)
    );
}

/// `1234` seconds as "20 minutes 34 seconds".
fn words(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut parts = Vec::new();
    for (n, unit) in [(h, "hour"), (m, "minute"), (s, "second")] {
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    if parts.is_empty() {
        "0 seconds".into()
    } else {
        parts.join(" ")
    }
}

/// The region an error answer says the bucket lives in, when it is a
/// wrong-region answer: a redirect (`301 PermanentRedirect`, `307`), or a
/// 400 (`AuthorizationHeaderMalformed`, or a HEAD's bare 400) naming the
/// region in `x-amz-bucket-region` or in the body's `<Region>`.
fn bucket_region(
    status: u16,
    code: &str,
    header: Option<&str>,
    body: Option<&[u8]>,
) -> Option<String> {
    let redirect = matches!(status, 301 | 307) || code == "PermanentRedirect";
    let bad_region = status == 400
        && matches!(
            code,
            "" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException"
        );
    if !redirect && !bad_region {
        return None;
    }
    let from_body = || {
        let text = std::str::from_utf8(body?).ok()?;
        let start = text.find("<Region>")? + "<Region>".len();
        let len = text[start..].find("</Region>")?;
        Some(text[start..start + len].to_string())
    };
    header
        .map(str::to_string)
        .or_else(from_body)
        .map(|r| r.trim().to_string())
        // A region is a short name of letters, digits and dashes; anything
        // else is not one to sign for.
        .filter(|r| {
            !r.is_empty()
                && r.len() <= 64
                && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn classify(status: u16, code: &str) -> S3Error {
    match (status, code) {
        (
            _,
            "ExpiredToken"
            | "TokenRefreshRequired"
            | "InvalidAccessKeyId"
            | "InvalidToken"
            | "SignatureDoesNotMatch"
            | "RequestTimeTooSkewed",
        ) => S3Error::CredentialsRejected(code.to_string()),
        (_, "NoSuchKey") | (404, _) => S3Error::NotFound,
        (412, _) | (_, "PreconditionFailed") => S3Error::Stale,
        (_, "SlowDown") | (503, _) | (429, _) => S3Error::Throttled,
        // No code at all (a HEAD answer has no body): most likely a wrong
        // region or endpoint. Not refused credentials: renewing them would
        // not help and costs the data store a call per request.
        (400, "") => S3Error::BareBadRequest {
            region: String::new(),
            endpoint: String::new(),
        },
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
        deadline: Deadline,
    ) -> Result<ListPage, S3Error> {
        let span = info_span!("s3_list", bucket = %self.bucket, prefix);
        let continuation = &continuation;
        self.with_retries("ListObjectsV2", deadline, |client, stall| async move {
            let send = client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(continuation.clone())
                .set_max_keys(max_keys)
                // Keys may hold characters XML 1.0 cannot carry (control
                // characters): ask for them encoded, decode below.
                .encoding_type(aws_sdk_s3::types::EncodingType::Url)
                .send();
            let out = answered(stall, send).await?;
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

    async fn prepare(&self, deadline: Deadline) -> Result<(), S3Error> {
        self.creds
            .get(deadline)
            .await
            .map(|_| ())
            .map_err(S3Error::Credentials)
    }

    async fn head(&self, key: &str, deadline: Deadline) -> Result<ObjectMeta, S3Error> {
        let span = info_span!("s3_head", bucket = %self.bucket, key);
        self.with_retries("HeadObject", deadline, |client, stall| async move {
            let send = client.head_object().bucket(&self.bucket).key(key).send();
            let out = answered(stall, send).await?;
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
        version: Option<&ObjectMeta>,
        deadline: Deadline,
    ) -> Result<Bytes, S3Error> {
        let len = range.end.saturating_sub(range.start).max(1);
        let mut pieces = self.get_pieces(key, range, version, len, deadline).await?;
        Ok(pieces.pop().unwrap_or_default())
    }

    async fn get_first(
        &self,
        key: &str,
        len: u64,
        deadline: Deadline,
    ) -> Result<Option<(Bytes, ObjectMeta)>, S3Error> {
        let span = info_span!("s3_get_first", bucket = %self.bucket, key, len);
        async {
            self.creds.get(deadline).await?;
            let stall = deadline.attempt(self.stall);
            if stall.is_zero() || len == 0 {
                return Err(S3Error::TimedOut);
            }
            let (_, client) = self.s3.get();
            self.counters
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let send = client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes=0-{}", len - 1))
                .send();
            let out = match deadline.run(answered(stall, send)).await {
                Some(r) => r?,
                None => return Err(S3Error::TimedOut),
            };
            // `bytes 0-N/LENGTH`: bytes from 0, and the object's length.
            let size = out
                .content_range()
                .filter(|r| r.starts_with("bytes 0-"))
                .and_then(|r| r.rsplit('/').next())
                .and_then(|t| t.parse::<i64>().ok());
            let etag = out.e_tag().filter(|e| !e.is_empty());
            let (Some(size), Some(etag)) = (size, etag) else {
                return Ok(None);
            };
            let m = meta(key, Some(size), Some(etag), out.last_modified());
            let want = len.min(m.size);
            let mut buf = bytes::BytesMut::with_capacity(want as usize);
            let mut body = out.body;
            loop {
                match deadline
                    .run(tokio::time::timeout(stall, body.try_next()))
                    .await
                {
                    Some(Ok(Ok(Some(c)))) => {
                        if buf.len() + c.len() > want as usize {
                            return Err(S3Error::Other("S3 sent more bytes than the range".into()));
                        }
                        self.counters
                            .bytes
                            .fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        buf.extend_from_slice(&c);
                    }
                    Some(Ok(Ok(None))) => break,
                    Some(Ok(Err(_))) | Some(Err(_)) | None => return Err(S3Error::Stalled),
                }
            }
            if buf.len() as u64 != want {
                return Err(S3Error::ShortBody {
                    expected: want,
                    got: buf.len() as u64,
                });
            }
            Ok(Some((buf.freeze(), m)))
        }
        .instrument(span)
        .await
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        version: Option<&ObjectMeta>,
        piece: u64,
        deadline: Deadline,
    ) -> Result<Vec<Bytes>, S3Error> {
        let pieces = std::sync::Mutex::new(Vec::new());
        self.get_pieces_each(key, range, version, piece, deadline, &|p| {
            pieces.lock().unwrap_or_else(|e| e.into_inner()).push(p)
        })
        .await?;
        Ok(pieces.into_inner().unwrap_or_else(|e| e.into_inner()))
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
        if range.is_empty() {
            return Ok(());
        }
        // The version to read: its ETag, or (a store without ETags) its
        // time and length, checked below.
        let etag = version.map(|v| v.etag.as_str()).filter(|e| !e.is_empty());
        let by_time = version.filter(|v| v.etag.is_empty());
        let piece = piece.max(1);
        let span = info_span!("s3_get", bucket = %self.bucket, key, start = range.start, len = range.end - range.start);
        let range = &range;
        // Pieces handed out by earlier attempts: a retry asks only for the
        // rest (the version is pinned, so the rest matches).
        let handed = std::sync::atomic::AtomicU64::new(0);
        let handed = &handed;
        self.with_retries("GetObject", deadline, |client, stall| async move {
            let from = range.start + handed.load(std::sync::atomic::Ordering::Relaxed) * piece;
            let send = client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={}-{}", from, range.end - 1))
                .set_if_match(etag.map(|e| format!("\"{e}\"")))
                .set_if_unmodified_since(
                    by_time.map(|v| aws_smithy_types::DateTime::from(v.last_modified)),
                )
                .send();
            let out = answered(stall, send).await?;
            if let Some(v) = by_time {
                if !same_object(v, out.last_modified(), out.content_range()) {
                    return Err(S3Error::Stale);
                }
            }
            // Whatever the version check: the answer must be the range
            // asked for (a proxy or cache may serve another piece of the
            // same length), or the whole object when that is the range.
            check_range(
                out.content_range(),
                from..range.end,
                out.content_length(),
                version.map(|v| v.size),
            )?;
            // Copy each chunk into its piece as it arrives: one copy, one
            // allocation per piece (only the piece being filled is held
            // here), and a body of the wrong length is an error, never
            // data.
            let expected = range.end - from;
            let new_piece = |done: u64| {
                super::pieces::Piece::with_capacity(piece.min(expected - done) as usize)
            };
            let mut cur = new_piece(0);
            let mut done = 0u64;
            let mut body = out.body;
            loop {
                // A body that stops flowing is a stall like no answer at all.
                let chunk = match tokio::time::timeout(stall, body.try_next()).await {
                    Ok(Ok(Some(c))) => c,
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        debug!(error = %e, got = done, "body cut short");
                        return Err(S3Error::ShortBody {
                            expected,
                            got: done,
                        });
                    }
                    Err(_) => {
                        debug!(got = done, expected, "body stalled");
                        return Err(S3Error::Stalled);
                    }
                };
                if done + chunk.len() as u64 > expected {
                    return Err(S3Error::Other("S3 sent more bytes than the range".into()));
                }
                self.counters
                    .bytes
                    .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let n = cur.room().min(rest.len());
                    cur.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    done += n as u64;
                    if cur.room() == 0 && done < expected {
                        sink(std::mem::replace(&mut cur, new_piece(done)).freeze());
                        handed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            if done != expected {
                return Err(S3Error::ShortBody {
                    expected,
                    got: done,
                });
            }
            sink(cur.freeze());
            handed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .instrument(span)
        .await
    }
}

/// Whether an answer to a GET of `want` is that range: its
/// `Content-Range` must be `bytes START-END/TOTAL` with exactly those
/// bounds (and TOTAL the object's `size`, when known); an answer without
/// one (a `200` with the whole object) only when the range is the whole
/// object. Errors: another piece, which is never taken for data.
fn check_range(
    content_range: Option<&str>,
    want: Range<u64>,
    length: Option<i64>,
    size: Option<u64>,
) -> Result<(), S3Error> {
    let wrong = |what: String| {
        S3Error::Other(format!(
            "S3 answered {what} for bytes {}-{}",
            want.start,
            want.end.saturating_sub(1)
        ))
    };
    let Some(cr) = content_range else {
        let whole = want.start == 0
            && length.is_some_and(|l| l as u64 == want.end)
            && size.is_none_or(|s| s == want.end);
        return if whole {
            Ok(())
        } else {
            Err(wrong("without a Content-Range".into()))
        };
    };
    let parsed = cr.strip_prefix("bytes ").and_then(|r| {
        let (span, total) = r.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        Some((
            a.parse::<u64>().ok()?,
            b.parse::<u64>().ok()?,
            total.parse::<u64>().ok(),
        ))
    });
    match parsed {
        Some((a, b, total))
            if a == want.start
                && b + 1 == want.end
                && size.is_none_or(|s| total.is_none_or(|t| t == s)) =>
        {
            Ok(())
        }
        _ => Err(wrong(format!("Content-Range {cr:?}"))),
    }
}

/// Whether an answer (its `Last-Modified`, to the second, and the object
/// length in its `Content-Range`) comes from version `v`.
fn same_object(
    v: &ObjectMeta,
    modified: Option<&aws_smithy_types::DateTime>,
    range: Option<&str>,
) -> bool {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let same_time = modified
        .and_then(|d| SystemTime::try_from(*d).ok())
        .is_some_and(|t| secs(t) == secs(v.last_modified));
    let total = range
        .and_then(|r| r.rsplit('/').next())
        .and_then(|t| t.parse::<u64>().ok());
    same_time && total == Some(v.size)
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
mod region_tests {
    use super::{bucket_region, classify, BucketNotes, S3Error};

    #[test]
    fn a_redirect_names_the_bucket_region() {
        // GET or LIST: 301 with a body and the header.
        let body = b"<Error><Code>PermanentRedirect</Code><Endpoint>b.s3.ap-southeast-2.amazonaws.com</Endpoint></Error>";
        assert_eq!(
            bucket_region(301, "PermanentRedirect", Some("ap-southeast-2"), Some(body)).as_deref(),
            Some("ap-southeast-2")
        );
        // HEAD: no body, only the header; also as a bare 400.
        assert_eq!(
            bucket_region(301, "", Some("eu-west-1"), None).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            bucket_region(400, "", Some("eu-west-1"), Some(b"")).as_deref(),
            Some("eu-west-1")
        );
        // A signature for the wrong region: the region in the body.
        let body = b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region 'us-east-1' is wrong; expecting 'ap-southeast-2'</Message><Region>ap-southeast-2</Region></Error>";
        assert_eq!(
            bucket_region(400, "AuthorizationHeaderMalformed", None, Some(body)).as_deref(),
            Some("ap-southeast-2")
        );
    }

    #[test]
    fn other_answers_name_no_region() {
        // Any answer may carry the header; only redirects and region
        // errors mean "sign for another region".
        assert_eq!(
            bucket_region(403, "AccessDenied", Some("eu-west-1"), None),
            None
        );
        assert_eq!(
            bucket_region(404, "NoSuchKey", Some("eu-west-1"), None),
            None
        );
        assert_eq!(bucket_region(400, "", None, None), None);
        assert_eq!(
            bucket_region(400, "InvalidArgument", Some("eu-west-1"), None),
            None
        );
        // Not a region: never signed for.
        assert_eq!(bucket_region(301, "", Some("a b"), None), None);
        assert_eq!(bucket_region(301, "", Some(""), None), None);
        assert_eq!(
            bucket_region(301, "", None, Some(b"<Region>x\n</Region")),
            None
        );
    }

    #[test]
    fn a_bare_400_is_not_refused_credentials() {
        assert!(matches!(classify(400, ""), S3Error::BareBadRequest { .. }));
        assert!(!classify(400, "").is_transient());
        assert!(matches!(
            classify(400, "InvalidArgument"),
            S3Error::Server(400)
        ));
        let e = S3Error::BareBadRequest {
            region: "us-east-1".into(),
            endpoint: "https://s3.us-east-1.amazonaws.com".into(),
        };
        let text = e.to_string();
        for part in [
            "us-east-1",
            "https://s3.us-east-1.amazonaws.com",
            "--s3-region",
            "--s3-endpoint",
        ] {
            assert!(text.contains(part), "{text}");
        }
        assert!(!S3Error::WrongRegion("eu-west-1".into()).is_transient());
    }

    #[test]
    fn a_region_is_remembered_once_per_bucket() {
        let n = BucketNotes::default();
        assert_eq!(n.region("b"), None);
        assert!(n.remember("b", "eu-west-1"));
        assert!(!n.remember("b", "eu-west-1"));
        assert_eq!(n.region("b").as_deref(), Some("eu-west-1"));
        assert_eq!(n.region("other"), None);
    }
}

/// What a client built for a redirected bucket sends: to which URL, signed
/// for which region (the request is stopped before it leaves).
#[cfg(test)]
mod redirect_client_tests {
    use std::sync::{Arc, Mutex};

    use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_s3::config::{
        BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
    };
    use aws_sdk_s3::error::BoxError;

    use super::{http_client, BucketClient, BucketNotes, S3Config};

    /// Takes down each request's URL and signing region, and stops it.
    #[derive(Debug, Default, Clone)]
    struct Seen(Arc<Mutex<Vec<(String, String)>>>);

    impl Intercept for Seen {
        fn name(&self) -> &'static str {
            "Seen"
        }

        fn read_before_transmit(
            &self,
            ctx: &BeforeTransmitInterceptorContextRef<'_>,
            _rc: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), BoxError> {
            let req = ctx.request();
            // `Credential=KEY/DATE/REGION/s3/aws4_request`
            let region = req
                .headers()
                .get("authorization")
                .and_then(|a| a.split("Credential=").nth(1))
                .and_then(|c| c.split('/').nth(2))
                .unwrap_or_default()
                .to_string();
            self.0.lock().unwrap().push((req.uri().to_string(), region));
            Err("stopped before sending".into())
        }
    }

    /// The URL and signing region of a ListObjectsV2 sent with the client
    /// of bucket `bkt`, once S3 has redirected it to ap-southeast-2.
    async fn sent(endpoint: Option<&str>) -> Vec<(String, String)> {
        let config = S3Config {
            endpoint: endpoint.map(str::to_string),
            region: "us-east-1".into(),
            ..S3Config::default()
        };
        let seen = Seen::default();
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http_client())
            .credentials_provider(Credentials::new(
                "AKIDTEST",
                "not-a-secret",
                None,
                None,
                "t",
            ))
            .interceptor(seen.clone());
        if let Some(e) = endpoint {
            b = b.endpoint_url(e).force_path_style(true);
        }
        let notes = Arc::new(BucketNotes::default());
        let bc = BucketClient::new(b.build(), &config, notes.clone(), "bkt".into());
        let list = |c: aws_sdk_s3::Client| async move {
            let _ = c.list_objects_v2().bucket("bkt").send().await;
        };
        let (region, client) = bc.get();
        assert_eq!(region, "us-east-1");
        list(client).await;
        assert!(notes.remember("bkt", "ap-southeast-2"));
        let (region, client) = bc.get();
        assert_eq!(region, "ap-southeast-2");
        list(client).await;
        assert_eq!(
            bc.endpoint_for(&region),
            endpoint.map_or(
                "https://s3.ap-southeast-2.amazonaws.com".into(),
                str::to_string
            )
        );
        let v = seen.0.lock().unwrap().clone();
        v
    }

    #[tokio::test]
    async fn aws_s3_moves_to_the_regions_endpoint() {
        let v = sent(None).await;
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].1, "us-east-1");
        assert!(
            v[1].0
                .starts_with("https://bkt.s3.ap-southeast-2.amazonaws.com/"),
            "{v:?}"
        );
        assert_eq!(v[1].1, "ap-southeast-2");
    }

    #[tokio::test]
    async fn a_custom_endpoint_stays_and_only_the_signing_region_changes() {
        let v = sent(Some("http://127.0.0.1:9")).await;
        assert_eq!(v.len(), 2, "{v:?}");
        for (url, _) in &v {
            assert!(url.starts_with("http://127.0.0.1:9/bkt"), "{v:?}");
        }
        assert_eq!(v[0].1, "us-east-1");
        assert_eq!(v[1].1, "ap-southeast-2");
    }
}

#[cfg(test)]
mod url_tests {
    use super::{classify, url_decode, words, S3Error};

    #[test]
    fn refused_credentials_are_told_apart() {
        for code in [
            "ExpiredToken",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "RequestTimeTooSkewed",
        ] {
            assert!(
                matches!(classify(403, code), S3Error::CredentialsRejected(c) if c == code),
                "{code}"
            );
        }
        assert!(matches!(
            classify(403, "AccessDenied"),
            S3Error::AccessDenied
        ));
        assert!(matches!(classify(412, ""), S3Error::Stale));
        assert_eq!(words(1234), "20 minutes 34 seconds");
        assert_eq!(words(3600), "1 hour");
    }

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

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn an_answer_must_be_the_range_asked_for() {
        let ok = |cr: Option<&str>, want: std::ops::Range<u64>, len, size| {
            check_range(cr, want, len, size).is_ok()
        };
        assert!(ok(Some("bytes 10-19/100"), 10..20, Some(10), Some(100)));
        assert!(!ok(Some("bytes 11-20/100"), 10..20, Some(10), Some(100)));
        assert!(!ok(Some("bytes 10-19/99"), 10..20, Some(10), Some(100)));
        assert!(ok(Some("bytes 10-19/*"), 10..20, Some(10), Some(100)));
        assert!(!ok(Some("garbage"), 10..20, Some(10), None));
        // A 200 with the whole object: only when that is what was asked.
        assert!(ok(None, 0..100, Some(100), Some(100)));
        assert!(!ok(None, 0..10, Some(100), Some(100)));
        assert!(!ok(None, 10..20, Some(10), None));
    }
}
