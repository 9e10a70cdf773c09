//! Keycloak's realm endpoints as the client sees them: the token endpoint
//! (offline-token refresh and the device-code grant) and device
//! authorisation, with the real error answers and `expires_in`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::json;

use super::{Reply, SimState};
use crate::wire::{CLIENT_ID, DEVICE_GRANT};

/// A JWT-shaped random token (`header.payload.signature`, base64url).
pub fn jwt_like(kind: &str) -> String {
    let mut rng = rand::thread_rng();
    let mut part = |n: usize| -> String {
        (0..n)
            .map(|_| {
                let c = rng.gen_range(0..64u8);
                (match c {
                    0..=25 => b'A' + c,
                    26..=51 => b'a' + c - 26,
                    52..=61 => b'0' + c - 52,
                    62 => b'-',
                    _ => b'_',
                }) as char
            })
            .collect()
    };
    let header = match kind {
        "offline" => "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9".to_string(),
        _ => "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9".to_string(),
    };
    format!("{header}.{}.{}", part(120), part(86))
}

/// Base64url without padding, as JWT parts are written.
fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Who the emulator's one user is, as Keycloak's access tokens say.
pub const SIM_USERNAME: &str = "sim-user";
pub const SIM_EMAIL: &str = "sim-user@example.org";
pub const SIM_NAME: &str = "Sim User";
pub const SIM_SUBJECT: &str = "5b1e6c1e-0000-4000-8000-00000000c0de";

pub struct Device {
    pub user_code: String,
    /// The `scope` asked for at device authorisation: the offline token
    /// made on approval carries exactly these.
    pub scope: String,
    pub expires: Instant,
    pub approved: bool,
    pub denied: bool,
    pub last_poll: Option<Instant>,
    pub interval: Duration,
}

/// An offline token: whether it is revoked, and the scopes it was made with.
pub struct Offline {
    pub revoked: bool,
    pub scope: String,
}

/// An access token: when it expires, and whether it carries the user's
/// roles (`realm_access`), which the data store API insists on.
pub struct Access {
    pub expires: Instant,
    pub roles: bool,
}

/// What the data store API makes of a bearer token.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer {
    /// Known, unexpired, with roles.
    Valid,
    /// Known and unexpired, but made without the `roles` scope.
    NoRoles,
    /// Unknown or expired.
    Invalid,
}

#[derive(Default)]
pub struct Identity {
    pub offline: HashMap<String, Offline>,
    pub access: HashMap<String, Access>,
    pub devices: HashMap<String, Device>,
}

/// Whether a space-separated scope list names `roles`.
fn has_roles(scope: &str) -> bool {
    scope.split_whitespace().any(|s| s == "roles")
}

fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": error, "error_description": description}),
    )
}

impl SimState {
    /// An access token shaped as Keycloak's: a JWT whose payload holds the
    /// user's claims (what `provenafs whoami` shows); the signature is random.
    /// Without the `roles` scope there is no `realm_access` claim, as
    /// Keycloak leaves it out.
    fn access_jwt(&self, ttl: u64, scope: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = json!({
            "exp": now + ttl as i64,
            "iat": now,
            "jti": uuid_like(),
            "iss": self.realm_url(),
            "aud": "account",
            "sub": SIM_SUBJECT,
            "typ": "Bearer",
            "azp": CLIENT_ID,
            "session_state": uuid_like(),
            "scope": scope,
            "email_verified": true,
            "name": SIM_NAME,
            "preferred_username": SIM_USERNAME,
            "email": SIM_EMAIL,
        });
        if has_roles(scope) {
            claims["realm_access"] = json!({"roles": ["offline_access", "uma_authorization"]});
        }
        let random = jwt_like("access");
        let signature = random.rsplit('.').next().unwrap_or_default();
        format!(
            "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.{signature}",
            base64url(claims.to_string().as_bytes())
        )
    }

    /// A fresh access token for a valid offline token, with the scopes
    /// that token was made with: Keycloak 16 ignores the `scope` a
    /// refresh asks for.
    fn issue_tokens(&self, offline: &str, scope: &str) -> Reply {
        let token = self.access_jwt(self.cfg.access_token_ttl, scope);
        self.remember_secret(&token);
        let ttl = self.cfg.access_token_ttl;
        let mut id = self.identity();
        let now = Instant::now();
        id.access.retain(|_, a| a.expires > now);
        id.access.insert(
            token.clone(),
            Access {
                expires: now + Duration::from_secs(ttl),
                roles: has_roles(scope),
            },
        );
        Reply::json(
            200,
            json!({
                "access_token": token,
                "expires_in": ttl,
                "refresh_expires_in": 0,
                "refresh_token": offline,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "session_state": uuid_like(),
                "scope": scope,
            }),
        )
    }

    /// A new offline token made with `scope` (space-separated).
    pub fn new_offline_token(&self, scope: &str) -> String {
        let t = jwt_like("offline");
        self.remember_secret(&t);
        self.identity().offline.insert(
            t.clone(),
            Offline {
                revoked: false,
                scope: scope.to_string(),
            },
        );
        t
    }

    /// What the data store API makes of `token`.
    pub fn bearer(&self, token: &str) -> Bearer {
        match self.identity().access.get(token) {
            Some(a) if a.expires > Instant::now() => {
                if a.roles {
                    Bearer::Valid
                } else {
                    Bearer::NoRoles
                }
            }
            _ => Bearer::Invalid,
        }
    }

    pub fn token(&self, form: &HashMap<String, String>) -> Reply {
        if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
            return oauth_error(
                401,
                "unauthorized_client",
                "Invalid client or Invalid client credentials",
            );
        }
        match form.get("grant_type").map(String::as_str) {
            Some("refresh_token") => {
                let Some(rt) = form.get("refresh_token") else {
                    return oauth_error(400, "invalid_request", "Missing parameter: refresh_token");
                };
                let scope = match self.identity().offline.get(rt) {
                    Some(o) if !o.revoked => o.scope.clone(),
                    _ => return oauth_error(400, "invalid_grant", "Invalid refresh token"),
                };
                self.issue_tokens(rt, &scope)
            }
            Some(DEVICE_GRANT) => {
                let Some(code) = form.get("device_code") else {
                    return oauth_error(400, "invalid_request", "Missing parameter: device_code");
                };
                let now = Instant::now();
                let mut id = self.identity();
                let Some(dev) = id.devices.get_mut(code) else {
                    return oauth_error(400, "invalid_grant", "Device code not valid");
                };
                if dev.expires <= now {
                    return oauth_error(400, "expired_token", "Device code is expired");
                }
                if dev.denied {
                    return oauth_error(
                        400,
                        "access_denied",
                        "The end user denied the authorization request",
                    );
                }
                let too_fast = dev
                    .last_poll
                    .is_some_and(|t| now.duration_since(t) < dev.interval);
                dev.last_poll = Some(now);
                if too_fast {
                    self.stats
                        .device_slow_downs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return oauth_error(400, "slow_down", "Slow down");
                }
                if !dev.approved {
                    return oauth_error(
                        400,
                        "authorization_pending",
                        "The authorization request is still pending",
                    );
                }
                let scope = id.devices.remove(code).map(|d| d.scope).unwrap_or_default();
                drop(id);
                let offline = self.new_offline_token(&scope);
                self.issue_tokens(&offline, &scope)
            }
            Some(_) => oauth_error(400, "unsupported_grant_type", "Unsupported grant_type"),
            None => oauth_error(400, "invalid_request", "Missing form parameter: grant_type"),
        }
    }

    /// Keycloak's logout endpoint given an offline token (`client_id`,
    /// `refresh_token`): ends that token's offline session, so it no longer
    /// exchanges (`invalid_grant`). 204 also for a token already revoked,
    /// as Keycloak answers when the session is gone; a token it never
    /// issued fails verification: 400 `invalid_grant`.
    pub fn logout(&self, form: &HashMap<String, String>) -> Reply {
        if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
            return oauth_error(
                401,
                "unauthorized_client",
                "Invalid client or Invalid client credentials",
            );
        }
        let Some(rt) = form.get("refresh_token") else {
            return oauth_error(400, "invalid_request", "No refresh token");
        };
        match self.identity().offline.get_mut(rt) {
            Some(o) => {
                o.revoked = true;
                Reply::html(204, String::new())
            }
            None => oauth_error(400, "invalid_grant", "Invalid refresh token"),
        }
    }

    pub fn device_authorization(&self, form: &HashMap<String, String>) -> Reply {
        if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
            return oauth_error(
                401,
                "unauthorized_client",
                "Invalid client or Invalid client credentials",
            );
        }
        let device_code: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(43)
            .map(char::from)
            .collect();
        self.remember_secret(&device_code);
        let letters: String = (0..8)
            .map(|_| (b'A' + rand::thread_rng().gen_range(0..26u8)) as char)
            .collect();
        let user_code = format!("{}-{}", &letters[..4], &letters[4..]);
        let interval = self.cfg.device_interval;
        let expires_in = self.cfg.device_expires_in;
        self.identity().devices.insert(
            device_code.clone(),
            Device {
                user_code: user_code.clone(),
                // Keycloak keeps the scopes asked for here; those sent
                // with the polls do not count.
                scope: form.get("scope").cloned().unwrap_or_default(),
                expires: Instant::now() + Duration::from_secs(expires_in),
                approved: self.cfg.auto_approve,
                denied: false,
                // RFC 8628: the first poll, too, waits one interval.
                last_poll: Some(Instant::now()),
                interval: Duration::from_secs(interval.max(self.cfg.device_min_interval)),
            },
        );
        let uri = format!("{}/device", self.realm_url());
        Reply::json(
            200,
            json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": uri,
                "verification_uri_complete": format!("{uri}?user_code={user_code}"),
                "expires_in": expires_in,
                "interval": interval,
            }),
        )
    }

    /// Approves (or denies) a pending device login, as the user would in a browser.
    pub fn decide_device(&self, user_code: &str, approve: bool) -> bool {
        let mut id = self.identity();
        match id.devices.values_mut().find(|d| d.user_code == user_code) {
            Some(d) => {
                d.approved = approve;
                d.denied = !approve;
                true
            }
            None => false,
        }
    }

    /// Revokes every offline token: the token endpoint answers `invalid_grant`.
    pub fn revoke_all(&self) {
        for o in self.identity().offline.values_mut() {
            o.revoked = true;
        }
    }
}

fn uuid_like() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A minimal consent page: approve or deny a pending device login.
pub fn device_page(user_code: &str) -> Reply {
    let code: String = user_code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let html = format!(
        "<!doctype html><title>provenafs emulator: sign in</title>\
         <h1>Sign in to the Provena emulator</h1>\
         <p>Device code <b>{code}</b></p>\
         <form method=post action=\"/_sim/device?user_code={code}&action=approve\"><button>Approve</button></form>\
         <form method=post action=\"/_sim/device?user_code={code}&action=deny\"><button>Deny</button></form>"
    );
    Reply::html(200, html)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64url_matches_the_standard_alphabet() {
        assert_eq!(super::base64url(b"hi"), "aGk");
        assert_eq!(super::base64url(b"hi!"), "aGkh");
        assert_eq!(super::base64url(b"\xfb\xff"), "-_8");
        assert_eq!(super::base64url(b""), "");
    }
}
