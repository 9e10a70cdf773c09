//! The emulator: Keycloak's realm endpoints, the data store API and an S3
//! endpoint, all on one loopback port, serving a folder of datasets.
//!
//! Used by `provenafs sim`, the demo, the tests and the benchmarks. It
//! shares only the wire formats ([`crate::wire`]) with the client side,
//! never its logic. Paths: `/auth/realms/rrap/...` (identity),
//! `/registry/...` (data store API), `/model_run/...` (provenance API) and
//! `/jobs/...` (job API) (see [`prov`]), `/_sim/...` (test control: stats,
//! revocation, device approval), everything else S3 (path-style).

pub mod faults;
pub mod identity;
pub mod prov;
pub mod registry;
pub mod s3;
pub mod store;
pub mod wan;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::service::S3ServiceBuilder;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use identity::Identity;
use registry::Issued;
use store::FolderStore;

pub const REALM_PATH: &str = "/auth/realms/rrap";
/// What `provenafs login` asks for, and what the printed token has.
pub const DEFAULT_OFFLINE_SCOPE: &str = "offline_access roles";
/// The RRAP deployment's region, which is also the client's default.
pub const DEFAULT_BUCKET_REGION: &str = "ap-southeast-2";

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub access_token_ttl: u64,
    /// Seconds read credentials last (8 hours in the RRAP deployment).
    pub credentials_ttl: u64,
    /// Largest registry page the API serves.
    pub page_size: u32,
    /// Largest ListObjectsV2 page S3 serves.
    pub s3_page_size: u32,
    /// Handles whose files the user may not read (metadata only).
    pub deny: Vec<String>,
    /// Handles whose record the user may not see: never listed,
    /// fetch-dataset and read credentials answer 401.
    pub hidden: Vec<String>,
    /// Registry pages are short or empty (deterministically) while
    /// `pagination_key` stays non-null, as the real service's are when it
    /// filters a page after reading it.
    pub ragged_pages: bool,
    /// 1-based registry page (of 20 records, newest first) whose middle
    /// record cannot be parsed: every list request reading it answers 400.
    /// 0: none. Also `POST /_sim/faults?fail_list_page=N`.
    pub fail_list_page: u64,
    /// Scopes of the offline token the emulator prints (space-separated).
    /// Without `roles`, its access tokens carry no roles and the data store
    /// API answers them 401.
    pub offline_token_scope: String,
    /// Region the bucket lives in: S3 requests signed for another region
    /// answer 301 `PermanentRedirect` naming it. Empty: any region.
    pub s3_bucket_region: String,
    /// S3 requests whose key (or listing prefix, continuation token)
    /// contains this answer HTTP 400 with an empty body.
    pub s3_bare_400: Option<String>,
    pub device_interval: u64,
    /// Seconds a device login stays open.
    pub device_expires_in: u64,
    /// Polls closer than this answer `slow_down`, whatever `interval` said
    /// (a busy server); 0 means the advertised interval.
    pub device_min_interval: u64,
    pub auto_approve: bool,
    /// Fraction of S3 requests that fail (500, 503 SlowDown, reset, short body).
    pub s3_fault_rate: f64,
    /// Fraction of identity/API requests that fail (500/502/503, reset).
    pub api_fault_rate: f64,
    /// Delay added to every request.
    pub latency_ms: u64,
    /// Objects that cannot exist as files (odd keys), from a JSON file.
    pub extra_keys: Option<PathBuf>,
    /// S3 requests whose key (or listing prefix, continuation token)
    /// contains this text hang, accepted and never answered.
    pub s3_hang: Option<String>,
    /// Identity and data store requests hang.
    pub api_hang: bool,
    /// Seconds the S3 side's clock runs ahead of the real one (negative:
    /// behind); more than 15 minutes off the client's and every request
    /// answers `RequestTimeTooSkewed`, as AWS does.
    pub clock_skew: i64,
    /// The WAN profile: S3 first-byte wait, per-stream and link pacing, API
    /// call latency (see [`wan`]).
    pub wan: wan::WanProfile,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("."),
            addr: ([127, 0, 0, 1], 0).into(),
            access_token_ttl: 300,
            credentials_ttl: 28800,
            page_size: 1000,
            s3_page_size: 1000,
            deny: Vec::new(),
            hidden: Vec::new(),
            ragged_pages: false,
            fail_list_page: 0,
            offline_token_scope: DEFAULT_OFFLINE_SCOPE.to_string(),
            s3_bucket_region: DEFAULT_BUCKET_REGION.to_string(),
            s3_bare_400: None,
            device_interval: 5,
            device_expires_in: 600,
            device_min_interval: 0,
            auto_approve: false,
            s3_fault_rate: 0.0,
            api_fault_rate: 0.0,
            latency_ms: 0,
            extra_keys: None,
            s3_hang: None,
            api_hang: false,
            clock_skew: 0,
            wan: wan::WanProfile::default(),
        }
    }
}

/// Request counters, readable at `/_sim/stats`.
#[derive(Default)]
pub struct Stats {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    /// Registry list requests (every page asked for, 400s included).
    pub api_lists: AtomicU64,
    /// Registry pages refused with 400 (an unparseable record on them).
    pub api_list_400: AtomicU64,
    /// Registry pages answered 504 (`list_max_page`).
    pub api_list_timeouts: AtomicU64,
    pub api_fetches: AtomicU64,
    /// fetch-dataset of an unknown handle (400).
    pub api_fetch_400: AtomicU64,
    /// fetch-dataset of a hidden record (401).
    pub api_fetch_401: AtomicU64,
    /// Calls to generate-read-access-credentials, however answered.
    pub api_credentials: AtomicU64,
    /// Data store calls refused because the token carries no roles.
    pub api_no_roles: AtomicU64,
    /// S3 requests answered 301 PermanentRedirect (wrong region).
    pub s3_redirects: AtomicU64,
    /// S3 requests answered 400 with an empty body.
    pub s3_bare_400: AtomicU64,
    pub credentials_issued: AtomicU64,
    pub credentials_refused: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub expired_rejections: AtomicU64,
    pub device_slow_downs: AtomicU64,
    /// `POST /model_run/register` answered 200 (a job dispatched).
    pub prov_registered: AtomicU64,
    /// `POST /model_run/register` answered 4xx (token, body or ids).
    pub prov_refused: AtomicU64,
}

impl Stats {
    fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "s3_get": g(&self.gets), "s3_get_bytes": g(&self.get_bytes),
            "s3_head": g(&self.heads), "s3_list": g(&self.lists),
            "api_list": g(&self.api_lists), "api_list_400": g(&self.api_list_400),
            "api_list_504": g(&self.api_list_timeouts),
            "api_fetch": g(&self.api_fetches),
            "api_fetch_400": g(&self.api_fetch_400), "api_fetch_401": g(&self.api_fetch_401),
            "api_credentials": g(&self.api_credentials),
            "api_no_roles": g(&self.api_no_roles),
            "s3_redirect": g(&self.s3_redirects), "s3_bare_400": g(&self.s3_bare_400),
            "credentials_issued": g(&self.credentials_issued),
            "credentials_refused": g(&self.credentials_refused),
            "tokens_issued": g(&self.tokens_issued),
            "expired_rejections": g(&self.expired_rejections),
            "device_slow_downs": g(&self.device_slow_downs),
            "prov_registered": g(&self.prov_registered),
            "prov_refused": g(&self.prov_refused),
        })
    }
}

pub struct SimState {
    pub cfg: SimConfig,
    pub store: Arc<FolderStore>,
    pub stats: Stats,
    pub faults: faults::Faults,
    pub wan: Arc<wan::Wan>,
    identity: Mutex<Identity>,
    creds: Mutex<HashMap<String, Issued>>,
    base_url: Mutex<String>,
    /// Model run records lodged and their jobs (see [`prov`]).
    prov: Mutex<prov::Prov>,
    /// Every secret handed out (tokens, secret keys, session tokens), so a
    /// test can check that none of them ever shows up in a log.
    issued_secrets: Mutex<Vec<String>>,
}

impl SimState {
    fn identity(&self) -> MutexGuard<'_, Identity> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn creds(&self) -> MutexGuard<'_, HashMap<String, Issued>> {
        self.creds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn remember_secret(&self, s: &str) {
        let mut v = self
            .issued_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if v.len() < 100_000 {
            v.push(s.to_string());
        }
    }

    pub fn secrets(&self) -> serde_json::Value {
        json!(*self
            .issued_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    pub fn base_url(&self) -> String {
        self.base_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn realm_url(&self) -> String {
        format!("{}{REALM_PATH}", self.base_url())
    }
}

/// A JSON answer of the identity or API side.
pub struct Reply {
    status: u16,
    body: serde_json::Value,
    /// An HTML page instead of JSON.
    html: Option<String>,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            body,
            html: None,
        }
    }

    pub fn html(status: u16, page: String) -> Self {
        Self {
            status,
            body: serde_json::Value::Null,
            html: Some(page),
        }
    }
}

/// What a client needs to talk to a running emulator.
#[derive(Clone, Debug)]
pub struct SimEnv {
    pub auth_url: String,
    pub api_url: String,
    /// The provenance API (`https://prov-api.<domain>` in a deployment):
    /// here the same base URL as the data store API.
    pub prov_api_url: String,
    /// The job API (`https://job-api.<domain>`): the same base URL too.
    pub job_api_url: String,
    pub s3_endpoint: String,
    pub offline_token: String,
}

impl SimEnv {
    /// Shell lines a client can `source` (or `eval`): one `NAME=value`
    /// line each, read as they are by scripts and tests, then one
    /// `export` line so the values reach the commands run next.
    pub fn shell(&self) -> String {
        // The token stays the last `NAME=value` line: readers wait for it
        // to know the file is complete.
        format!(
            "PROVENA_AUTH_URL={}\nPROVENA_API_URL={}\nPROVENA_PROV_API_URL={}\nPROVENA_JOB_API_URL={}\n\
             PROVENA_S3_ENDPOINT={}\nRRAP_OFFLINE_TOKEN={}\n\
             export PROVENA_AUTH_URL PROVENA_API_URL PROVENA_PROV_API_URL PROVENA_JOB_API_URL \
             PROVENA_S3_ENDPOINT RRAP_OFFLINE_TOKEN\n",
            self.auth_url,
            self.api_url,
            self.prov_api_url,
            self.job_api_url,
            self.s3_endpoint,
            self.offline_token
        )
    }
}

pub struct Sim {
    pub state: Arc<SimState>,
    pub env: SimEnv,
    pub addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Sim {
    pub async fn start(cfg: SimConfig) -> std::io::Result<Sim> {
        if !cfg.root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("data folder {} does not exist", cfg.root.display()),
            ));
        }
        let listener = TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let base = format!("http://{addr}");
        let mut store = FolderStore::new(cfg.root.clone());
        if let Some(p) = &cfg.extra_keys {
            store.load_extra_keys(p)?;
        }
        let state = Arc::new(SimState {
            faults: faults::Faults::new(cfg.s3_fault_rate, cfg.api_fault_rate, cfg.latency_ms),
            wan: Arc::new(wan::Wan::new(cfg.wan)),
            store: Arc::new(store),
            cfg,
            stats: Stats::default(),
            identity: Mutex::new(Identity::default()),
            creds: Mutex::new(HashMap::new()),
            base_url: Mutex::new(base.clone()),
            prov: Mutex::new(prov::Prov::default()),
            issued_secrets: Mutex::new(Vec::new()),
        });
        let env = SimEnv {
            auth_url: state.realm_url(),
            api_url: base.clone(),
            prov_api_url: base.clone(),
            job_api_url: base.clone(),
            s3_endpoint: base,
            offline_token: state.new_offline_token(&state.cfg.offline_token_scope),
        };
        state
            .faults
            .set_s3_hang(state.cfg.s3_hang.as_deref().unwrap_or(""));
        state.faults.set_api_hang(state.cfg.api_hang);
        state.faults.set_clock_skew(state.cfg.clock_skew);
        state.faults.set_fail_list_page(state.cfg.fail_list_page);
        state.faults.set_s3_region(&state.cfg.s3_bucket_region);
        state
            .faults
            .set_s3_bare_400(state.cfg.s3_bare_400.as_deref().unwrap_or(""));
        let s3 = {
            let mut b = S3ServiceBuilder::new(s3::SimS3(state.clone()));
            b.set_auth(s3::SimAuth(state.clone()));
            // The request-time check is ours ([`clock_check`]), against the
            // emulator's possibly skewed clock.
            let mut config = s3s::config::S3Config::default();
            config.presigned_url_max_skew_time_secs = u32::MAX;
            b.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(
                config,
            ))));
            b.build()
        };
        state.store.warm_etags();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(listener, state.clone(), s3, rx));
        info!(%addr, "emulator listening");
        Ok(Sim {
            state,
            env,
            addr,
            shutdown: tx,
        })
    }

    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    s3: s3s::service::S3Service,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (socket, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = socket.set_nodelay(true);
        let state = state.clone();
        let s3 = s3.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            let s3 = s3.clone();
            async move { route(state, s3, req).await }
        });
        let conn = builder
            .serve_connection(TokioIo::new(socket), svc)
            .into_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection ended");
            }
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn respond(r: Reply) -> Response<Body> {
    let (body, kind) = match r.html {
        Some(h) => (h.into_bytes(), "text/html; charset=utf-8"),
        None => (
            serde_json::to_vec(&r.body).unwrap_or_default(),
            "application/json",
        ),
    };
    Response::builder()
        .status(r.status)
        .header("content-type", kind)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// An S3 error answer, as AWS writes them.
fn s3_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message><RequestId>sim</RequestId></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(full(xml))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// The connection is dropped without an answer (a reset, as the client sees it).
fn reset() -> s3s::HttpError {
    s3s::HttpError::new(Box::new(std::io::Error::other("injected connection reset")))
}

/// Sends the first part of the body, then breaks the connection; the
/// Content-Length still promises the whole body.
async fn cut_short(resp: Response<s3s::Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let data = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let keep = data.len() / 2;
    let frames: Vec<Result<hyper::body::Frame<Bytes>, BoxError>> = vec![
        Ok(hyper::body::Frame::data(data.slice(..keep))),
        Err(Box::new(std::io::Error::other("injected short body"))),
    ];
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
    Response::from_parts(parts, body)
}

fn parse_form(b: &[u8]) -> HashMap<String, String> {
    serde_urlencoded::from_bytes(b).unwrap_or_default()
}

/// What an S3 stall is matched against: the decoded path (bucket and key)
/// and query (listing prefix, continuation token, start-after).
fn s3_target(uri: &hyper::Uri) -> String {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut t = decode(uri.path());
    if let Some(q) = uri.query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            t.push_str(&format!("?{k}={v}"));
        }
    }
    t
}

/// The region a SigV4 request was signed for: the third part of the
/// credential scope (`AKID/DATE/REGION/s3/aws4_request`), from the
/// `Authorization` header or a presigned URL's `X-Amz-Credential`.
fn signed_region(headers: &hyper::HeaderMap, uri: &hyper::Uri) -> Option<String> {
    let scope = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(auth) => auth
            .split([' ', ','])
            .find_map(|p| p.trim().strip_prefix("Credential="))?
            .to_string(),
        None => url::form_urlencoded::parse(uri.query()?.as_bytes())
            .find(|(k, _)| k == "X-Amz-Credential")?
            .1
            .into_owned(),
    };
    scope.split('/').nth(2).map(str::to_string)
}

/// A request signed for another region than the bucket's answers what AWS
/// answers: 301 `PermanentRedirect`, the bucket's region in
/// `x-amz-bucket-region`, and an XML body naming the bucket and endpoint.
fn region_check(state: &SimState, req: &Request<Incoming>) -> Option<Response<Body>> {
    let home = state.faults.s3_region();
    let signed = signed_region(req.headers(), req.uri())?;
    if home.is_empty() || signed == home {
        return None;
    }
    // Path-style: the bucket is the first path segment.
    let bucket = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    // The endpoint to use is this one (a client re-signs for the region
    // and keeps its endpoint); AWS would name its regional host here.
    let endpoint = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PermanentRedirect</Code>\
         <Message>The bucket you are attempting to access must be addressed using the specified endpoint. \
         Please send all future requests to this endpoint.</Message>\
         <Endpoint>{}</Endpoint><Bucket>{}</Bucket><RequestId>sim</RequestId><HostId>sim</HostId></Error>",
        esc(&endpoint),
        esc(&bucket)
    );
    let body = if req.method() == hyper::Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(xml)
    };
    Response::builder()
        .status(301)
        .header("content-type", "application/xml")
        .header("x-amz-bucket-region", home)
        .body(full(body))
        .ok()
}

/// S3's clock: the real one plus the configured skew.
fn s3_now(state: &SimState) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::seconds(state.faults.clock_skew())
}

/// S3 refuses a request signed more than 15 minutes away from its own
/// clock (`x-amz-date` against the S3 side's, possibly skewed, time).
fn clock_check(state: &SimState, req: &Request<Incoming>) -> Option<Response<Body>> {
    let signed = req
        .headers()
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| chrono::NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%SZ").ok())?
        .and_utc();
    let now = s3_now(state);
    if (now - signed).num_seconds().abs() <= 15 * 60 {
        return None;
    }
    let msg = format!(
        "The difference between the request time and the current time is too large.</Message><RequestTime>{}</RequestTime><ServerTime>{}</ServerTime><MaxAllowedSkewMilliseconds>900000</MaxAllowedSkewMilliseconds><Message>",
        signed.format("%Y%m%dT%H%M%SZ"),
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    Some(s3_error(403, "RequestTimeTooSkewed", &msg))
}

/// Dates an S3 answer with the S3 side's clock (clients correct their
/// signing time from it, as they do against AWS).
fn s3_dated(state: &SimState, mut resp: Response<Body>) -> Response<Body> {
    if state.faults.clock_skew() != 0 {
        let date = s3_now(state)
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        if let Ok(v) = hyper::header::HeaderValue::from_str(&date) {
            resp.headers_mut().insert(hyper::header::DATE, v);
        }
    }
    resp
}

async fn route(
    state: Arc<SimState>,
    s3: s3s::service::S3Service,
    req: Request<Incoming>,
) -> Result<Response<Body>, s3s::HttpError> {
    let path = req.uri().path().to_string();
    let is_api = path.starts_with(REALM_PATH)
        || path.starts_with("/registry/")
        || prov::serves(&path)
        || path.starts_with("/_sim/");
    let latency = state.faults.latency();
    if latency > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(latency)).await;
    }
    if !is_api {
        let target = s3_target(req.uri());
        state.faults.hang_s3(&target).await;
        if state.faults.s3_bare_400(&target) {
            // What a proxy or a wrong endpoint sends: no XML, no code.
            state.stats.s3_bare_400.fetch_add(1, Ordering::Relaxed);
            return Ok(Response::builder()
                .status(400)
                .body(full(Bytes::new()))
                .unwrap_or_else(|_| Response::new(full(Bytes::new()))));
        }
        if let Some(moved) = region_check(&state, &req) {
            state.stats.s3_redirects.fetch_add(1, Ordering::Relaxed);
            return Ok(s3_dated(&state, moved));
        }
        if let Some(refused) = clock_check(&state, &req) {
            return Ok(s3_dated(&state, refused));
        }
        let resp = if is_service_probe(&req) {
            // provenafs's endpoint check before it mounts. AWS S3 answers
            // an anonymous request to the service itself with 403; s3s
            // knows no such operation and logged an ERROR at every mount.
            Response::builder()
                .status(403)
                .body(full(Bytes::new()))
                .unwrap_or_else(|_| Response::new(full(Bytes::new())))
        } else {
            s3_answer(&state, s3, req).await?
        };
        state.wan.first_byte().await;
        let resp = resp.map(|b| state.wan.pace(b));
        return Ok(s3_dated(&state, resp));
    }
    if !path.starts_with("/_sim/") {
        state.faults.hang_api().await;
        state.wan.api_call().await;
    }
    api_answer(state, path, req).await
}

/// An unsigned `HEAD /`: a request to the S3 service, not to a bucket.
fn is_service_probe<B>(req: &Request<B>) -> bool {
    req.method() == hyper::Method::HEAD
        && req.uri().path() == "/"
        && !req.headers().contains_key(hyper::header::AUTHORIZATION)
}

/// The faults and the WAN profile in force, as `/_sim/faults` shows them.
fn faults_json(state: &SimState) -> serde_json::Value {
    let mut j = state.faults.json();
    if let (Some(o), serde_json::Value::Object(w)) = (j.as_object_mut(), state.wan.json()) {
        o.extend(w);
    }
    j
}

/// An S3 request, with the injected faults.
async fn s3_answer(
    state: &SimState,
    s3: s3s::service::S3Service,
    req: Request<Incoming>,
) -> Result<Response<Body>, s3s::HttpError> {
    use faults::S3Fault;
    let fault = state.faults.pick_s3();
    match fault {
        Some(S3Fault::InternalError) => {
            return Ok(s3_error(
                500,
                "InternalError",
                "We encountered an internal error. Please try again.",
            ))
        }
        Some(S3Fault::SlowDown) => {
            return Ok(s3_error(
                503,
                "SlowDown",
                "Please reduce your request rate.",
            ))
        }
        Some(S3Fault::Reset) => return Err(reset()),
        _ => {}
    }
    let resp = s3.call(req.map(s3s::Body::from)).await?;
    if fault == Some(S3Fault::ShortBody) {
        return Ok(cut_short(resp).await);
    }
    Ok(resp.map(|b| b.boxed_unsync()))
}

/// An identity, data store or `/_sim/` control request.
async fn api_answer(
    state: Arc<SimState>,
    path: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, s3s::HttpError> {
    if !path.starts_with("/_sim/") {
        match state.faults.pick_api() {
            Some(faults::ApiFault::Status(code)) => {
                return Ok(respond(Reply::json(
                    code,
                    json!({"detail": "injected fault"}),
                )))
            }
            Some(faults::ApiFault::Reset) => return Err(reset()),
            None => {}
        }
    }
    let method = req.method().clone();
    let query: HashMap<String, String> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default();
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(respond(Reply::json(400, json!({"detail": "body"})))),
    };
    let realm_token = format!("{REALM_PATH}/protocol/openid-connect/token");
    let realm_device = format!("{REALM_PATH}/protocol/openid-connect/auth/device");
    let realm_logout = format!("{REALM_PATH}/protocol/openid-connect/logout");
    let reply = match (method.as_str(), path.as_str()) {
        ("POST", p) if p == realm_token => {
            let r = state.token(&parse_form(&body));
            if r.status == 200 {
                state.stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        ("POST", p) if p == realm_device => state.device_authorization(&parse_form(&body)),
        ("POST", p) if p == realm_logout => state.logout(&parse_form(&body)),
        ("GET", p) if p == format!("{REALM_PATH}/device") => {
            // The page a user opens from `provenafs login`, standing in for
            // Keycloak's consent screen.
            let code = query.get("user_code").cloned().unwrap_or_default();
            identity::device_page(&code)
        }
        ("GET", "/_sim/stats") => {
            let mut j = state.stats.json();
            j["faults"] = faults_json(&state);
            Reply::json(200, j)
        }
        ("GET", "/_sim/faults") => Reply::json(200, faults_json(&state)),
        ("POST", "/_sim/faults") => {
            let num = |k: &str| query.get(k).and_then(|v| v.parse::<f64>().ok());
            state.faults.set(
                num("s3_rate"),
                num("api_rate"),
                num("latency_ms").map(|v| v as u64),
            );
            if let Some(t) = query.get("s3_hang") {
                state.faults.set_s3_hang(t);
            }
            if let Some(v) = query.get("api_hang") {
                state
                    .faults
                    .set_api_hang(matches!(v.as_str(), "1" | "true" | "on"));
            }
            if let Some(v) = num("clock_skew") {
                state.faults.set_clock_skew(v as i64);
            }
            if let Some(v) = num("fail_list_page") {
                state.faults.set_fail_list_page(v.max(0.0) as u64);
            }
            if let Some(v) = num("list_max_page") {
                state.faults.set_list_max_page(v.max(0.0) as u64);
            }
            if let Some(r) = query.get("s3_region") {
                state.faults.set_s3_region(r);
            }
            if let Some(t) = query.get("s3_bare_400") {
                state.faults.set_s3_bare_400(t);
            }
            if let Some(t) = query.get("s3_list_loop") {
                state.faults.set_s3_list_loop(t);
            }
            if let Some(t) = query.get("s3_range_shift") {
                state.faults.set_s3_range_shift(t);
            }
            state.wan.set(
                num("first_byte_ms").map(|v| v.max(0.0) as u64),
                num("stream_mib_per_s"),
                num("link_mib_per_s"),
                num("api_latency_ms").map(|v| v.max(0.0) as u64),
            );
            Reply::json(200, faults_json(&state))
        }
        ("POST", "/_sim/credentials") => {
            // What happens to S3 credentials in the field: revoked
            // (InvalidAccessKeyId), re-keyed (SignatureDoesNotMatch) or
            // expired early (ExpiredToken).
            match query.get("action").map(String::as_str) {
                Some(a @ ("forget" | "rotate" | "expire")) => {
                    let n = state.credentials_event(a);
                    Reply::json(200, json!({"action": a, "credentials": n}))
                }
                _ => Reply::json(
                    400,
                    json!({"detail": "action must be forget, rotate or expire"}),
                ),
            }
        }
        ("GET", "/_sim/secrets") => Reply::json(200, state.secrets()),
        ("POST", "/_sim/revoke") => {
            state.revoke_all();
            Reply::json(200, json!({"revoked": true}))
        }
        ("POST", "/_sim/device") => {
            let code = query.get("user_code").cloned().unwrap_or_default();
            let approve = query.get("action").map(String::as_str) != Some("deny");
            let found = state.decide_device(&code, approve);
            Reply::json(if found { 200 } else { 404 }, json!({"found": found}))
        }
        // The provenance and job APIs (their own route, token and body
        // checks, in FastAPI's order).
        (m, p) if prov::serves(p) => state.prov_answer(m, p, bearer.as_deref(), &query, &body),
        (_, p) if p.starts_with("/registry/") => {
            let known = bearer
                .as_deref()
                .map_or(identity::Bearer::Invalid, |t| state.bearer(t));
            if known == identity::Bearer::Invalid {
                Reply::json(401, json!({"detail": "Could not validate credentials"}))
            } else if known == identity::Bearer::NoRoles {
                // The service reads the user's roles from `realm_access`;
                // a token without it fails its token model.
                state.stats.api_no_roles.fetch_add(1, Ordering::Relaxed);
                Reply::json(401, json!({"detail": "Token had incorrect structure."}))
            } else {
                match (method.as_str(), p) {
                    ("GET", "/registry/items/fetch-dataset") => state.fetch_dataset(&query),
                    ("POST", "/registry/items/list") => state.list_items(&body),
                    ("POST", "/registry/credentials/generate-read-access-credentials") => {
                        state.read_credentials(&body)
                    }
                    _ => Reply::json(404, json!({"detail": "Not Found"})),
                }
            }
        }
        _ => Reply::json(404, json!({"detail": "Not Found"})),
    };
    Ok(respond(reply))
}

#[cfg(test)]
mod tests {
    use super::signed_region;

    #[test]
    fn the_signed_region_is_read_from_header_or_query() {
        let mut h = hyper::HeaderMap::new();
        let uri: hyper::Uri = "/b/k".parse().unwrap();
        assert_eq!(signed_region(&h, &uri), None);
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=ASIAX/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        assert_eq!(signed_region(&h, &uri).as_deref(), Some("us-east-1"));
        let presigned: hyper::Uri =
            "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAX%2F20260101%2Feu-west-1%2Fs3%2Faws4_request"
                .parse()
                .unwrap();
        assert_eq!(
            signed_region(&hyper::HeaderMap::new(), &presigned).as_deref(),
            Some("eu-west-1")
        );
    }
}
