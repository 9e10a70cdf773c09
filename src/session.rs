//! A signed-in connection to one deployment: token source, data store
//! client and S3 store factory, shared by `mount`, `datasets` and `ls`.

use std::sync::Arc;

use crate::api::{ApiConfig, DataStoreClient};
use crate::auth::{AuthConfig, AuthError, TokenSource};
use crate::retry::Deadline;
use crate::s3::aws::{AwsFactory, S3Config};
use crate::secret::Secret;

pub struct Session {
    pub api: Arc<DataStoreClient>,
    pub stores: Arc<AwsFactory>,
}

/// Shares this user's access token and read credentials with the user's
/// other processes through the shared cache folder `cache_dir` (see
/// [`crate::shared_lease`]): sets `auth.shared` and `s3.shared`. Nothing is
/// shared when the folder is not private to this user.
pub fn share_leases(
    cache_dir: &std::path::Path,
    token: &Secret,
    auth: &mut AuthConfig,
    api: &ApiConfig,
    s3: &mut S3Config,
) {
    let stall = crate::retry::stall_timeout(api.request_timeout);
    if let Some(leases) = crate::shared_lease::SharedLeases::open(cache_dir, stall) {
        // One name per user and deployment: a hash of the token and URLs.
        let who = crate::shared_lease::lease_name(
            "user",
            &[&auth.realm_url, &api.base_url, token.expose()],
        );
        auth.shared = Some(leases.clone());
        s3.shared = Some((leases, who));
    }
}

impl Session {
    /// A deadline for one call made on behalf of a command (`datasets`, `ls`).
    pub fn deadline(&self) -> Deadline {
        Deadline::after(self.api.request_timeout())
    }

    /// Exchanges the offline token once, so a bad token or an unreachable
    /// service fails here with one clear message.
    pub async fn connect(
        token: Secret,
        auth: AuthConfig,
        api: ApiConfig,
        s3: S3Config,
    ) -> Result<Session, AuthErrorOr> {
        let http = crate::http::client().map_err(AuthErrorOr::Other)?;
        let deadline = Deadline::after(auth.request_timeout);
        let tokens = Arc::new(TokenSource::new(http.clone(), auth, token));
        let access = tokens
            .access_token(deadline)
            .await
            .map_err(AuthErrorOr::Auth)?;
        // An access token without `realm_access` comes from an offline
        // token created without the `roles` scope; Keycloak 16 does not add
        // it on refresh, and the data store refuses every call with it.
        if crate::auth::token_claims(access.expose())
            .is_some_and(|c| !c.contains_key("realm_access"))
        {
            return Err(AuthErrorOr::Auth(AuthError::NoRoles));
        }
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
