//! Client of the Provena data store API: fetch a dataset, list the registry,
//! get read credentials.
//!
//! Every call carries a Bearer access token from [`TokenSource`]. A 401 can
//! mean "token expired" or "not allowed"; the client refreshes the token once
//! and retries, and only a second 401 is taken as a refusal.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use thiserror::Error;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::{AuthError, TokenSource};
use crate::http::describe_reqwest;
use crate::retry::Deadline;
use crate::wire::{
    AwsCredentials, CredentialsRequest, CredentialsResponse, ErrorDetail, FetchDatasetResponse,
    ItemDataset, ListRequest, ListResponse,
};

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Base URL, e.g. `https://data-api.mds.gbrrestoration.org`.
    pub base_url: String,
    /// Registry list page size (`--registry-page-size`; Provena's own
    /// clients ask for 20).
    pub page_size: u32,
    /// Attempts for transient failures (5xx, resets) per call, all within
    /// the call's deadline.
    pub attempts: u32,
    /// Bound of one call, retries included (`--request-timeout`).
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://data-api.mds.gbrrestoration.org".into(),
            page_size: 20,
            attempts: 4,
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, Error)]
pub enum ApiError {
    #[error("no dataset with handle {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the data store API answered HTTP {status}: {detail}")]
    Http { status: u16, detail: String },
    #[error("cannot reach the data store API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the data store API sent an answer we cannot read: {0}")]
    Malformed(String),
    /// One attempt got no answer within the stall timeout; worth another.
    #[error("the data store API at {0} stopped answering")]
    Stalled(String),
    #[error("the data store API at {0} did not answer within --request-timeout")]
    TimedOut(String),
    /// The API is not usable at all (see [`DataStoreClient::check`]).
    #[error("{0}")]
    Unusable(String),
}

impl ApiError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Http { status, .. } => *status >= 500 || *status == 429,
            ApiError::Unreachable { .. } | ApiError::Stalled(_) => true,
            ApiError::Auth(a) => a.is_transient(),
            _ => false,
        }
    }

    /// The error to give when no attempt is left: a stall then means the
    /// call as a whole ran out of time.
    fn out_of_time(self) -> ApiError {
        match self {
            ApiError::Stalled(url) => ApiError::TimedOut(url),
            e => e,
        }
    }

    /// The call ran out of time (here or at the identity service).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ApiError::TimedOut(_) | ApiError::Auth(AuthError::TimedOut(_))
        )
    }
}

const FETCH_DATASET: &str = "/registry/items/fetch-dataset";

/// Refusals the data store words as 401 although the token is fine: asking
/// for a new token would not help, so none is asked for (source:
/// `../shared/docs/provena-api.md`).
const REFUSALS: &[&str] = &[
    "sufficient permissions",
    "did not grant access",
    "incorrect structure",
];

fn is_refusal(detail: &str) -> bool {
    REFUSALS.iter().any(|r| detail.contains(r))
}

/// The registry as listed: every dataset that could be read, and why the
/// listing stopped early if it did.
#[derive(Debug, Default)]
pub struct Listing {
    pub items: Vec<ItemDataset>,
    /// Set when a page could not be read (see
    /// [`DataStoreClient::list_datasets_counted`]).
    pub incomplete: Option<String>,
}

/// Registry pages in a row that must answer before a page size halved for
/// a slow page is doubled again.
const GROW_AFTER: u32 = 16;

/// A registry page the service cannot serve: a record on it does not parse.
fn is_bad_page(e: &ApiError) -> bool {
    matches!(e, ApiError::Http { status: 400, .. })
}

/// A registry page the server could not produce in time: a smaller one may.
fn slow_page(e: &ApiError) -> bool {
    matches!(e, ApiError::Http { status, .. } if *status >= 500)
        || matches!(e, ApiError::TimedOut(_) | ApiError::Stalled(_))
}

/// Read credentials as issued, with the service's clock at that moment
/// (its `Date` header), so their lifetime can be told on a wrong local clock.
pub struct IssuedCredentials {
    pub credentials: AwsCredentials,
    pub server_time: Option<SystemTime>,
}

/// Talks to the data store API for one user.
pub struct DataStoreClient {
    http: reqwest::Client,
    config: ApiConfig,
    tokens: Arc<TokenSource>,
    /// An incomplete registry listing was logged (once is enough).
    incomplete_told: std::sync::atomic::AtomicBool,
    /// The registry page size that last worked after pages too slow for
    /// the gateway (0: the configured size), kept across listings: a
    /// registry whose full pages the gateway times out on is not asked for
    /// one again before every page; and the pages that answered in a row
    /// at that size (it is tried larger again after `GROW_AFTER`).
    page_size: std::sync::atomic::AtomicU32,
    answered_in_a_row: std::sync::atomic::AtomicU32,
}

enum Method<'a> {
    Get(&'a [(&'a str, &'a str)]),
    Post(serde_json::Value),
}

impl DataStoreClient {
    pub fn new(http: reqwest::Client, config: ApiConfig, tokens: Arc<TokenSource>) -> Self {
        Self {
            http,
            config,
            tokens,
            incomplete_told: Default::default(),
            page_size: Default::default(),
            answered_in_a_row: Default::default(),
        }
    }

    /// The token source its calls use (also for calls to Provena's other
    /// APIs, such as the provenance API, with the same access token).
    pub fn tokens(&self) -> &Arc<TokenSource> {
        &self.tokens
    }

    /// The bound of one call, for callers that start one on their own.
    pub fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// The registry record of `handle`; `NotFound` when the service does not know it.
    pub async fn fetch_dataset(
        &self,
        handle: &str,
        deadline: Deadline,
    ) -> Result<ItemDataset, ApiError> {
        let span = info_span!("fetch_dataset", handle);
        async {
            let (r, _): (FetchDatasetResponse, _) = self
                .call(
                    FETCH_DATASET,
                    Method::Get(&[("handle_id", handle)]),
                    handle,
                    deadline,
                )
                .await?;
            match (r.status.success, r.item) {
                (true, Some(item)) => Ok(item),
                _ => Err(ApiError::NotFound(handle.to_string())),
            }
        }
        .instrument(span)
        .await
    }

    /// Every dataset the user may see, all pages; each page is bounded by
    /// the request timeout on its own. What could not be listed is logged
    /// (see [`list_datasets_counted`](Self::list_datasets_counted)).
    pub async fn list_datasets(&self) -> Result<Vec<ItemDataset>, ApiError> {
        Ok(self.list_datasets_counted(&mut |_| {}).await?.items)
    }

    /// [`list_datasets`](Self::list_datasets), telling `on_page` the number
    /// of datasets fetched so far after each page (a progress counter).
    ///
    /// Gentle on the registry (source: `../shared/docs/provena-api.md`):
    /// pages of `page_size` (20, as Provena's own clients ask); a page that
    /// times out or answers 5xx is asked again at once (no retry of the
    /// same page: at the real API gateway each costs its 29 s limit) with
    /// half the page size, down to one item. The size that worked is kept,
    /// for the rest of the listing and the next ones, and doubled again
    /// only after 16 pages in a row answered. A page that answers 400
    /// holds a record the service cannot parse; it is narrowed down the
    /// same way so that every record before the bad one is listed, and the
    /// listing ends there: the next page's key comes only with a page that
    /// answers, so nothing past the bad record can be reached. That is
    /// reported in [`Listing::incomplete`] and logged once; datasets
    /// reachable by handle still work.
    pub async fn list_datasets_counted(
        &self,
        on_page: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Listing, ApiError> {
        let span = info_span!("list_datasets");
        async {
            use std::sync::atomic::Ordering::Relaxed;
            let full = self.config.page_size.max(1);
            let mut size = match self.page_size.load(Relaxed) {
                0 => full,
                n => n.min(full),
            };
            // A size narrowed down to a bad record is this listing's own:
            // the next starts from the size that was slow-proof.
            let mut narrowed = false;
            let mut attempt = 0u32;
            let mut out = Vec::new();
            let mut key: Option<serde_json::Value> = None;
            let mut pages = 0u32;
            let mut incomplete = None;
            loop {
                let body = serde_json::to_value(ListRequest {
                    page_size: size,
                    pagination_key: key.clone(),
                    sort_by: None,
                })
                .map_err(|e| ApiError::Malformed(e.to_string()))?;
                let deadline = Deadline::after(self.config.request_timeout);
                // A slow page is not retried as it is: a smaller one is
                // (a page of one cannot be smaller: it is retried).
                let smallest = size == 1;
                let answer: Result<(ListResponse, _), ApiError> = self
                    .call_with(
                        "/registry/items/list",
                        Method::Post(body),
                        "",
                        deadline,
                        |e: &ApiError| smallest || !slow_page(e),
                    )
                    .await;
                let r = match answer {
                    // The size that worked is kept; grown back only after
                    // a run of pages that answered (a registry slow for a
                    // while does not cost a timeout before every page).
                    Ok((r, _)) => {
                        attempt = 0;
                        if !narrowed {
                            self.page_size.store(size, Relaxed);
                            let n = self.answered_in_a_row.fetch_add(1, Relaxed) + 1;
                            if n >= GROW_AFTER && size < full {
                                size = (size * 2).min(full);
                                self.answered_in_a_row.store(0, Relaxed);
                            }
                        }
                        r
                    }
                    // Only what a smaller page can cure: a page the server
                    // took too long over (5xx, the gateway's 504, a call
                    // that ran out of time), or one holding a bad record.
                    // An unreachable service or a refused token fails now.
                    Err(e) if size > 1 && (slow_page(&e) || is_bad_page(&e)) => {
                        size = (size / 2).max(1);
                        narrowed |= is_bad_page(&e);
                        self.answered_in_a_row.store(0, Relaxed);
                        info!(error = %e, page_size = size, "registry page failed; asking again with half the page size");
                        // Not at once against a service that is struggling.
                        attempt += 1;
                        tokio::time::sleep(crate::retry::backoff(attempt)).await;
                        continue;
                    }
                    Err(e) if is_bad_page(&e) => {
                        // The size that isolated it stays: growing would
                        // only read the bad record again.
                        let why = format!(
                            "a registry record after the first {} datasets cannot be read by the data store ({e}); \
                             the datasets past it are not listed (each still opens by its handle)",
                            out.len()
                        );
                        // Once per mount: the next listing meets it again.
                        if !self.incomplete_told.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            warn!("{why}");
                        }
                        incomplete = Some(why);
                        break;
                    }
                    Err(e) => return Err(e),
                };
                if !r.status.success {
                    return Err(ApiError::Http {
                        status: 200,
                        detail: r.status.details,
                    });
                }
                pages += 1;
                out.extend(r.items);
                on_page(out.len());
                // Short and even empty pages come with a key while more
                // follow: only a missing key ends the listing.
                match r.pagination_key {
                    Some(k) if !k.is_null() => key = Some(k),
                    _ => break,
                }
                if pages > 100_000 {
                    return Err(ApiError::Malformed("registry list never ends".into()));
                }
            }
            debug!(pages, datasets = out.len(), "registry listed");
            Ok(Listing {
                items: out,
                incomplete,
            })
        }
        .instrument(span)
        .await
    }

    /// One authenticated call (the first registry page, of one item), so
    /// a mount learns before mounting that the data store API is where
    /// `--api-url` says and accepts the token. Errors: one line naming the
    /// URL and what is wrong there.
    ///
    /// With `probe` (a mount of named datasets, which never lists the
    /// registry) the call is fetch-dataset of that handle instead; an
    /// unknown handle still shows the API is there.
    pub async fn check(&self, deadline: Deadline, probe: Option<&str>) -> Result<(), ApiError> {
        let span = info_span!("check_api");
        let base = self.config.base_url.trim_end_matches('/').to_string();
        let r: Result<(), ApiError> = async {
            match probe {
                Some(handle) => match self.fetch_dataset(handle, deadline).await {
                    // The API is there; what is wrong with the dataset is
                    // for the pinning that follows to say.
                    Ok(_) | Err(ApiError::NotFound(_)) | Err(ApiError::PermissionDenied(_)) => Ok(()),
                    Err(e) => Err(e),
                },
                None => {
                    let body = serde_json::json!({"page_size": 1, "pagination_key": null, "sort_by": null});
                    match self
                        .call::<ListResponse>("/registry/items/list", Method::Post(body), "", deadline)
                        .await
                    {
                        // The newest record cannot be parsed (a record in a
                        // newer format, most likely): the API is there. Its
                        // 400 says so in JSON; anything else answering 400
                        // (S3's XML, a web page) is not the API.
                        Err(ApiError::Http { status: 400, detail })
                            if !detail.trim_start().starts_with('<') =>
                        {
                            Ok(())
                        }
                        r => r.map(|_| ()),
                    }
                }
            }
        }
        .instrument(span)
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(ApiError::Unreachable { reason, .. }) => Err(ApiError::Unusable(format!(
                "cannot reach the data store API at {base}: {reason} (check --api-url)"
            ))),
            Err(ApiError::Http { status: 404, .. }) => Err(ApiError::Unusable(format!(
                "nothing answers as the data store API at {base} (HTTP 404); check --api-url"
            ))),
            Err(ApiError::Malformed(e)) => Err(ApiError::Unusable(format!(
                "{base} does not answer like the data store API ({e}); check --api-url"
            ))),
            // Not the API's JSON (a web page, S3's XML): something else
            // answers at that address.
            Err(ApiError::Http { status, detail }) if detail.trim_start().starts_with('<') => {
                Err(ApiError::Unusable(format!(
                    "{base} answers HTTP {status} with something that is not the data store API; check --api-url"
                )))
            }
            Err(ApiError::Http { status, detail }) => Err(ApiError::Unusable(format!(
                "the data store API at {base} answered HTTP {status}: {detail} (check --api-url)"
            ))),
            Err(e @ (ApiError::TimedOut(_) | ApiError::Stalled(_))) => Err(ApiError::Unusable(format!(
                "the data store API at {base} did not answer within --request-timeout ({e})"
            ))),
            // The data store's words for a token without roles.
            Err(ApiError::PermissionDenied(d)) if d.contains("incorrect structure") => {
                Err(ApiError::Auth(AuthError::NoRoles))
            }
            Err(ApiError::PermissionDenied(d)) => Err(ApiError::Unusable(format!(
                "the data store API at {base} refused the token: {d}"
            ))),
            // A token refused by the identity service: said by the caller,
            // which knows where the token came from.
            Err(e) => Err(e),
        }
    }

    /// Temporary S3 read credentials for `handle`.
    pub async fn read_credentials(
        &self,
        handle: &str,
        deadline: Deadline,
    ) -> Result<IssuedCredentials, ApiError> {
        let span = info_span!("read_credentials", handle);
        async {
            let body = serde_json::to_value(CredentialsRequest {
                dataset_id: handle.to_string(),
                console_session_required: false,
            })
            .map_err(|e| ApiError::Malformed(e.to_string()))?;
            let (r, server_time): (CredentialsResponse, _) = self
                .call(
                    "/registry/credentials/generate-read-access-credentials",
                    Method::Post(body),
                    handle,
                    deadline,
                )
                .await?;
            if !r.status.success {
                return Err(ApiError::Http {
                    status: 200,
                    detail: r.status.details,
                });
            }
            Ok(IssuedCredentials {
                credentials: r.credentials,
                server_time,
            })
        }
        .instrument(span)
        .await
    }

    /// One API call with token refresh on 401 and retries on transient
    /// failures, all within `deadline`. Also returns the answer's `Date`.
    async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        method: Method<'_>,
        handle: &str,
        deadline: Deadline,
    ) -> Result<(T, Option<SystemTime>), ApiError> {
        self.call_with(path, method, handle, deadline, |_| true)
            .await
    }

    /// [`call`](Self::call), retrying only the transient failures `retry`
    /// accepts.
    async fn call_with<T: DeserializeOwned>(
        &self,
        path: &str,
        method: Method<'_>,
        handle: &str,
        deadline: Deadline,
        retry: impl Fn(&ApiError) -> bool,
    ) -> Result<(T, Option<SystemTime>), ApiError> {
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            attempt += 1;
            let res = self.call_once(path, &method, handle, deadline).await;
            match res {
                Err(Refusal::Unauthorized(detail, token)) => {
                    // A 401 may mean "token expired" or "not allowed"; only
                    // the first is worth a new token, and only once.
                    if refreshed || is_refusal(&detail) {
                        return Err(ApiError::PermissionDenied(detail));
                    }
                    self.tokens.invalidate(&token);
                    refreshed = true;
                }
                Err(Refusal::Other(e))
                    if e.is_transient() && retry(&e) && attempt < self.config.attempts =>
                {
                    let wait = crate::retry::backoff(attempt);
                    if !deadline.allows(wait) {
                        return Err(e.out_of_time());
                    }
                    // Not a warning yet: the call may still succeed; if
                    // it does not, its caller tells why.
                    info!(path, attempt, error = %e, "data store call failed, retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(Refusal::Other(e)) => return Err(e.out_of_time()),
                Ok(v) => return Ok(v),
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        path: &str,
        method: &Method<'_>,
        handle: &str,
        deadline: Deadline,
    ) -> Result<(T, Option<SystemTime>), Refusal> {
        let url = format!("{}{}", self.config.base_url.trim_end_matches('/'), path);
        let token = self
            .tokens
            .access_token(deadline)
            .await
            .map_err(ApiError::Auth)?;
        let timeout = deadline.attempt(crate::retry::stall_timeout(self.config.request_timeout));
        if timeout.is_zero() {
            return Err(Refusal::Other(ApiError::TimedOut(url)));
        }
        let req = match method {
            Method::Get(q) => self.http.get(&url).query(q),
            Method::Post(b) => self.http.post(&url).json(b),
        };
        let unreachable = |e: reqwest::Error| {
            if e.is_timeout() {
                ApiError::Stalled(url.clone())
            } else {
                ApiError::Unreachable {
                    url: url.clone(),
                    reason: describe_reqwest(&e),
                }
            }
        };
        let resp = req
            .bearer_auth(token.expose())
            .timeout(timeout)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
            .map(SystemTime::from);
        let body = resp.bytes().await.map_err(unreachable)?;
        match status {
            200 => serde_json::from_slice(&body)
                .map(|v| (v, date))
                .map_err(|e| Refusal::Other(ApiError::Malformed(format!("{path}: {e}")))),
            401 | 403 => {
                let detail = detail_of(&body);
                if status == 401 {
                    Err(Refusal::Unauthorized(detail, token))
                } else {
                    Err(Refusal::Other(ApiError::PermissionDenied(detail)))
                }
            }
            400 if path == FETCH_DATASET => {
                // fetch-dataset answers an unknown handle with 400 + detail.
                // (Elsewhere a 400 is an error, not "no such dataset": a
                // file must not look absent because a credentials call
                // failed. A 404 is a wrong --api-url, never a dataset.)
                debug!(status, detail = %detail_of(&body), "dataset not found");
                Err(Refusal::Other(ApiError::NotFound(handle.to_string())))
            }
            _ => Err(Refusal::Other(ApiError::Http {
                status,
                detail: detail_of(&body),
            })),
        }
    }
}

enum Refusal {
    Unauthorized(String, crate::secret::Secret),
    Other(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Other(e)
    }
}

/// The human part of an error body: FastAPI `detail`, or `status.details`.
fn detail_of(body: &[u8]) -> String {
    if let Ok(d) = serde_json::from_slice::<ErrorDetail>(body) {
        return match d.detail {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(s) = v.pointer("/status/details").and_then(|s| s.as_str()) {
            return s.to_string();
        }
    }
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}
