//! Offline token → access token, refreshed ahead of expiry.
//!
//! The offline token ("API key") is long-lived; access tokens live about five
//! minutes. [`TokenSource`] keeps one access token, refreshes it when a
//! fraction of its life remains, and makes every concurrent caller wait on a
//! single refresh (single flight) instead of stampeding Keycloak.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::secret::Secret;
use crate::wire::{OAuthError, TokenResponse, CLIENT_ID};

/// Where the Keycloak realm lives.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Realm URL, e.g. `https://auth.mds.gbrrestoration.org/auth/realms/rrap`.
    pub realm_url: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            realm_url: "https://auth.mds.gbrrestoration.org/auth/realms/rrap".into(),
        }
    }
}

impl AuthConfig {
    pub fn token_url(&self) -> String {
        format!(
            "{}/protocol/openid-connect/token",
            self.realm_url.trim_end_matches('/')
        )
    }

    pub fn device_url(&self) -> String {
        format!(
            "{}/protocol/openid-connect/auth/device",
            self.realm_url.trim_end_matches('/')
        )
    }
}

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("the offline token was rejected by the identity service ({0}); create a new one with `provenafs login`")]
    Rejected(String),
    #[error("the identity service answered HTTP {0}")]
    Http(u16),
    #[error("cannot reach the identity service at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the identity service sent an answer we cannot read: {0}")]
    Malformed(String),
}

impl AuthError {
    /// Worth retrying: the service may answer next time.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Http(s) => *s >= 500 || *s == 429,
            AuthError::Unreachable { .. } => true,
            AuthError::Rejected(_) | AuthError::Malformed(_) => false,
        }
    }
}

/// Checks the shape of an offline token before any network call, so a
/// pasted-wrong token gets a precise message. Keycloak tokens are JWTs.
pub fn check_token_shape(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the offline token is empty".into());
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("the offline token contains spaces, quotes or non-ASCII characters".into());
    }
    let parts: Vec<&str> = token.split('.').collect();
    let b64url = |p: &&str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    if parts.len() != 3 || !parts.iter().all(b64url) {
        return Err(
            "the offline token is malformed (expected a JWT: three base64url parts joined by dots)"
                .into(),
        );
    }
    Ok(())
}

struct Access {
    token: Secret,
    obtained: Instant,
    lifetime: Duration,
}

impl Access {
    /// Refresh once three quarters of the life has passed (at most one
    /// minute early), so a token is never used in its last moments.
    fn fresh(&self) -> bool {
        let margin = (self.lifetime / 4).min(Duration::from_secs(60));
        self.obtained.elapsed() + margin < self.lifetime
    }
}

/// Hands out valid access tokens for one offline token.
pub struct TokenSource {
    http: reqwest::Client,
    config: AuthConfig,
    offline: Secret,
    current: Mutex<Option<Access>>,
    /// When the identity service last rejected the offline token, and why:
    /// for a few seconds every caller gets that answer without a request.
    rejected: std::sync::Mutex<Option<(Instant, String)>>,
    /// The rejection has been logged (once per mount).
    rejection_logged: std::sync::atomic::AtomicBool,
    /// The offline token has worked at least once.
    ever_valid: std::sync::atomic::AtomicBool,
}

/// Attempts per token exchange for transient failures.
const EXCHANGE_ATTEMPTS: u32 = 4;
/// How long a rejection is remembered before Keycloak is asked again.
const REJECTION_MEMORY: Duration = Duration::from_secs(5);

impl TokenSource {
    pub fn new(http: reqwest::Client, config: AuthConfig, offline: Secret) -> Self {
        Self {
            http,
            config,
            offline,
            current: Mutex::new(None),
            rejected: std::sync::Mutex::new(None),
            rejection_logged: std::sync::atomic::AtomicBool::new(false),
            ever_valid: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A valid access token, refreshed first if it is near expiry.
    pub async fn access_token(&self) -> Result<Secret, AuthError> {
        let mut current = self.current.lock().await;
        if let Some(a) = current.as_ref().filter(|a| a.fresh()) {
            return Ok(a.token.clone());
        }
        if let Some((at, why)) = self
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if at.elapsed() < REJECTION_MEMORY {
                return Err(AuthError::Rejected(why.clone()));
            }
        }
        let mut attempt = 0;
        let a = loop {
            attempt += 1;
            match self.exchange().await {
                Ok(a) => break a,
                Err(e) if e.is_transient() && attempt < EXCHANGE_ATTEMPTS => {
                    let wait = crate::retry::backoff(attempt);
                    // Before the mount is up, the final error is the message.
                    if self.ever_valid.load(std::sync::atomic::Ordering::Relaxed) {
                        warn!(attempt, error = %e, "token exchange failed, retrying in {wait:?}");
                    } else {
                        debug!(attempt, error = %e, "token exchange failed, retrying in {wait:?}");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(AuthError::Rejected(why)) => {
                    // Logged once, and only when a working token stopped
                    // working: a bad token at mount time is the caller's
                    // one-line error.
                    let was_valid = self.ever_valid.load(std::sync::atomic::Ordering::Relaxed);
                    if was_valid
                        && !self
                            .rejection_logged
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        error!("the offline token was rejected ({why}): reads fail with EACCES until the mount is restarted with a valid token (`provenafs login`)");
                    }
                    *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), why.clone()));
                    return Err(AuthError::Rejected(why));
                }
                Err(e) => return Err(e),
            }
        };
        self.ever_valid
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let token = a.token.clone();
        *current = Some(a);
        Ok(token)
    }

    /// Drops `token` after the service refused it (HTTP 401), so the next
    /// call exchanges again. A token already replaced is left alone, so many
    /// callers failing on the same old token cause one refresh, not many.
    pub async fn invalidate(&self, token: &Secret) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|a| &a.token == token) {
            *current = None;
        }
    }

    async fn exchange(&self) -> Result<Access, AuthError> {
        let url = self.config.token_url();
        let span = info_span!("token_exchange", url = %url);
        async {
            let form = [
                ("grant_type", "refresh_token"),
                ("client_id", CLIENT_ID),
                ("refresh_token", self.offline.expose()),
                ("scope", "roles"),
            ];
            let started = Instant::now();
            let resp = self.http.post(&url).form(&form).send().await.map_err(|e| {
                AuthError::Unreachable {
                    url: url.clone(),
                    reason: crate::api::describe_reqwest(&e),
                }
            })?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(|e| AuthError::Unreachable {
                url: url.clone(),
                reason: crate::api::describe_reqwest(&e),
            })?;
            if status == 200 {
                let t: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| AuthError::Malformed(e.to_string()))?;
                debug!(expires_in = t.expires_in, "access token obtained");
                return Ok(Access {
                    token: Secret::new(t.access_token),
                    obtained: started,
                    lifetime: Duration::from_secs(t.expires_in.max(1)),
                });
            }
            match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) if status == 400 || status == 401 => {
                    let what = match e.error_description {
                        Some(d) => format!("{}: {}", e.error, d),
                        None => e.error,
                    };
                    Err(AuthError::Rejected(what))
                }
                _ => Err(AuthError::Http(status)),
            }
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        assert!(check_token_shape("eyJh.eyJz.c2ln").is_ok());
        assert!(check_token_shape("").is_err());
        assert!(check_token_shape("abc").is_err());
        assert!(check_token_shape("a.b").is_err());
        assert!(check_token_shape("\"a.b.c\"").is_err());
        assert!(check_token_shape("a.b.c d").is_err());
        assert!(check_token_shape("a..c").is_err());
    }

    #[test]
    fn freshness_margin_scales_with_lifetime() {
        let a = Access {
            token: Secret::new("t"),
            obtained: Instant::now() - Duration::from_secs(3),
            lifetime: Duration::from_secs(4),
        };
        assert!(!a.fresh());
        let b = Access {
            token: Secret::new("t"),
            obtained: Instant::now() - Duration::from_secs(200),
            lifetime: Duration::from_secs(300),
        };
        assert!(b.fresh());
    }
}
