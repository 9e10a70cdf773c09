//! `login`, `logout` and `whoami`: the offline token's life on this machine.

use super::{
    client_configs, endpoints, init_logging, print_out, runtime, token_error, Exit, LoginArgs,
    LogoutArgs, WhoamiArgs,
};
use crate::auth::{AuthConfig, Revocation, TokenSource};
use crate::config::{self, TokenOrigin};
use crate::retry::Deadline;
use crate::secret::Secret;

/// `provenafs login`: the device flow, then the token stored (or printed),
/// with a warning for every source that will be used before it.
pub(super) fn login(a: LoginArgs) -> Result<(), Exit> {
    init_logging(None, None, "error")?;
    let file = config::load(a.identity.config.as_deref())?;
    // Only the identity service is involved.
    let (e, insecure) = endpoints(&a.identity, None, None, &file);
    config::check_endpoint("--auth-url", &e.auth_url, insecure)?;
    let target = if a.print {
        None
    } else {
        Some(config::stored_token_path().ok_or_else(|| {
            "cannot tell where to store the token: set HOME or XDG_CONFIG_HOME, or use --print"
                .to_string()
        })?)
    };
    let rt = runtime()?;
    let http = crate::http::client()?;
    let (auth, _, _) = client_configs(e, crate::retry::DEFAULT_REQUEST_TIMEOUT);
    let ui = crate::login::Ui {
        open_browser: !a.no_browser,
        qr: !a.no_qr,
    };
    let token = rt
        .block_on(crate::login::device_login(&http, &auth, &ui))
        .map_err(|e| e.to_string())?;
    match target {
        None => print_out(&format!("{}\n", token.expose())),
        Some(p) => {
            config::write_private(&p, &format!("{}\n", token.expose()))
                .map_err(|e| format!("cannot store the token in {}: {e}", p.display()))?;
            let overridden = config::overriding_sources(&file);
            if overridden.is_empty() {
                eprintln!(
                    "Offline token stored in {} (readable only by you). `provenafs mount` will use it.",
                    p.display()
                );
            } else {
                eprintln!(
                    "Offline token stored in {} (readable only by you).",
                    p.display()
                );
            }
            // Signed in, yet the next command would use another token: say
            // so now rather than let a rejection puzzle later.
            for o in overridden {
                let remedy = match &o {
                    TokenOrigin::Env => "unset RRAP_OFFLINE_TOKEN to use the stored token".into(),
                    TokenOrigin::ConfigFile {
                        config: Some(c), ..
                    } => format!("remove token_file from {} to use it", c.display()),
                    _ => "remove it to use the stored token".to_string(),
                };
                eprintln!(
                    "warning: {o} takes precedence: commands will use that token, not the one stored now; {remedy}"
                );
            }
            Ok(())
        }
    }
}

/// `provenafs logout`: ends the stored token's session at the identity
/// service, then deletes the file. A failed revocation still deletes the
/// file, says the token was not revoked, and exits 1.
pub(super) fn logout(a: LogoutArgs) -> Result<(), Exit> {
    init_logging(None, None, "error")?;
    let Some(p) = config::stored_token_path() else {
        return Err(
            "cannot tell where the token is stored: set HOME or XDG_CONFIG_HOME"
                .to_string()
                .into(),
        );
    };
    let env_note = || {
        if std::env::var_os("RRAP_OFFLINE_TOKEN").is_some() {
            eprintln!(
                "note: RRAP_OFFLINE_TOKEN is still set in this environment; commands keep using it"
            );
        }
    };
    if !p.exists() {
        eprintln!("Not logged in (no {})", p.display());
        env_note();
        return Ok(());
    }
    let file = config::load(a.identity.config.as_deref())?;
    let (e, insecure) = endpoints(&a.identity, None, None, &file);
    let realm = e.auth_url.clone();
    // A token of another deployment or realm: that identity service would
    // answer `invalid_grant` here too, which must not pass for "already
    // invalid". The file is kept for a logout against the right one.
    if let Some(iss) = config::read_stored_token(&p)
        .ok()
        .and_then(|t| crate::auth::token_claims(t.trim()))
        .and_then(|c| c.get("iss").and_then(|i| i.as_str()).map(str::to_string))
    {
        if iss.trim_end_matches('/') != realm.trim_end_matches('/') {
            return Err(format!(
                "the stored token was issued by {iss}, not {realm}: nothing revoked or removed; \
                 run `provenafs logout --auth-url {iss}`"
            )
            .into());
        }
    }
    let revoked: Result<Revocation, String> = (|| {
        config::check_endpoint("--auth-url", &e.auth_url, insecure)?;
        let token = config::read_stored_token(&p)?;
        let token = Secret::new(token.trim());
        crate::auth::check_token_shape(token.expose())
            .map_err(|why| format!("the stored token {why}"))?;
        let (auth, _, _) = client_configs(e, crate::retry::DEFAULT_REQUEST_TIMEOUT);
        let rt = runtime()?;
        let http = crate::http::client()?;
        rt.block_on(crate::auth::revoke_offline(&http, &auth, &token))
    })();
    match &revoked {
        Ok(Revocation::Revoked) => eprintln!("Revoked the offline token at {realm}."),
        Ok(Revocation::AlreadyInvalid(why)) => eprintln!(
            "The identity service no longer accepts the stored token ({why}): nothing to revoke."
        ),
        Err(_) => {}
    }
    std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
    env_note();
    match revoked {
        Ok(_) => {
            eprintln!("Removed {}.", p.display());
            Ok(())
        }
        Err(why) => Err(format!(
            "removed {}, but the token was NOT revoked ({why}); it stays valid until it expires \
             or you revoke it under Applications in the account console ({realm}/account)",
            p.display()
        )
        .into()),
    }
}

/// `provenafs whoami`: exchanges the token as any command would, then
/// shows the user the access token names and where the token was found.
pub(super) fn whoami(a: WhoamiArgs) -> Result<(), Exit> {
    init_logging(None, None, "error")?;
    let file = config::load(a.identity.config.as_deref())?;
    let (e, insecure) = endpoints(&a.identity, None, None, &file);
    config::check_endpoint("--auth-url", &e.auth_url, insecure)?;
    let token_file = a
        .token
        .token_file
        .as_deref()
        .map(super::absolute)
        .transpose()?;
    let (token, origin) = config::offline_token(token_file.as_deref(), &file)?;
    let timeout = file
        .request_timeout
        .map(std::time::Duration::from_secs)
        .unwrap_or(crate::retry::DEFAULT_REQUEST_TIMEOUT);
    let auth = AuthConfig {
        realm_url: e.auth_url.clone(),
        request_timeout: timeout,
        shared: None,
    };
    let rt = runtime()?;
    let http = crate::http::client()?;
    let access = rt
        .block_on(async {
            let tokens = TokenSource::new(http, auth, token);
            tokens.access_token(Deadline::after(timeout)).await
        })
        .map_err(|e| token_error(e, &origin))?;
    let claims = crate::auth::token_claims(access.expose()).unwrap_or_default();
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| "-".into())
    };
    let mut out = String::new();
    for (label, key) in [
        ("user", "preferred_username"),
        ("name", "name"),
        ("email", "email"),
        ("subject", "sub"),
    ] {
        out.push_str(&format!("{label:<9}{}\n", printable(&claim(key))));
    }
    out.push_str(&format!("{:<9}{origin}\n", "token"));
    out.push_str(&format!("{:<9}{}\n", "realm", e.auth_url));
    print_out(&out)
}

/// Claims are the service's text: no control characters on a terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
