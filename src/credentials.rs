//! Per-dataset S3 read credentials, refreshed ahead of expiry.
//!
//! The data store hands out STS session credentials per dataset that expire
//! after about an hour. [`DatasetCredentials`] keeps the current set, asks
//! for a new one when a quarter of its life (at most five minutes) remains,
//! lets one caller refresh while the others wait (single flight), and is
//! given to aws-sdk-s3 as its credentials provider.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{self, error::CredentialsError, ProvideCredentials};
use aws_credential_types::Credentials;
use tokio::sync::Mutex;
use tracing::debug;

use crate::api::{ApiError, DataStoreClient};
use crate::secret::Secret;
use crate::wire::parse_expiry;

#[derive(Clone)]
struct Issued {
    key_id: String,
    secret: Secret,
    session: Secret,
    obtained: SystemTime,
    expiry: SystemTime,
}

impl Issued {
    fn fresh(&self) -> bool {
        let life = self
            .expiry
            .duration_since(self.obtained)
            .unwrap_or(Duration::ZERO);
        let margin = (life / 4).min(Duration::from_secs(300));
        SystemTime::now() + margin < self.expiry
    }
}

pub struct DatasetCredentials {
    handle: String,
    api: Arc<DataStoreClient>,
    current: Mutex<Option<Issued>>,
}

impl std::fmt::Debug for DatasetCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetCredentials")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl DatasetCredentials {
    pub fn new(handle: &str, api: Arc<DataStoreClient>) -> Self {
        Self {
            handle: handle.to_string(),
            api,
            current: Mutex::new(None),
        }
    }

    /// Valid credentials, refreshed first when near expiry.
    pub async fn get(&self) -> Result<Credentials, ApiError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref().filter(|c| c.fresh()) {
            return Ok(to_sdk(c));
        }
        let raw = self.api.read_credentials(&self.handle).await?;
        let obtained = SystemTime::now();
        let expiry = parse_expiry(&raw.expiry).ok_or_else(|| {
            ApiError::Malformed(format!(
                "credential expiry {:?} is not ISO 8601",
                raw.expiry
            ))
        })?;
        debug!(handle = %self.handle, lifetime = ?expiry.duration_since(obtained).ok(), "read credentials issued");
        let issued = Issued {
            key_id: raw.aws_access_key_id,
            secret: Secret::new(raw.aws_secret_access_key),
            session: Secret::new(raw.aws_session_token),
            obtained,
            expiry,
        };
        let sdk = to_sdk(&issued);
        *current = Some(issued);
        Ok(sdk)
    }

    /// Forget the current set after S3 called it expired, unless another
    /// caller already replaced it.
    pub async fn invalidate(&self, access_key_id: &str) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| c.key_id == access_key_id) {
            *current = None;
        }
    }
}

fn to_sdk(c: &Issued) -> Credentials {
    Credentials::new(
        &c.key_id,
        c.secret.expose(),
        Some(c.session.expose().to_string()),
        Some(c.expiry),
        "provena",
    )
}

/// Adapter that lets aws-sdk-s3 pull credentials from [`DatasetCredentials`].
#[derive(Debug, Clone)]
pub struct SdkProvider(pub Arc<DatasetCredentials>);

impl ProvideCredentials for SdkProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.0.get().await.map_err(CredentialsError::provider_error)
        })
    }
}
