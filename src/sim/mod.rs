//! The emulator: Keycloak's realm endpoints, the data store API and an S3
//! endpoint, all on one loopback port, serving a folder of datasets.
//!
//! Used by `provenafs sim`, the demo, the tests and the benchmarks. It
//! shares only the wire formats ([`crate::wire`]) with the client side,
//! never its logic. Paths: `/auth/realms/rrap/...` (identity),
//! `/registry/...` (data store API), `/_sim/...` (test control: stats,
//! revocation, device approval), everything else S3 (path-style).

pub mod identity;
pub mod registry;
pub mod s3;
pub mod store;

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

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub access_token_ttl: u64,
    pub credentials_ttl: u64,
    /// Largest registry page the API serves.
    pub page_size: u32,
    /// Largest ListObjectsV2 page S3 serves.
    pub s3_page_size: u32,
    /// Handles whose files the user may not read (metadata only).
    pub deny: Vec<String>,
    pub device_interval: u64,
    pub auto_approve: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("."),
            addr: ([127, 0, 0, 1], 0).into(),
            access_token_ttl: 300,
            credentials_ttl: 3600,
            page_size: 1000,
            s3_page_size: 1000,
            deny: Vec::new(),
            device_interval: 5,
            auto_approve: false,
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
    pub api_lists: AtomicU64,
    pub credentials_issued: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub expired_rejections: AtomicU64,
}

impl Stats {
    fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "s3_get": g(&self.gets), "s3_get_bytes": g(&self.get_bytes),
            "s3_head": g(&self.heads), "s3_list": g(&self.lists),
            "api_list": g(&self.api_lists), "credentials_issued": g(&self.credentials_issued),
            "tokens_issued": g(&self.tokens_issued),
            "expired_rejections": g(&self.expired_rejections),
        })
    }
}

pub struct SimState {
    pub cfg: SimConfig,
    pub store: Arc<FolderStore>,
    pub stats: Stats,
    identity: Mutex<Identity>,
    creds: Mutex<HashMap<String, Issued>>,
    base_url: Mutex<String>,
}

impl SimState {
    fn identity(&self) -> MutexGuard<'_, Identity> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn creds(&self) -> MutexGuard<'_, HashMap<String, Issued>> {
        self.creds.lock().unwrap_or_else(|p| p.into_inner())
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
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self { status, body }
    }
}

/// What a client needs to talk to a running emulator.
#[derive(Clone, Debug)]
pub struct SimEnv {
    pub auth_url: String,
    pub api_url: String,
    pub s3_endpoint: String,
    pub offline_token: String,
}

impl SimEnv {
    /// Shell lines a client can `source`.
    pub fn shell(&self) -> String {
        format!(
            "PROVENA_AUTH_URL={}\nPROVENA_API_URL={}\nPROVENA_S3_ENDPOINT={}\nRRAP_OFFLINE_TOKEN={}\n",
            self.auth_url, self.api_url, self.s3_endpoint, self.offline_token
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
        let state = Arc::new(SimState {
            store: Arc::new(FolderStore::new(cfg.root.clone())),
            cfg,
            stats: Stats::default(),
            identity: Mutex::new(Identity::default()),
            creds: Mutex::new(HashMap::new()),
            base_url: Mutex::new(base.clone()),
        });
        let env = SimEnv {
            auth_url: state.realm_url(),
            api_url: base.clone(),
            s3_endpoint: base,
            offline_token: state.new_offline_token(),
        };
        let s3 = {
            let mut b = S3ServiceBuilder::new(s3::SimS3(state.clone()));
            b.set_auth(s3::SimAuth(state.clone()));
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

type Body = s3s::Body;

fn respond(r: Reply) -> Response<Body> {
    let body = serde_json::to_vec(&r.body).unwrap_or_default();
    Response::builder()
        .status(r.status)
        .header("content-type", "application/json")
        .body(Body::from(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn parse_form(b: &[u8]) -> HashMap<String, String> {
    serde_urlencoded::from_bytes(b).unwrap_or_default()
}

async fn route(
    state: Arc<SimState>,
    s3: s3s::service::S3Service,
    req: Request<Incoming>,
) -> Result<Response<Body>, s3s::HttpError> {
    let path = req.uri().path().to_string();
    let is_api = path.starts_with(REALM_PATH)
        || path.starts_with("/registry/")
        || path.starts_with("/_sim/");
    if !is_api {
        return s3.call(req.map(Body::from)).await;
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
    let reply = match (method.as_str(), path.as_str()) {
        ("POST", p) if p == realm_token => {
            let r = state.token(&parse_form(&body));
            if r.status == 200 {
                state.stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        ("POST", p) if p == realm_device => state.device_authorization(&parse_form(&body)),
        ("GET", "/_sim/stats") => Reply::json(200, state.stats.json()),
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
        (_, p) if p.starts_with("/registry/") => {
            if !bearer
                .as_deref()
                .is_some_and(|t| state.access_token_valid(t))
            {
                Reply::json(401, json!({"detail": "Could not validate credentials"}))
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
