//! Offline token → access token, refreshed ahead of expiry.
//!
//! The offline token ("API key") is long-lived; access tokens live about five
//! minutes. [`TokenSource`] keeps one access token and renews it in the
//! background when a third of its life remains, one exchange at a time
//! however many callers ask ([`crate::lease`]), so Keycloak is never
//! stampeded and a slow exchange delays nobody while the token in hand lasts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::lease::{Lease, Renewer, Wait};
use crate::retry::Deadline;
use crate::secret::Secret;
use crate::wire::{OAuthError, TokenResponse, CLIENT_ID};

/// Where the Keycloak realm lives, and how long an exchange may take.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Realm URL, e.g. `https://auth.mds.gbrrestoration.org/auth/realms/rrap`.
    pub realm_url: String,
    /// Bound of one exchange, retries included (`--request-timeout`).
    pub request_timeout: Duration,
    /// Access tokens shared with this user's other processes through a
    /// shared cache folder (`--cache-shared`), see [`crate::shared_lease`].
    pub shared: Option<crate::shared_lease::SharedLeases>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            realm_url: "https://auth.mds.gbrrestoration.org/auth/realms/rrap".into(),
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
            shared: None,
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

    /// Keycloak's logout endpoint: given an offline token (`refresh_token`
    /// form field) it ends that token's offline session, so the token no
    /// longer exchanges. Chosen over the RFC 7009 `/revoke` endpoint, which
    /// in Keycloak before 26 revokes every offline token the user holds for
    /// the client (all machines), not only this one.
    pub fn logout_url(&self) -> String {
        format!(
            "{}/protocol/openid-connect/logout",
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

#[derive(Clone, Debug, Error)]
pub enum AuthError {
    #[error("the offline token was rejected by the identity service ({0}); create a new one with `provenafs login`")]
    Rejected(String),
    /// The token carries no roles (it was created without the `roles`
    /// scope), and the data store refuses every call made with it (source:
    /// `../shared/docs/provena-api.md`, "Token had incorrect structure").
    #[error("the offline token was created without the `roles` scope, and the data store refuses such tokens; run `provenafs login` for a new one (it asks for `offline_access roles`)")]
    NoRoles,
    #[error("the identity service at {url} answered HTTP {status} (check --auth-url)")]
    Http { status: u16, url: String },
    #[error("cannot reach the identity service at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the identity service sent an answer we cannot read: {0}")]
    Malformed(String),
    /// One attempt got no answer within the stall timeout; worth another.
    #[error("the identity service at {0} stopped answering")]
    Stalled(String),
    #[error("the identity service at {0} did not answer within --request-timeout")]
    TimedOut(String),
}

impl AuthError {
    /// Worth retrying: the service may answer next time.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Http { status, .. } => *status >= 500 || *status == 429,
            AuthError::Unreachable { .. } | AuthError::Stalled(_) => true,
            AuthError::Rejected(_)
            | AuthError::NoRoles
            | AuthError::Malformed(_)
            | AuthError::TimedOut(_) => false,
        }
    }
}

/// Checks the shape of an offline token before any network call, so a
/// pasted-wrong token gets a precise message. Keycloak tokens are JWTs.
/// The error is a predicate ("is empty") for the caller to put after the
/// token's name and origin.
pub fn check_token_shape(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("is empty".into());
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("contains spaces, quotes or non-ASCII characters".into());
    }
    let parts: Vec<&str> = token.split('.').collect();
    let b64url = |p: &&str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    if parts.len() != 3 || !parts.iter().all(b64url) {
        return Err("is malformed (expected a JWT: three base64url parts joined by dots)".into());
    }
    Ok(())
}

/// The claims of a JWT's payload, not verified: for showing who a token
/// belongs to, and for refusing early what the service would refuse anyway
/// (a token without roles); never for granting anything.
pub fn token_claims(jwt: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Base64url without padding (padding tolerated), as JWTs use.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.trim_end_matches('=').bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// What became of an offline token sent to the logout endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Its session is ended: it no longer exchanges.
    Revoked,
    /// The service did not accept it at all (already revoked, expired, or
    /// never valid there): nothing left to revoke.
    AlreadyInvalid(String),
}

/// Ends the offline session of `offline` at the identity service
/// ([`AuthConfig::logout_url`]). Errors say why it could not be done.
pub async fn revoke_offline(
    http: &reqwest::Client,
    config: &AuthConfig,
    offline: &Secret,
) -> Result<Revocation, String> {
    let url = config.logout_url();
    let resp = http
        .post(&url)
        .form(&[
            ("client_id", CLIENT_ID),
            ("refresh_token", offline.expose()),
        ])
        .timeout(config.request_timeout)
        .send()
        .instrument(info_span!("revoke_offline_token", url = %url))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the identity service at {url}: {}",
                crate::http::describe_reqwest(&e)
            )
        })?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    if (200..300).contains(&status) {
        return Ok(Revocation::Revoked);
    }
    match serde_json::from_slice::<OAuthError>(&body) {
        Ok(e) if status == 400 && e.error == "invalid_grant" => Ok(Revocation::AlreadyInvalid(
            e.error_description.unwrap_or(e.error),
        )),
        Ok(e) => Err(format!(
            "the identity service at {url} answered HTTP {status} ({})",
            e.error_description.unwrap_or(e.error)
        )),
        Err(_) => Err(format!(
            "the identity service at {url} answered HTTP {status}"
        )),
    }
}

/// Hands out valid access tokens for one offline token, renewed in the
/// background ahead of expiry (see [`crate::lease`]).
pub struct TokenSource {
    exchange: Arc<Exchange>,
    tokens: Arc<Renewer<Secret, AuthError>>,
    /// When the identity service last rejected the offline token, and why:
    /// for a few seconds every caller gets that answer without a request.
    rejected: std::sync::Mutex<Option<(Instant, String)>>,
}

/// What an exchange needs; shared with the renewal task.
struct Exchange {
    http: reqwest::Client,
    config: AuthConfig,
    offline: Secret,
    /// The rejection has been logged (once per mount).
    rejection_logged: AtomicBool,
    /// The offline token has worked at least once.
    ever_valid: AtomicBool,
    /// The last access token a service refused: never taken from the
    /// shared folder again (another process may not have removed it yet).
    rejected: std::sync::Mutex<Option<Secret>>,
}

/// Attempts per token exchange for transient failures.
const EXCHANGE_ATTEMPTS: u32 = 4;
/// How long a rejection is remembered before Keycloak is asked again.
const REJECTION_MEMORY: Duration = Duration::from_secs(5);

impl TokenSource {
    pub fn new(http: reqwest::Client, config: AuthConfig, offline: Secret) -> Self {
        let bound = config.request_timeout;
        let exchange = Arc::new(Exchange {
            http,
            config,
            offline,
            rejection_logged: AtomicBool::new(false),
            ever_valid: AtomicBool::new(false),
            rejected: std::sync::Mutex::new(None),
        });
        let ex = exchange.clone();
        let tokens = Renewer::new(
            "access token",
            bound,
            || AuthError::Malformed("the token exchange was interrupted".into()),
            Box::new(move |deadline| {
                let ex = ex.clone();
                Box::pin(async move { ex.exchange_shared(deadline).await })
            }),
        );
        Self {
            exchange,
            tokens: Arc::new(tokens),
            rejected: std::sync::Mutex::new(None),
        }
    }

    /// A valid access token: the one in hand (renewed in the background
    /// when due), else a new one, waited for until `deadline`.
    pub async fn access_token(&self, deadline: Deadline) -> Result<Secret, AuthError> {
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
        match self.tokens.get(deadline).await {
            Ok(t) => Ok(t),
            Err(Wait::Failed(AuthError::Rejected(why))) => {
                *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), why.clone()));
                Err(AuthError::Rejected(why))
            }
            Err(Wait::Failed(e)) => Err(e),
            Err(Wait::TimedOut) => Err(AuthError::TimedOut(self.exchange.config.token_url())),
        }
    }

    /// Drops `token` after the service refused it (HTTP 401), so the next
    /// call exchanges again. A token already replaced is left alone, so many
    /// callers failing on the same old token cause one refresh, not many.
    pub fn invalidate(&self, token: &Secret) {
        *self
            .exchange
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        if let Some(shared) = &self.exchange.config.shared {
            // The others would hand the same refused token back; one
            // another process stored since is fresh, and stays.
            let refused = token.expose().to_string();
            shared.forget_if(&self.exchange.lease_name(), move |v| {
                v.as_str() == Some(refused.as_str())
            });
        }
        self.tokens.invalidate(|t| t == token);
    }
}

impl Exchange {
    /// The shared file of this offline token's access tokens (a hash of
    /// the realm and the token: neither shows in the folder).
    fn lease_name(&self) -> String {
        crate::shared_lease::lease_name("token", &[&self.config.realm_url, self.offline.expose()])
    }

    /// An access token: from the shared folder when another process has
    /// a usable one (or is getting it now), else exchanged here and shared.
    async fn exchange_shared(&self, deadline: Deadline) -> Result<Lease<Secret>, AuthError> {
        let Some(shared) = &self.config.shared else {
            return self.exchange_with_retries(deadline).await;
        };
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let refused = |t: &String| rejected.as_ref().is_some_and(|r| r.expose() == t);
        let (token, life) = crate::shared_lease::get_or_fetch(
            shared,
            &self.lease_name(),
            deadline,
            refused,
            || async {
                self.exchange_with_retries(deadline)
                    .await
                    .map(|l| (l.value.expose().to_string(), l.lifetime()))
            },
        )
        .await?;
        Ok(Lease::new(Secret::new(token), life))
    }

    /// One access token, retrying transient failures while `deadline` allows.
    async fn exchange_with_retries(&self, deadline: Deadline) -> Result<Lease<Secret>, AuthError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.exchange(deadline).await {
                Ok(lease) => {
                    self.ever_valid.store(true, Ordering::Relaxed);
                    return Ok(lease);
                }
                Err(e) if e.is_transient() && attempt < EXCHANGE_ATTEMPTS => {
                    let wait = crate::retry::backoff(attempt);
                    if !deadline.allows(wait) {
                        return Err(match e {
                            AuthError::Stalled(url) => AuthError::TimedOut(url),
                            e => e,
                        });
                    }
                    // Before the mount is up, the final error is the message.
                    if self.ever_valid.load(Ordering::Relaxed) {
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
                    if self.ever_valid.load(Ordering::Relaxed)
                        && !self.rejection_logged.swap(true, Ordering::Relaxed)
                    {
                        error!("the offline token was rejected ({why}): reads fail with EACCES until the mount is restarted with a valid token (`provenafs login`)");
                    }
                    return Err(AuthError::Rejected(why));
                }
                Err(AuthError::Stalled(url)) => return Err(AuthError::TimedOut(url)),
                Err(e) => return Err(e),
            }
        }
    }

    async fn exchange(&self, deadline: Deadline) -> Result<Lease<Secret>, AuthError> {
        let url = self.config.token_url();
        let span = info_span!("token_exchange", url = %url);
        async {
            let timeout =
                deadline.attempt(crate::retry::stall_timeout(self.config.request_timeout));
            if timeout.is_zero() {
                return Err(AuthError::TimedOut(url.clone()));
            }
            let form = [
                ("grant_type", "refresh_token"),
                ("client_id", CLIENT_ID),
                ("refresh_token", self.offline.expose()),
                ("scope", "roles"),
            ];
            let unreachable = |e: reqwest::Error| {
                if e.is_timeout() {
                    AuthError::Stalled(url.clone())
                } else {
                    AuthError::Unreachable {
                        url: url.clone(),
                        reason: crate::http::describe_reqwest(&e),
                    }
                }
            };
            let resp = self
                .http
                .post(&url)
                .form(&form)
                .timeout(timeout)
                .send()
                .await
                .map_err(unreachable)?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(unreachable)?;
            if status == 200 {
                let t: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| AuthError::Malformed(e.to_string()))?;
                debug!(expires_in = t.expires_in, "access token obtained");
                return Ok(Lease::new(
                    Secret::new(t.access_token),
                    Duration::from_secs(t.expires_in.max(1)),
                ));
            }
            match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) if status == 400 || status == 401 => {
                    let what = match e.error_description {
                        Some(d) => format!("{}: {}", e.error, d),
                        None => e.error,
                    };
                    Err(AuthError::Rejected(what))
                }
                _ => Err(AuthError::Http {
                    status,
                    url: url.clone(),
                }),
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
    fn claims_are_read_from_the_payload() {
        // {"sub":"u1","preferred_username":"ann"} in base64url, no padding.
        let payload = "eyJzdWIiOiJ1MSIsInByZWZlcnJlZF91c2VybmFtZSI6ImFubiJ9";
        let c = token_claims(&format!("eyJh.{payload}.c2ln")).unwrap();
        assert_eq!(c["preferred_username"], "ann");
        assert_eq!(c["sub"], "u1");
        assert!(token_claims("a.!!.c").is_none());
        assert!(token_claims("abc").is_none());
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("aGk=").unwrap(), b"hi");
    }
}
