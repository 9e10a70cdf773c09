//! A signed-in connection to one deployment: token source, data store
//! client and S3 store factory, shared by `mount`, `datasets` and `ls`.

use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiConfig, DataStoreClient};
use crate::auth::{AuthConfig, AuthError, TokenSource};
use crate::s3::aws::{AwsFactory, S3Config};
use crate::secret::Secret;

pub struct Session {
    pub api: Arc<DataStoreClient>,
    pub stores: Arc<AwsFactory>,
}

/// The HTTP client for the identity service and the data store API.
pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .user_agent(concat!("provenafs/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        // A JSON answer that takes longer has stalled; retries take over.
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl Session {
    /// Exchanges the offline token once, so a bad token or an unreachable
    /// service fails here with one clear message.
    pub async fn connect(
        token: Secret,
        auth: AuthConfig,
        api: ApiConfig,
        s3: S3Config,
    ) -> Result<Session, AuthErrorOr> {
        let http = http_client().map_err(AuthErrorOr::Other)?;
        let tokens = Arc::new(TokenSource::new(http.clone(), auth, token));
        tokens.access_token().await.map_err(AuthErrorOr::Auth)?;
        let api = Arc::new(DataStoreClient::new(http, api, tokens));
        let stores = Arc::new(AwsFactory::new(s3, api.clone()));
        Ok(Session { api, stores })
    }
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthErrorOr {
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Other(String),
}
