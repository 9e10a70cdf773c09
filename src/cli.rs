//! Command line: flags and environment into plain config structs, then run.
//! Only this module reads flags, environment variables and files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::ApiConfig;
use crate::auth::{check_token_shape, AuthConfig};
use crate::fs::fuse::FuseConfig;
use crate::fs::tree::TreeConfig;
use crate::mount::{self, MountConfig};
use crate::read::ReadConfig;
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::sim::SimConfig;

#[derive(Parser)]
#[command(
    name = "provenafs",
    version,
    about = "Mount the Provena research data store as a read-only file system"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Mount the data store at MOUNTPOINT (token from RRAP_OFFLINE_TOKEN or --token-file).
    Mount(MountArgs),
    /// Unmount a provenafs mount (works for root and for the user who mounted it).
    Unmount { mountpoint: PathBuf },
    /// Run the local Provena emulator (identity, data store API, S3) over a folder.
    Sim(SimArgs),
    /// Generate sample datasets, run the emulator and mount it in the foreground.
    Demo {
        mountpoint: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Args, Clone)]
pub struct LogArgs {
    /// Log to this file instead of standard error.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a RUST_LOG-style directive.
    #[arg(long, env = "PROVENAFS_LOG")]
    pub log_level: Option<String>,
}

#[derive(Args, Clone)]
pub struct EndpointArgs {
    /// Keycloak realm URL.
    #[arg(
        long,
        env = "PROVENA_AUTH_URL",
        default_value = "https://auth.mds.gbrrestoration.org/auth/realms/rrap"
    )]
    pub auth_url: String,
    /// Data store API base URL.
    #[arg(
        long,
        env = "PROVENA_API_URL",
        default_value = "https://data-api.mds.gbrrestoration.org"
    )]
    pub api_url: String,
    /// S3 endpoint URL; unset means AWS S3 itself.
    #[arg(long, env = "PROVENA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "PROVENA_S3_REGION", default_value = "ap-southeast-2")]
    pub s3_region: String,
}

#[derive(Args, Clone)]
pub struct MountArgs {
    pub mountpoint: PathBuf,
    /// Read the offline token from this file (else RRAP_OFFLINE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    /// Stay attached; unmount on Ctrl-C / SIGTERM.
    #[arg(short, long)]
    pub foreground: bool,
    /// Seconds listings and attributes are trusted before asking again.
    #[arg(long, default_value_t = 60)]
    pub metadata_ttl: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 16)]
    pub max_threads: usize,
    /// Memory block cache budget (e.g. 96MiB, 1GiB).
    #[arg(long, default_value = "96MiB", value_parser = parse_size)]
    pub memory_cache_size: u64,
    /// Bytes of read-ahead GETs in flight at once, all files together.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_memory: u64,
    /// Largest read-ahead window of one file.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_read_ahead: u64,
    /// Keep fetched blocks on disk in this folder (created 0700).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Disk cache budget.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Allow plain http:// endpoints that are not on this machine (tokens
    /// would cross the network unencrypted).
    #[arg(long)]
    pub allow_insecure_http: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args, Clone)]
pub struct SimArgs {
    /// Data folder: ROOT/<prefix>/<suffix>/ is the dataset <prefix>/<suffix>.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: std::net::SocketAddr,
    /// Also write the PROVENA_* / RRAP_OFFLINE_TOKEN lines to this file (0600).
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub access_token_ttl: u64,
    #[arg(long, default_value_t = 3600)]
    pub credentials_ttl: u64,
    /// Largest page the registry list and ListObjectsV2 answer with.
    #[arg(long, default_value_t = 1000)]
    pub page_size: u32,
    /// Handles the user may see but not read (credentials answer 401).
    #[arg(long)]
    pub deny: Vec<String>,
    /// Approve device logins at once (no browser step).
    #[arg(long)]
    pub auto_approve: bool,
    /// Seconds between device-code polls the emulator asks for.
    #[arg(long, default_value_t = 5)]
    pub device_interval: u64,
    /// Fraction of S3 requests that fail (500, 503 SlowDown, reset, short body).
    #[arg(long, default_value_t = 0.0)]
    pub s3_fault_rate: f64,
    /// Fraction of identity and API requests that fail (500/502/503, reset).
    #[arg(long, default_value_t = 0.0)]
    pub api_fault_rate: f64,
    /// Milliseconds added to every request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// JSON array of extra objects ({"key", "data"}) whose keys no file can hold.
    #[arg(long)]
    pub extra_keys: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

static LOG_TO_FILE: AtomicBool = AtomicBool::new(false);

pub fn logs_to_file() -> bool {
    LOG_TO_FILE.load(Ordering::Relaxed)
}

fn init_logging(log: &LogArgs, default: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match &log.log_level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    // Libraries that print raw requests (headers with signatures and
    // session tokens) at debug level are capped, whatever was asked.
    let mut filter = filter;
    for cap in [
        "s3s=info",
        "aws_smithy_runtime=info",
        "aws_smithy_http_client=info",
        "aws_sigv4=info",
        "hyper=info",
        "hyper_util=info",
        "reqwest=info",
        "h2=info",
        "rustls=info",
    ] {
        if let Ok(d) = cap.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &log.log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open log file {}: {e}", p.display()))?;
            LOG_TO_FILE.store(true, Ordering::Relaxed);
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("provenafs-io")
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

/// The offline token: `--token-file`, else `RRAP_OFFLINE_TOKEN`.
fn read_token(file: Option<&PathBuf>) -> Result<Secret, String> {
    let token = match file {
        Some(p) => {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(p)
                .map_err(|e| format!("cannot read token file {}: {e}", p.display()))?;
            if md.mode() & 0o044 != 0 {
                // As ssh does with private keys: a secret others can read is refused.
                return Err(format!(
                    "token file {} is readable by other users (mode {:o}); run `chmod 600 {}`",
                    p.display(),
                    md.mode() & 0o777,
                    p.display()
                ));
            }
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read token file {}: {e}", p.display()))?
        }
        None => std::env::var("RRAP_OFFLINE_TOKEN").map_err(|_| {
            "no offline token: set RRAP_OFFLINE_TOKEN or pass --token-file FILE".to_string()
        })?,
    };
    let token = token.trim().to_string();
    check_token_shape(&token)?;
    Ok(Secret::new(token))
}

/// Refuses `http://` endpoints off this machine unless allowed: the
/// offline token and every credential would cross the network in clear.
fn check_endpoint(what: &str, url: &str, allow_insecure: bool) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        if url.starts_with("https://") {
            return Ok(());
        }
        return Err(format!("{what} {url:?} is not an http(s) URL"));
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || allow_insecure {
        Ok(())
    } else {
        Err(format!(
            "{what} {url} is plain http off this machine; use https, or pass --allow-insecure-http"
        ))
    }
}

fn mount_config(a: &MountArgs) -> Result<MountConfig, String> {
    let e = &a.endpoints;
    check_endpoint("--auth-url", &e.auth_url, a.allow_insecure_http)?;
    check_endpoint("--api-url", &e.api_url, a.allow_insecure_http)?;
    if let Some(s3) = &e.s3_endpoint {
        check_endpoint("--s3-endpoint", s3, a.allow_insecure_http)?;
    }
    let token = read_token(a.token_file.as_ref())?;
    Ok(MountConfig {
        mountpoint: a.mountpoint.clone(),
        token,
        auth: AuthConfig {
            realm_url: a.endpoints.auth_url.clone(),
        },
        api: ApiConfig {
            base_url: a.endpoints.api_url.clone(),
            ..ApiConfig::default()
        },
        s3: S3Config {
            endpoint: a.endpoints.s3_endpoint.clone(),
            region: a.endpoints.s3_region.clone(),
            ..S3Config::default()
        },
        tree: TreeConfig {
            metadata_ttl: Duration::from_secs(a.metadata_ttl),
            ..TreeConfig::default()
        },
        read: ReadConfig {
            memory_cache: a.memory_cache_size,
            max_inflight: a.max_memory,
            max_window: a.max_read_ahead,
            disk: a.cache_dir.clone().map(|d| (d, a.cache_size)),
            ..ReadConfig::default()
        },
        fuse: FuseConfig::default(),
        max_threads: a.max_threads,
        allow_other: a.allow_other,
    })
}

/// A byte size: a number with an optional K/M/G/T suffix (KiB, MB, ... all
/// read as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("unknown size unit in {s:?}")),
    };
    Ok((n * mult as f64) as u64)
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("provenafs: {msg}");
    1
}

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return 0;
            }
            // One line, as every other failure: clap's first line, minus its prefix.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
    };
    match cli.command {
        Command::Mount(a) => {
            let cfg = match mount_config(&a) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if !a.foreground {
                // Check what can be checked before detaching, for a fast answer.
                if let Err(e) = mount::check_mountpoint(&cfg.mountpoint) {
                    return fail(e);
                }
                return match mount::spawn_detached() {
                    Ok(()) => 0,
                    Err(mount::MountError::ChildFailed(code)) => code,
                    Err(e) => fail(e),
                };
            }
            // fuser warns about an unmount that already happened; not news.
            if let Err(e) = init_logging(&a.log, "warn,fuser=error") {
                return fail(e);
            }
            let rt = match runtime() {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            match mount::run(cfg, &rt) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
        Command::Unmount { mountpoint } => match mount::unmount(&mountpoint) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Command::Sim(a) => {
            if let Err(e) = init_logging(&a.log, "info") {
                return fail(e);
            }
            match runtime().and_then(|rt| rt.block_on(run_sim(a))) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
        Command::Demo { mountpoint, log } => {
            if let Err(e) = init_logging(&log, "warn") {
                return fail(e);
            }
            match crate::demo::run(&mountpoint) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

async fn run_sim(a: SimArgs) -> Result<(), String> {
    let cfg = SimConfig {
        root: a.root,
        addr: a.addr,
        access_token_ttl: a.access_token_ttl,
        credentials_ttl: a.credentials_ttl,
        page_size: a.page_size.max(1),
        s3_page_size: a.page_size.clamp(1, 1000),
        deny: a.deny,
        device_interval: a.device_interval,
        auto_approve: a.auto_approve,
        s3_fault_rate: a.s3_fault_rate,
        api_fault_rate: a.api_fault_rate,
        latency_ms: a.latency_ms,
        extra_keys: a.extra_keys,
    };
    let sim = crate::sim::Sim::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let lines = sim.env.shell();
    if let Some(p) = &a.env_file {
        write_private(p, &lines).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    print!("{lines}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.stop();
    Ok(())
}

/// Writes a file only its owner can read (it holds a token).
pub fn write_private(p: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        use super::parse_size;
        assert_eq!(parse_size("96MiB"), Ok(96 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn insecure_endpoints() {
        use super::check_endpoint;
        assert!(check_endpoint("x", "https://data-api.example.org", false).is_ok());
        assert!(check_endpoint("x", "http://127.0.0.1:8080/auth", false).is_ok());
        assert!(check_endpoint("x", "http://localhost:1", false).is_ok());
        assert!(check_endpoint("x", "http://[::1]:9000", false).is_ok());
        assert!(check_endpoint("x", "http://10.0.0.5:9000", false).is_err());
        assert!(check_endpoint("x", "http://example.org", false).is_err());
        assert!(check_endpoint("x", "http://example.org", true).is_ok());
        assert!(check_endpoint("x", "ftp://example.org", true).is_err());
    }
}
