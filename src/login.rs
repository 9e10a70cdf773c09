//! `provenafs login`: the OAuth2 device authorisation grant (RFC 8628)
//! against the Keycloak realm, ending in an offline token.
//!
//! Everything the user reads goes to standard error, so `--print` can put
//! the token alone on standard output for a pipe or a secret store.

use std::io::Write;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info_span, Instrument};

use crate::auth::AuthConfig;
use crate::secret::Secret;
use crate::wire::{DeviceAuthResponse, OAuthError, TokenResponse, CLIENT_ID, DEVICE_GRANT};

/// Scope that makes Keycloak issue an offline (long-lived) refresh token.
const SCOPE: &str = "offline_access roles";

#[derive(Debug, Error)]
pub enum LoginError {
    #[error("the login request expired before it was approved; run `provenafs login` again")]
    Expired,
    #[error("the login was denied in the browser")]
    Denied,
    #[error("the identity service refused the login: {0}")]
    Refused(String),
    #[error("cannot reach the identity service at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the identity service sent an answer we cannot read: {0}")]
    Malformed(String),
    #[error("the identity service issued no offline token (is `offline_access` allowed for client {CLIENT_ID}?)")]
    NoOfflineToken,
}

/// How the waiting is shown.
pub struct Ui {
    /// Try to open the verification page in a browser.
    pub open_browser: bool,
    /// Draw a QR code of the verification URL.
    pub qr: bool,
}

/// Runs the device flow to the end and returns the offline token.
pub async fn device_login(
    http: &reqwest::Client,
    auth: &AuthConfig,
    ui: &Ui,
) -> Result<Secret, LoginError> {
    let start = authorize(http, auth)
        .instrument(info_span!("device_authorization"))
        .await?;
    let url = start
        .verification_uri_complete
        .clone()
        .unwrap_or_else(|| start.verification_uri.clone());
    show_instructions(&start, &url, ui);
    poll(http, auth, &start).await
}

async fn authorize(
    http: &reqwest::Client,
    auth: &AuthConfig,
) -> Result<DeviceAuthResponse, LoginError> {
    let url = auth.device_url();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = http
            .post(&url)
            .form(&[("client_id", CLIENT_ID), ("scope", SCOPE)])
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if attempt < 4 => {
                debug!(attempt, error = %crate::http::describe_reqwest(&e), "device authorization failed, retrying");
                tokio::time::sleep(crate::retry::backoff(attempt)).await;
                continue;
            }
            Err(e) => {
                return Err(LoginError::Unreachable {
                    url,
                    reason: crate::http::describe_reqwest(&e),
                })
            }
        };
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        if status >= 500 && attempt < 4 {
            tokio::time::sleep(crate::retry::backoff(attempt)).await;
            continue;
        }
        if status != 200 {
            return Err(oauth_refusal(status, &body));
        }
        return serde_json::from_slice(&body).map_err(|e| LoginError::Malformed(e.to_string()));
    }
}

fn oauth_refusal(status: u16, body: &[u8]) -> LoginError {
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) => LoginError::Refused(match e.error_description {
            Some(d) => format!("{}: {d}", e.error),
            None => e.error,
        }),
        Err(_) => LoginError::Refused(format!("HTTP {status}")),
    }
}

fn show_instructions(start: &DeviceAuthResponse, url: &str, ui: &Ui) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "To sign in, open this page and check that it shows the code {}:\n\n    {url}\n",
        start.user_code
    );
    if ui.qr {
        if let Some(qr) = qr_text(url) {
            let _ = writeln!(err, "Or scan it with a phone:\n\n{qr}");
        }
    }
    if ui.open_browser && open_browser(url) {
        let _ = writeln!(err, "(A browser window was opened for you.)");
    }
    let _ = err.flush();
}

/// The URL as a QR code drawn with Unicode half blocks, two rows per line.
pub fn qr_text(url: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(url.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// Opens `url` with `$BROWSER`, or `xdg-open` when there is a display.
/// On a headless machine (an HPC login node over ssh) nothing is started.
fn open_browser(url: &str) -> bool {
    // `$BROWSER` may be a list (`firefox:chromium`) and may carry arguments.
    let candidates: Vec<String> = match std::env::var("BROWSER") {
        Ok(b) if !b.trim().is_empty() => b.split(':').map(str::to_string).collect(),
        _ if std::env::var_os("DISPLAY").is_some()
            || std::env::var_os("WAYLAND_DISPLAY").is_some() =>
        {
            vec!["xdg-open".to_string()]
        }
        _ => return false,
    };
    for c in candidates {
        let mut words = c.split_whitespace();
        let Some(program) = words.next() else {
            continue;
        };
        let child = std::process::Command::new(program)
            .args(words)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(mut c) => {
                // Reap it whenever it ends; never wait for a browser.
                std::thread::spawn(move || c.wait());
                return true;
            }
            Err(e) => debug!(program, error = %e, "cannot start a browser"),
        }
    }
    false
}

/// The waiting line: an indicatif spinner with the time left on a
/// terminal, one plain line elsewhere.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new() -> Self {
        let bar = crate::browse::progress();
        if bar.is_hidden() {
            eprintln!("Waiting for approval...");
        }
        Self { bar }
    }

    fn tick(&mut self, left: Duration) {
        let secs = left.as_secs();
        self.bar.set_message(format!(
            "Waiting for approval in the browser ({}:{:02} left)",
            secs / 60,
            secs % 60
        ));
    }

    fn done(&self, msg: &str) {
        self.bar.finish_and_clear();
        if !msg.is_empty() {
            eprintln!("{msg}");
        }
    }
}

async fn poll(
    http: &reqwest::Client,
    auth: &AuthConfig,
    start: &DeviceAuthResponse,
) -> Result<Secret, LoginError> {
    let deadline = Instant::now() + Duration::from_secs(start.expires_in.max(1));
    let mut interval = Duration::from_secs(start.interval.max(1));
    let mut progress = Progress::new();
    let url = auth.token_url();
    let mut failures = 0u32;
    loop {
        // Wait one interval, animating the line meanwhile.
        let until = Instant::now() + interval;
        while Instant::now() < until {
            progress.tick(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
        if Instant::now() >= deadline {
            progress.done("The login request expired.");
            return Err(LoginError::Expired);
        }
        let sent = http
            .post(&url)
            .form(&[
                ("grant_type", DEVICE_GRANT),
                ("device_code", start.device_code.as_str()),
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
            ])
            .send()
            .instrument(info_span!("device_token_poll"))
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // A flaky network while the user is busy in the browser:
                // keep polling until the code expires.
                failures += 1;
                debug!(failures, error = %crate::http::describe_reqwest(&e), "poll failed");
                if failures >= 20 {
                    progress.done("");
                    return Err(LoginError::Unreachable {
                        url,
                        reason: crate::http::describe_reqwest(&e),
                    });
                }
                continue;
            }
        };
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        if status == 200 {
            let t: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| LoginError::Malformed(e.to_string()))?;
            progress.done("Signed in.");
            return t
                .refresh_token
                .filter(|r| !r.is_empty())
                .map(Secret::new)
                .ok_or(LoginError::NoOfflineToken);
        }
        if status >= 500 {
            failures += 1;
            continue;
        }
        let e: OAuthError = match serde_json::from_slice(&body) {
            Ok(e) => e,
            Err(_) => {
                progress.done("");
                return Err(LoginError::Refused(format!("HTTP {status}")));
            }
        };
        match e.error.as_str() {
            "authorization_pending" => {}
            // RFC 8628 §3.5: every slow_down adds 5 seconds, for good.
            "slow_down" => interval += Duration::from_secs(5),
            "expired_token" => {
                progress.done("The login request expired.");
                return Err(LoginError::Expired);
            }
            "access_denied" => {
                progress.done("The login was denied.");
                return Err(LoginError::Denied);
            }
            _ => {
                progress.done("");
                return Err(oauth_refusal(status, &body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn qr_code_renders_as_text() {
        let q =
            super::qr_text("https://auth.example.org/auth/realms/rrap/device?user_code=ABCD-EFGH")
                .unwrap();
        assert!(q.lines().count() > 10);
        assert!(q.contains('█') || q.contains('▀') || q.contains('▄'));
    }
}
