//! The HTTP client of the identity service and the data store API, proxy
//! settings in words, and reqwest errors in words.
//!
//! Proxies: every client here (reqwest for the identity service and the
//! data store API, the aws-sdk-s3 client in [`crate::s3::aws`]) takes
//! `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (or their
//! lower-case forms) from the environment, read by the same code: hyper-util's
//! proxy matcher. So [`proxy_for`] says what each client does with a URL.
//! `NO_PROXY` has no implicit entries: an endpoint on 127.0.0.1 goes through
//! the proxy unless `NO_PROXY` names it.

use std::time::Duration;

use hyper_util::client::proxy::matcher::Matcher;
use tracing::debug;

/// The HTTP client for the identity service and the data store API. Each
/// request sets its own timeout from its deadline; the client's own is a
/// last resort. reqwest takes its proxies from the environment by itself.
pub fn client() -> Result<reqwest::Client, String> {
    debug!("{}", describe_proxies());
    reqwest::Client::builder()
        .user_agent(concat!("provenafs/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The proxy (without its credentials) that requests to `url` go through,
/// by the environment's settings; `None` when they go direct (no proxy set,
/// `NO_PROXY` names the host, or `url` does not parse).
pub fn proxy_for(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let hit = Matcher::from_env().intercept(&uri)?;
    Some(redact(&hit.uri().to_string()))
}

/// The environment's proxy settings in one line (credentials in a proxy
/// URL left out), for a debug log line.
pub fn describe_proxies() -> String {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    };
    let https = first(&["HTTPS_PROXY", "https_proxy"]);
    let http = first(&["HTTP_PROXY", "http_proxy"]);
    let all = first(&["ALL_PROXY", "all_proxy"]);
    let no = first(&["NO_PROXY", "no_proxy"]);
    if https.is_none() && http.is_none() && all.is_none() {
        return "no proxy in the environment: HTTP requests go direct".into();
    }
    let via = |p: Option<String>| {
        p.or_else(|| all.clone())
            .map_or("direct".into(), |p| redact(&p))
    };
    format!(
        "proxies from the environment: https:// via {}, http:// via {}, NO_PROXY {}",
        via(https),
        via(http),
        no.map_or("unset".into(), |n| format!("'{n}'"))
    )
}

/// `url` without the user name and password a proxy URL may carry
/// (`http://user:secret@proxy:3128` → `http://proxy:3128`), also when it
/// does not parse as a URL.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    // Userinfo is everything before the last '@' (a password may hold
    // '/', '?', '#' or '@' itself, written as typed in a proxy variable);
    // the host ends at the first '/', '?' or '#' after it.
    // An '@' in a path with no password before it (`proxy/a@b`) is not
    // userinfo; with a ':' before it, it is taken as one, to be safe.
    let after_user = rest
        .rfind('@')
        .filter(|&at| {
            let before = &rest[..at];
            before.contains(':') || !before.contains(['/', '?', '#'])
        })
        .map_or(0, |at| at + 1);
    let end = rest[after_user..]
        .find(['/', '?', '#'])
        .map_or(rest.len(), |e| after_user + e);
    let (host, tail) = (&rest[after_user..end], &rest[end..]);
    match scheme {
        Some(s) => format!("{s}://{host}{tail}"),
        None => format!("{host}{tail}"),
    }
}

/// A reqwest error in words, without the request body (where tokens live).
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "answer cut short"
    } else {
        "request failed"
    };
    let mut src = std::error::Error::source(e);
    let mut root = String::new();
    while let Some(s) = src {
        root = s.to_string();
        src = s.source();
    }
    // Through a proxy, the failure is most likely the proxy's: say so.
    let via = e
        .url()
        .and_then(|u| proxy_for(u.as_str()))
        .map(|p| format!(" via proxy {p}"))
        .unwrap_or_default();
    if root.is_empty() {
        format!("{kind}{via}")
    } else {
        format!("{kind}{via} ({root})")
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn proxy_credentials_are_redacted() {
        assert_eq!(
            redact("http://user:s3cret@proxy.hpc:3128"),
            "http://proxy.hpc:3128"
        );
        assert_eq!(
            redact("http://us%40er:p@ss@proxy:3128/"),
            "http://proxy:3128/"
        );
        assert_eq!(redact("user:pw@proxy:8080"), "proxy:8080");
        assert_eq!(redact("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(redact("http://proxy/a@b"), "http://proxy/a@b");
        // Passwords holding what ends a host elsewhere.
        for pw in ["p#ss", "p?ss", "p/ss", "p@ss"] {
            let r = redact(&format!("http://user:{pw}@proxy:3128"));
            assert_eq!(r, "http://proxy:3128", "{pw}");
        }
        assert_eq!(redact(""), "");
    }
}
