//! Settings that may come from a flag, the environment, the config file or
//! a default, resolved in that order, and where provenafs keeps its files.
//!
//! Clap already merges flags with environment variables, so every setting
//! the file may hold arrives here as an `Option` ("not given on the command
//! line or in the environment") and the file fills the gaps.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;

/// The RRAP M&DS IS deployment.
pub const DEFAULT_DOMAIN: &str = "mds.gbrrestoration.org";
pub const DEFAULT_REALM: &str = "rrap";
pub const DEFAULT_REGION: &str = "ap-southeast-2";

/// `config.toml`: every key is optional and named as its flag, with `_`
/// for `-` (`metadata_ttl = 30`, `cache_dir = "/scratch/cache"`).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub domain: Option<String>,
    pub realm: Option<String>,
    pub auth_url: Option<String>,
    pub api_url: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub token_file: Option<PathBuf>,
    pub allow_insecure_http: Option<bool>,
    pub request_timeout: Option<u64>,
    pub metadata_ttl: Option<u64>,
    pub registry_ttl: Option<u64>,
    pub released_ttl: Option<u64>,
    pub registry_page_size: Option<u32>,
    pub max_threads: Option<usize>,
    pub memory_cache_size: Option<String>,
    pub max_memory: Option<String>,
    pub max_read_ahead: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub no_disk_cache: Option<bool>,
    pub no_read_hints: Option<bool>,
    pub no_passthrough: Option<bool>,
    pub cache_size: Option<String>,
    pub cache_shared: Option<bool>,
    pub cache_group: Option<bool>,
    pub allow_other: Option<bool>,
    pub allow_root: Option<bool>,
    /// A number or a name (`gid = "lab"`).
    pub uid: Option<IdSetting>,
    pub gid: Option<IdSetting>,
    pub dataset: Option<Vec<String>>,
    pub by_name: Option<bool>,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// Octal, as a string (`"0440"`): TOML would read a bare 0440 as decimal.
    pub file_mode: Option<String>,
    pub dir_mode: Option<String>,
    /// Where these settings were read from, for messages.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// A user or group as the config file gives it: `uid = 1000` or `uid = "alice"`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IdSetting {
    Number(u32),
    Name(String),
}

impl IdSetting {
    /// As the command line would give it.
    pub fn as_text(&self) -> String {
        match self {
            IdSetting::Number(n) => n.to_string(),
            IdSetting::Name(s) => s.clone(),
        }
    }
}

/// `$XDG_CONFIG_HOME/provenafs`, else `~/.config/provenafs`.
pub fn config_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("provenafs"))
}

/// Where `provenafs login` keeps the offline token.
pub fn stored_token_path() -> Option<PathBuf> {
    config_dir().map(|d| d.join("token"))
}

/// Reads the config file: `explicit` (from `--config`) must exist; the
/// default one is optional.
pub fn load(explicit: Option<&Path>) -> Result<FileSettings, String> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match config_dir() {
            Some(d) => (d.join("config.toml"), false),
            None => return Ok(FileSettings::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileSettings::default())
        }
        Err(e) => return Err(format!("cannot read config file {}: {e}", path.display())),
    };
    let mut settings: FileSettings = toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        format!("config file {}: {msg}", path.display())
    })?;
    settings.path = Some(path);
    Ok(settings)
}

/// Where the three services live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub auth_url: String,
    pub api_url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
}

/// What the command line and environment said about endpoints.
#[derive(Debug, Default, Clone)]
pub struct EndpointChoice {
    pub domain: Option<String>,
    pub realm: Option<String>,
    pub auth_url: Option<String>,
    pub api_url: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

/// Explicit URLs beat ones derived from a domain at the same level; the
/// command line and environment beat the file; the file beats defaults.
pub fn endpoints(cli: &EndpointChoice, file: &FileSettings) -> Endpoints {
    let realm = cli
        .realm
        .clone()
        .or_else(|| file.realm.clone())
        .unwrap_or_else(|| DEFAULT_REALM.into());
    let derive_auth = |d: &str| format!("https://auth.{d}/auth/realms/{realm}");
    let derive_api = |d: &str| format!("https://data-api.{d}");
    let auth_url = cli
        .auth_url
        .clone()
        .or_else(|| cli.domain.as_deref().map(derive_auth))
        .or_else(|| file.auth_url.clone())
        .unwrap_or_else(|| derive_auth(file.domain.as_deref().unwrap_or(DEFAULT_DOMAIN)));
    let api_url = cli
        .api_url
        .clone()
        .or_else(|| cli.domain.as_deref().map(derive_api))
        .or_else(|| file.api_url.clone())
        .unwrap_or_else(|| derive_api(file.domain.as_deref().unwrap_or(DEFAULT_DOMAIN)));
    Endpoints {
        auth_url,
        api_url,
        s3_endpoint: cli.s3_endpoint.clone().or_else(|| file.s3_endpoint.clone()),
        s3_region: cli
            .s3_region
            .clone()
            .or_else(|| file.s3_region.clone())
            .unwrap_or_else(|| DEFAULT_REGION.into()),
    }
}

/// Refuses `http://` endpoints off this machine unless allowed: the
/// offline token and every credential would cross the network in clear.
pub fn check_endpoint(what: &str, url: &str, allow_insecure: bool) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{what} {url:?} is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // `http://127.0.0.1:1@example.org/` is example.org: never guess.
        return Err(format!("{what} must not hold a user name or password"));
    }
    match parsed.scheme() {
        "https" => return Ok(()),
        "http" => {}
        _ => return Err(format!("{what} {url:?} is not an http(s) URL")),
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if loopback || allow_insecure {
        Ok(())
    } else {
        Err(format!(
            "{what} {url} is plain http off this machine; use https, or pass --allow-insecure-http"
        ))
    }
}

impl Endpoints {
    pub fn check(&self, allow_insecure: bool) -> Result<(), String> {
        check_endpoint("--auth-url", &self.auth_url, allow_insecure)?;
        check_endpoint("--api-url", &self.api_url, allow_insecure)?;
        if let Some(s3) = &self.s3_endpoint {
            check_endpoint("--s3-endpoint", s3, allow_insecure)?;
        }
        Ok(())
    }
}

/// Where an offline token came from: every message about a token names
/// it, since a token the user did not expect (an old `RRAP_OFFLINE_TOKEN`
/// in a shell profile) is the usual cause of a puzzling rejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenOrigin {
    /// `--token-file FILE`.
    Flag(PathBuf),
    /// The `RRAP_OFFLINE_TOKEN` environment variable.
    Env,
    /// The config file's `token_file`.
    ConfigFile {
        file: PathBuf,
        config: Option<PathBuf>,
    },
    /// The token `provenafs login` stored.
    Stored(PathBuf),
}

impl std::fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenOrigin::Flag(p) => write!(f, "--token-file {}", p.display()),
            TokenOrigin::Env => f.write_str("RRAP_OFFLINE_TOKEN"),
            TokenOrigin::ConfigFile {
                file,
                config: Some(c),
            } => write!(
                f,
                "the config file's token_file {} (in {})",
                file.display(),
                c.display()
            ),
            TokenOrigin::ConfigFile { file, config: None } => {
                write!(f, "the config file's token_file {}", file.display())
            }
            TokenOrigin::Stored(p) => write!(f, "the stored login at {}", p.display()),
        }
    }
}

impl TokenOrigin {
    /// What to do when the identity service rejects this token: a new
    /// login does not help while another source takes precedence.
    pub fn fix(&self) -> String {
        match self {
            TokenOrigin::Flag(p) => format!(
                "put a valid token in {} (`(umask 077; provenafs login --print > {})`)",
                p.display(),
                p.display()
            ),
            TokenOrigin::Env => {
                "set RRAP_OFFLINE_TOKEN to a valid token, or unset it to use `provenafs login`"
                    .into()
            }
            TokenOrigin::ConfigFile { file, .. } => format!(
                "put a valid token in {} (`(umask 077; provenafs login --print > {})`)",
                file.display(),
                file.display()
            ),
            TokenOrigin::Stored(_) => "sign in again with `provenafs login`".into(),
        }
    }
}

/// The offline token and where it came from: `--token-file`, else
/// `RRAP_OFFLINE_TOKEN`, else the config file's `token_file`, else the one
/// `provenafs login` stored.
pub fn offline_token(
    flag: Option<&Path>,
    file: &FileSettings,
) -> Result<(Secret, TokenOrigin), String> {
    let (token, origin) = if let Some(p) = flag {
        let o = TokenOrigin::Flag(p.to_path_buf());
        (read_token_file(p, &o)?, o)
    } else if let Ok(t) = std::env::var("RRAP_OFFLINE_TOKEN") {
        (t, TokenOrigin::Env)
    } else if let Some(p) = &file.token_file {
        let o = TokenOrigin::ConfigFile {
            file: p.clone(),
            config: file.path.clone(),
        };
        (read_token_file(p, &o)?, o)
    } else {
        match stored_token_path().filter(|p| p.exists()) {
            Some(p) => {
                let o = TokenOrigin::Stored(p.clone());
                (read_token_file(&p, &o)?, o)
            }
            None => {
                return Err("no offline token: run `provenafs login`, set RRAP_OFFLINE_TOKEN, or pass --token-file FILE".into())
            }
        }
    };
    let token = token.trim().to_string();
    crate::auth::check_token_shape(&token)
        .map_err(|why| format!("the offline token from {origin} {why}"))?;
    Ok((Secret::new(token), origin))
}

/// The token sources that take precedence over the stored login, as they
/// stand now: what `provenafs login` warns about.
pub fn overriding_sources(file: &FileSettings) -> Vec<TokenOrigin> {
    let mut v = Vec::new();
    if std::env::var_os("RRAP_OFFLINE_TOKEN").is_some() {
        v.push(TokenOrigin::Env);
    }
    if let Some(p) = &file.token_file {
        v.push(TokenOrigin::ConfigFile {
            file: p.clone(),
            config: file.path.clone(),
        });
    }
    v
}

/// Reads a token file `provenafs login` or the user wrote.
pub fn read_stored_token(p: &Path) -> Result<String, String> {
    read_token_file(p, &TokenOrigin::Stored(p.to_path_buf()))
}

fn read_token_file(p: &Path, origin: &TokenOrigin) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    // The flag's own name already holds the path; others say where the path came from.
    let from = match origin {
        TokenOrigin::Flag(_) => " (--token-file)".to_string(),
        TokenOrigin::Stored(_) => " (the stored login)".to_string(),
        o => format!(" ({o})"),
    };
    let cannot = |e: std::io::Error| format!("cannot read token file {}{from}: {e}", p.display());
    let md = std::fs::metadata(p).map_err(cannot)?;
    if md.mode() & 0o044 != 0 {
        // As ssh does with private keys: a secret others can read is refused.
        return Err(format!(
            "token file {}{from} is readable by other users (mode {:o}); run `chmod 600 {}`",
            p.display(),
            md.mode() & 0o777,
            p.display()
        ));
    }
    std::fs::read_to_string(p).map_err(cannot)
}

/// Writes a file only its owner can read (it holds a token), atomically,
/// creating its folder 0700 if needed.
pub fn write_private(p: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let tmp = p.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_endpoints() {
        assert!(check_endpoint("x", "https://data-api.example.org", false).is_ok());
        assert!(check_endpoint("x", "http://127.0.0.1:8080/auth", false).is_ok());
        assert!(check_endpoint("x", "http://localhost:1", false).is_ok());
        assert!(check_endpoint("x", "http://[::1]:9000", false).is_ok());
        assert!(check_endpoint("x", "http://10.0.0.5:9000", false).is_err());
        assert!(check_endpoint("x", "http://example.org", false).is_err());
        assert!(check_endpoint("x", "http://example.org", true).is_ok());
        assert!(check_endpoint("x", "ftp://example.org", true).is_err());
        // The host is what follows `@`: these go to example.org in clear.
        assert!(check_endpoint("x", "http://127.0.0.1:1@example.org/", false).is_err());
        assert!(check_endpoint("x", "http://[::1]@example.org/", false).is_err());
        assert!(check_endpoint("x", "http://localhost.example.org/", false).is_err());
        assert!(check_endpoint("x", "https://user:pw@example.org/", false).is_err());
    }

    #[test]
    fn defaults_are_the_rrap_deployment() {
        let e = endpoints(&EndpointChoice::default(), &FileSettings::default());
        assert_eq!(
            e.auth_url,
            "https://auth.mds.gbrrestoration.org/auth/realms/rrap"
        );
        assert_eq!(e.api_url, "https://data-api.mds.gbrrestoration.org");
        assert_eq!(e.s3_region, "ap-southeast-2");
        assert_eq!(e.s3_endpoint, None);
    }

    #[test]
    fn precedence_flag_then_file_then_default() {
        let file = FileSettings {
            domain: Some("rrap-is.com".into()),
            api_url: Some("https://api.file.example".into()),
            ..Default::default()
        };
        // The file's domain derives the auth URL; its explicit API URL wins.
        let e = endpoints(&EndpointChoice::default(), &file);
        assert_eq!(e.auth_url, "https://auth.rrap-is.com/auth/realms/rrap");
        assert_eq!(e.api_url, "https://api.file.example");
        // A domain on the command line beats everything in the file.
        let cli = EndpointChoice {
            domain: Some("other.org".into()),
            realm: Some("lab".into()),
            ..Default::default()
        };
        let e = endpoints(&cli, &file);
        assert_eq!(e.auth_url, "https://auth.other.org/auth/realms/lab");
        assert_eq!(e.api_url, "https://data-api.other.org");
        // An explicit URL flag beats the domain flag.
        let cli = EndpointChoice {
            domain: Some("other.org".into()),
            auth_url: Some("http://127.0.0.1:1/auth/realms/x".into()),
            ..Default::default()
        };
        let e = endpoints(&cli, &file);
        assert_eq!(e.auth_url, "http://127.0.0.1:1/auth/realms/x");
        assert_eq!(e.api_url, "https://data-api.other.org");
    }

    #[test]
    fn config_file_parses_and_rejects_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "domain = \"x.org\"\nmetadata_ttl = 5\ndataset = [\"10378.1/1\"]\n",
        )
        .unwrap();
        let f = load(Some(&p)).unwrap();
        assert_eq!(f.domain.as_deref(), Some("x.org"));
        assert_eq!(f.metadata_ttl, Some(5));
        assert_eq!(f.dataset.unwrap(), ["10378.1/1"]);
        std::fs::write(&p, "domian = \"x.org\"\n").unwrap();
        let err = load(Some(&p)).unwrap_err();
        assert!(err.contains("unknown field `domian`"), "{err}");
        assert!(load(Some(&d.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn private_files_and_folders() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/dir/token");
        write_private(&p, "t").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        write_private(&p, "u").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "u");
    }
}
