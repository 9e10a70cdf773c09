//! Command line: flags, environment and the config file into plain config
//! structs, then run. Only this module (with [`crate::config`]) reads
//! flags, environment variables and settings files.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::ApiConfig;
use crate::auth::{AuthConfig, AuthError};
use crate::config::{self, EndpointChoice, Endpoints, FileSettings, TokenOrigin};
use crate::fs::fuse::FuseConfig;
use crate::fs::tree::TreeConfig;
use crate::mount::{self, MountConfig};
use crate::read::{DiskConfig, ReadConfig};
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::session::{AuthErrorOr, Session};

mod account;
mod options;
mod prefetch;
mod provenance;
mod sim;
mod tools;

/// How to reach the identity service. Each setting may also come from the
/// environment variable named in `--help`, or from the config file; the
/// order is flag, environment, config file, default.
#[derive(Args, Clone, Debug, Default)]
pub struct IdentityArgs {
    /// Config file [default: $XDG_CONFIG_HOME/provenafs/config.toml].
    #[arg(long, env = "PROVENAFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Deployment domain: derives https://auth.DOMAIN/auth/realms/REALM and
    /// https://data-api.DOMAIN [default: mds.gbrrestoration.org].
    #[arg(long, env = "PROVENA_DOMAIN")]
    pub domain: Option<String>,
    /// Keycloak realm [default: rrap].
    #[arg(long, env = "PROVENA_REALM")]
    pub realm: Option<String>,
    /// Keycloak realm URL (overrides --domain/--realm).
    #[arg(long, env = "PROVENA_AUTH_URL")]
    pub auth_url: Option<String>,
    /// Allow plain http:// endpoints that are not on this machine (tokens
    /// would cross the network unencrypted).
    #[arg(long)]
    pub allow_insecure_http: bool,
}

/// Where the offline token comes from.
#[derive(Args, Clone, Debug, Default)]
pub struct TokenArgs {
    /// Read the offline token from this file [default: RRAP_OFFLINE_TOKEN,
    /// then the config file's token_file, then the token `provenafs login` stored].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// How to reach the data store API.
#[derive(Args, Clone, Debug, Default)]
pub struct ApiArgs {
    /// Data store API base URL (overrides --domain).
    #[arg(long, env = "PROVENA_API_URL")]
    pub api_url: Option<String>,
    /// Seconds any one operation may take, retries included: a read,
    /// listing or lookup that gets no answer in time fails with ETIMEDOUT
    /// [default: 30].
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<u64>,
    /// Datasets per registry page [default: 20, as Provena's own clients
    /// ask]; a page that fails is asked again with half as many.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub registry_page_size: Option<u32>,
}

/// Everything a command that reads datasets' files needs: the identity
/// service, the token, the data store API and S3.
#[derive(Args, Clone, Debug, Default)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

impl ConnectArgs {
    /// A signed-in session (see [`connect_sharing`]).
    async fn session(&self, shared_cache: Option<&Path>) -> Result<Session, String> {
        connect_sharing(
            &self.identity,
            &self.token,
            &self.api,
            Some(&self.s3),
            shared_cache,
        )
        .await
    }
}

/// How to reach S3.
#[derive(Args, Clone, Debug, Default)]
pub struct S3Args {
    /// S3 endpoint URL [default: AWS S3 itself].
    #[arg(long, env = "PROVENA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: ap-southeast-2].
    #[arg(long, env = "PROVENA_S3_REGION")]
    pub s3_region: Option<String>,
}

#[derive(Parser)]
#[command(
    name = "provenafs",
    version,
    about = "Mount the Provena research data store as a read-only file system",
    after_help = "Settings come from, in order: flags, environment variables, the config file \
                  ($XDG_CONFIG_HOME/provenafs/config.toml or --config; keys named as the long \
                  flags with `_` for `-`), then defaults."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Mount the data store at MOUNTPOINT (read-only). Also takes mount(8)'s
    /// `-o opt,key=value` form: every long flag is an option of the same name.
    // A flag given twice (an fstab `-o allow_other` and the same flag in a
    // wrapper script) means the same as once, the last value winning.
    #[command(args_override_self = true)]
    Mount(Box<MountArgs>),
    /// Unmount a provenafs mount (works for root and for the user who mounted it).
    Unmount {
        /// Detach even when busy: the mount goes once the last user leaves.
        #[arg(short, long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// List this machine's provenafs mounts, with live figures for your own.
    Status {
        /// Only this mount.
        mountpoint: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sign in through the browser (OAuth2 device flow) and store the offline token.
    Login(LoginArgs),
    /// Revoke the stored offline token at the identity service and delete it.
    Logout(LogoutArgs),
    /// Show whom the offline token belongs to and where it was found.
    Whoami(WhoamiArgs),
    /// List the datasets you can see.
    Datasets(DatasetsArgs),
    /// List a dataset's files by handle, like `aws s3 ls`: HANDLE[/PATH].
    Ls(LsArgs),
    /// Print a man page or shell completions.
    Generate {
        #[arg(value_enum)]
        what: Generated,
    },
    /// Print a dataset's S3 read credentials for other tools (AWS
    /// `credential_process` JSON, or `--env` lines).
    Credentials(tools::CredentialsArgs),
    /// Print the s3:// URL of a dataset, folder or file: HANDLE[/PATH].
    Url(tools::UrlArgs),
    /// Download datasets, folders or files (HANDLE[/PATH]...) into a cache
    /// folder ahead of a job, so that `mount --cache-dir` on it reads them
    /// without a GET. Resumable: what is cached already is skipped.
    Prefetch(Box<prefetch::PrefetchArgs>),
    /// What a mount's readers read (datasets, files, versions, by whom):
    /// a table, the manifest's JSON, or a Provena model run record to
    /// fill in and `register`.
    Provenance(Box<provenance::ProvenanceArgs>),
    /// Run the local Provena emulator (identity, data store API, S3) over a folder.
    Sim(sim::SimArgs),
    /// Generate sample datasets, run the emulator and mount it in the foreground.
    Demo {
        mountpoint: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
}

/// What `provenafs generate` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Generated {
    /// The man page (roff), for `man -l -` or man1/provenafs.1.
    Man,
    /// Bash completions.
    CompleteBash,
    /// Zsh completions (a `_provenafs` file in $fpath).
    CompleteZsh,
    /// Fish completions.
    CompleteFish,
}

#[derive(Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log to this file instead of standard error.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a RUST_LOG-style directive.
    #[arg(long, env = "PROVENAFS_LOG")]
    pub log_level: Option<String>,
    /// Log at debug level (the same as --log-level debug).
    #[arg(long)]
    pub debug: bool,
}

impl LogArgs {
    /// The log filter asked for, `--debug` first.
    fn level(&self) -> Option<String> {
        if self.debug {
            Some("debug".into())
        } else {
            self.log_level.clone()
        }
    }
}

#[derive(Args, Clone)]
pub struct LoginArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Print the offline token on standard output instead of storing it.
    #[arg(long)]
    pub print: bool,
    /// Do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Do not draw a QR code of the sign-in address.
    #[arg(long)]
    pub no_qr: bool,
}

#[derive(Args, Clone)]
pub struct LogoutArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Args, Clone)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
}

#[derive(Args, Clone)]
pub struct DatasetsArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Only datasets whose handle, name or description hold every word.
    #[arg(long)]
    pub search: Option<String>,
}

#[derive(Args, Clone)]
pub struct LsArgs {
    /// HANDLE or HANDLE/PATH, e.g. 10378.1/1687966/data (also as
    /// https://hdl.handle.net/10378.1/1687966/data).
    pub target: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Everything below, not one level.
    #[arg(short, long)]
    pub recursive: bool,
    /// Sizes in KiB, MiB, GiB.
    #[arg(long, visible_alias = "human-readable")]
    pub human: bool,
}

#[derive(Args, Clone)]
pub struct MountArgs {
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// mount(8)-style options, comma-separated: each long flag without its
    /// `--`, `_` or `-` alike (allow_other,uid=1000,cache_dir=/scratch/c).
    /// mount(8)'s generic options (ro, rw, defaults, _netdev, nofail,
    /// noatime, ...) are accepted and change nothing.
    // Expanded into flags before parsing (options.rs); declared for --help.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay attached; unmount on Ctrl-C / SIGTERM.
    #[arg(short, long)]
    pub foreground: bool,
    /// Accepted for compatibility (-o ro too): the mount is always read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Accepted for compatibility: a mount whose process ends is always unmounted.
    #[arg(long)]
    pub auto_unmount: bool,
    /// Show only this dataset (repeatable); the registry is never listed.
    /// A handle as copied: 10378.1/1687966 or https://hdl.handle.net/10378.1/1687966.
    #[arg(long = "dataset", value_name = "HANDLE", value_parser = crate::wire::normalize_handle)]
    pub datasets: Vec<String>,
    /// Add `by-name/<dataset name>`: symlinks to the handle folders.
    #[arg(long)]
    pub by_name: bool,
    /// Seconds listings and attributes are trusted before asking again [default: 60].
    #[arg(long)]
    pub metadata_ttl: Option<u64>,
    /// Seconds the registry listing (the datasets at the root) is trusted
    /// [default: 600].
    #[arg(long, value_name = "SECS")]
    pub registry_ttl: Option<u64>,
    /// Seconds listings and attributes of RELEASED and PENDING datasets
    /// (whose data no longer changes) are trusted [default: 86400].
    #[arg(long, value_name = "SECS")]
    pub released_ttl: Option<u64>,
    /// FUSE worker threads [default: 16].
    #[arg(long)]
    pub max_threads: Option<usize>,
    /// Memory block cache budget (blocks on their way take the room of consumed ones), e.g. 48MiB, 1GiB [default: 48MiB].
    #[arg(long, value_parser = parse_size)]
    pub memory_cache_size: Option<u64>,
    /// Bytes of read-ahead GETs in flight at once, all files together [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Largest read-ahead window of one file [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub max_read_ahead: Option<u64>,
    /// Keep fetched blocks on disk in this folder (created 0700) [default:
    /// $XDG_CACHE_HOME/provenafs, i.e. ~/.cache/provenafs].
    #[arg(long, conflicts_with = "no_disk_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Keep no blocks on disk: memory only (a file bought whole is then
    /// limited to what the memory cache holds).
    #[arg(long)]
    pub no_disk_cache: bool,
    /// Keep no record of the ranges each file's readers needed first
    /// (kept by default in $XDG_STATE_HOME/provenafs/hints, a few hundred
    /// bytes per file version, so the next open asks for them at once).
    #[arg(long)]
    pub no_read_hints: bool,
    /// Never hand a file kept whole in the disk cache to the kernel (FUSE
    /// passthrough: Linux 6.9 and later, a root daemon): every read then
    /// comes through provenafs.
    #[arg(long)]
    pub no_passthrough: bool,
    /// Disk cache budget [default: 10GiB].
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// The cache folder is shared by several mounts (other nodes on a
    /// cluster file system): evict by the folder's total size.
    #[arg(long)]
    pub cache_shared: bool,
    /// Let the owner's group read the cache (folders 2770, files 0640),
    /// for a cache shared by a project group.
    #[arg(long)]
    pub cache_group: bool,
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Let root read the mount too.
    #[arg(long)]
    pub allow_root: bool,
    /// Owner shown for every file, a number or a user name [default: the
    /// mounting user].
    #[arg(long, value_name = "USER", value_parser = user_id)]
    pub uid: Option<u32>,
    /// Group shown for every file, a number or a group name [default: the
    /// mounting user's group].
    #[arg(long, value_name = "GROUP", value_parser = group_id)]
    pub gid: Option<u32>,
    /// Permission bits of every file, octal, enforced by the kernel
    /// [default: 0444]. With --gid, e.g. 0440 gives the mount to one group.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub file_mode: Option<u16>,
    /// Permission bits of every folder, octal [default: 0555], e.g. 0550.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub dir_mode: Option<u16>,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Sends tracing output to `file` (through [`crate::logfile::open`]:
/// private, bounded) or to standard error. Colour codes only on a terminal:
/// a journal, a pipe or a file gets plain text. Commands that end by
/// themselves write each line as it comes; see [`init_daemon_logging`].
fn init_logging(level: Option<&str>, file: Option<&Path>, default: &str) -> Result<(), String> {
    init_logging_with(level, file, default, None)
}

/// [`init_logging`] for a process that serves until stopped (a mount, the
/// demo, a long prefetch): lines are queued and written by a thread of
/// their own, so a log folder that hangs (an NFS home) never blocks a
/// thread that logs; lines it does not take in time are dropped and
/// counted (see [`crate::logfile::non_blocking`]; `stall` is when a write
/// counts as stuck).
fn init_daemon_logging(
    level: Option<&str>,
    file: Option<&Path>,
    default: &str,
    stall: Duration,
) -> Result<(), String> {
    init_logging_with(level, file, default, Some(stall))
}

fn init_logging_with(
    level: Option<&str>,
    file: Option<&Path>,
    default: &str,
    daemon: Option<Duration>,
) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
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
    match (file, daemon) {
        // A daemon never waits for its log (see `logfile::non_blocking`).
        (Some(p), Some(stall)) => {
            let file = crate::logfile::open_within(p, stall)?;
            let w = crate::logfile::non_blocking(file, Some(p), stall);
            builder.with_ansi(false).with_writer(w).init();
        }
        (None, Some(stall)) => {
            let w = crate::logfile::non_blocking(Box::new(std::io::stderr()), None, stall);
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(w)
                .init();
        }
        (Some(p), None) => {
            let w = crate::logfile::open(p)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(w))
                .init();
        }
        (None, None) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
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

/// Everything a connection needs, resolved from flags, environment and file.
struct Connect {
    endpoints: Endpoints,
    token: Secret,
    origin: TokenOrigin,
    request_timeout: Duration,
    registry_page_size: u32,
}

/// The endpoints as flags and environment gave them (the groups a command
/// does not take come from the file or defaults), and whether plain http
/// off this machine is allowed (flag or file).
fn endpoints(
    id: &IdentityArgs,
    api: Option<&ApiArgs>,
    s3: Option<&S3Args>,
    file: &FileSettings,
) -> (Endpoints, bool) {
    let choice = EndpointChoice {
        domain: id.domain.clone(),
        realm: id.realm.clone(),
        auth_url: id.auth_url.clone(),
        api_url: api.and_then(|a| a.api_url.clone()),
        s3_endpoint: s3.and_then(|a| a.s3_endpoint.clone()),
        s3_region: s3.and_then(|a| a.s3_region.clone()),
    };
    let insecure = id.allow_insecure_http || file.allow_insecure_http.unwrap_or(false);
    (config::endpoints(&choice, file), insecure)
}

fn connect_settings(
    id: &IdentityArgs,
    token: &TokenArgs,
    api: &ApiArgs,
    s3: Option<&S3Args>,
    file: &FileSettings,
) -> Result<Connect, String> {
    let (endpoints, insecure) = endpoints(id, Some(api), s3, file);
    endpoints.check(insecure)?;
    let token_file = token.token_file.as_deref().map(absolute).transpose()?;
    let (token, origin) = config::offline_token(token_file.as_deref(), file)?;
    let secs = api
        .request_timeout
        .or(file.request_timeout)
        .unwrap_or(crate::retry::DEFAULT_REQUEST_TIMEOUT.as_secs());
    if secs == 0 {
        return Err("--request-timeout must be at least 1 second".into());
    }
    Ok(Connect {
        endpoints,
        token,
        origin,
        request_timeout: Duration::from_secs(secs),
        registry_page_size: api
            .registry_page_size
            .or(file.registry_page_size)
            .unwrap_or(ApiConfig::default().page_size)
            .clamp(1, 1000),
    })
}

/// A path made absolute against the current folder: a background mount's
/// daemon moves to `/`, and must still find the files it was given.
fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("cannot resolve {}: {e}", p.display()))
}

/// An authentication failure, with the token's origin named: a rejected
/// token names where it was found and what to do about that source.
fn token_error(e: AuthError, origin: &TokenOrigin) -> String {
    match e {
        AuthError::Rejected(why) => format!(
            "the offline token from {origin} was rejected by the identity service ({why}); {}",
            origin.fix()
        ),
        AuthError::NoRoles => format!(
            "the offline token from {origin} was created without the `roles` scope, and the data \
             store refuses such tokens; {} (`provenafs login` asks for `offline_access roles`)",
            match origin {
                TokenOrigin::Stored(_) => "run `provenafs login` for a new one".to_string(),
                _ => origin.fix(),
            }
        ),
        e => e.to_string(),
    }
}

fn session_error(e: AuthErrorOr, origin: &TokenOrigin) -> String {
    match e {
        AuthErrorOr::Auth(a) => token_error(a, origin),
        AuthErrorOr::Other(o) => o,
    }
}

/// The three clients' settings for `e`, each bounding one call by
/// `request_timeout`.
fn client_configs(e: Endpoints, request_timeout: Duration) -> (AuthConfig, ApiConfig, S3Config) {
    (
        AuthConfig {
            realm_url: e.auth_url,
            request_timeout,
            shared: None,
        },
        ApiConfig {
            base_url: e.api_url,
            request_timeout,
            ..ApiConfig::default()
        },
        S3Config {
            endpoint: e.s3_endpoint,
            region: e.s3_region,
            request_timeout,
            ..S3Config::default()
        },
    )
}

fn size_setting(flag: Option<u64>, file: &Option<String>, default: u64) -> Result<u64, String> {
    match (flag, file) {
        (Some(v), _) => Ok(v),
        (None, Some(s)) => parse_size(s),
        (None, None) => Ok(default),
    }
}

/// A permission mode from the flag, else the config file's key (a string).
fn mode_setting(flag: Option<u16>, file: &FileSettings, key: &str) -> Result<Option<u16>, String> {
    let text = match key {
        "file_mode" => &file.file_mode,
        _ => &file.dir_mode,
    };
    match (flag, text) {
        (Some(m), _) => Ok(Some(m)),
        (None, Some(t)) => parse_mode(t).map(Some).map_err(|e| {
            let at = file
                .path
                .as_ref()
                .map(|p| format!(" {}", p.display()))
                .unwrap_or_default();
            format!("config file{at}: {key}: {e}")
        }),
        (None, None) => Ok(None),
    }
}

fn mount_config(a: &MountArgs, file: &FileSettings) -> Result<(MountConfig, TokenOrigin), String> {
    let c = connect_settings(
        &a.connect.identity,
        &a.connect.token,
        &a.connect.api,
        Some(&a.connect.s3),
        file,
    )?;
    let request_timeout = c.request_timeout;
    let metadata_ttl = Duration::from_secs(a.metadata_ttl.or(file.metadata_ttl).unwrap_or(60));
    let (auth, mut api, mut s3) = client_configs(c.endpoints, request_timeout);
    api.page_size = c.registry_page_size;
    // A dataset the user may not read is refused from memory as long as
    // anything else is trusted.
    s3.refusal_ttl = metadata_ttl;
    let mut datasets = a.datasets.clone();
    if datasets.is_empty() {
        datasets = file
            .dataset
            .iter()
            .flatten()
            .map(|h| {
                crate::wire::normalize_handle(h).map_err(|e| format!("config file: dataset {e}"))
            })
            .collect::<Result<_, _>>()?;
    }
    let read_defaults = ReadConfig::default();
    let cache_dir = a
        .cache_dir
        .clone()
        .or_else(|| file.cache_dir.clone())
        .map(|d| absolute(&d))
        .transpose()?;
    let cache_size = size_setting(a.cache_size, &file.cache_size, 10 << 30)?;
    let cache_shared = a.cache_shared || file.cache_shared.unwrap_or(false);
    let cache_group = a.cache_group || file.cache_group.unwrap_or(false);
    if (cache_shared || cache_group) && cache_dir.is_none() {
        return Err("--cache-shared and --cache-group need --cache-dir".into());
    }
    let no_disk_cache = a.no_disk_cache || file.no_disk_cache.unwrap_or(false);
    if no_disk_cache && cache_dir.is_some() {
        return Err(
            "--no-disk-cache and a cache_dir (flag or config file) are at odds: drop one".into(),
        );
    }
    // A disk cache by default, as rclone users expect: the user's own
    // cache folder, kept across mounts.
    let (cache_dir, default_cache) = match cache_dir {
        Some(d) => (Some(d), false),
        None if no_disk_cache => (None, false),
        None => (crate::read::default_cache_dir(), true),
    };
    let mut fuse = FuseConfig::default();
    let from_file = |v: &Option<config::IdSetting>, parse: fn(&str) -> Result<u32, String>| {
        v.as_ref().map(|v| parse(&v.as_text())).transpose()
    };
    if let Some(uid) = a.uid.or(from_file(&file.uid, user_id)?) {
        fuse.uid = uid;
    }
    if let Some(gid) = a.gid.or(from_file(&file.gid, group_id)?) {
        fuse.gid = gid;
    }
    let file_mode = mode_setting(a.file_mode, file, "file_mode")?;
    let dir_mode = mode_setting(a.dir_mode, file, "dir_mode")?;
    if let Some(m) = file_mode {
        fuse.file_mode = m;
    }
    if let Some(m) = dir_mode {
        fuse.dir_mode = m;
    }
    fuse.request_timeout = request_timeout;
    let cfg = MountConfig {
        mountpoint: absolute(&a.mountpoint)?,
        token: c.token,
        auth,
        api,
        s3,
        tree: TreeConfig {
            metadata_ttl,
            registry_ttl: Duration::from_secs(a.registry_ttl.or(file.registry_ttl).unwrap_or(600)),
            released_ttl: Duration::from_secs(
                a.released_ttl.or(file.released_ttl).unwrap_or(24 * 3600),
            ),
            datasets: (!datasets.is_empty()).then_some(datasets),
            by_name: a.by_name || file.by_name.unwrap_or(false),
            request_timeout,
            ..TreeConfig::default()
        },
        read: ReadConfig {
            memory_cache: size_setting(
                a.memory_cache_size,
                &file.memory_cache_size,
                read_defaults.memory_cache,
            )?,
            max_inflight: size_setting(a.max_memory, &file.max_memory, read_defaults.max_inflight)?,
            max_window: size_setting(
                a.max_read_ahead,
                &file.max_read_ahead,
                read_defaults.max_window,
            )?,
            disk: cache_dir.map(|dir| DiskConfig {
                dir,
                limit: cache_size,
                shared: cache_shared,
                group: cache_group,
                default: default_cache,
            }),
            request_timeout,
            hints_dir: (!(a.no_read_hints || file.no_read_hints.unwrap_or(false)))
                .then(crate::logfile::state_dir)
                .flatten()
                .map(|d| d.join("hints")),
            passthrough: !(a.no_passthrough || file.no_passthrough.unwrap_or(false)),
            ..read_defaults
        },
        fuse,
        max_threads: a.max_threads.or(file.max_threads).unwrap_or(16),
        allow_other: a.allow_other || file.allow_other.unwrap_or(false),
        allow_root: a.allow_root || file.allow_root.unwrap_or(false),
        logs_to_file: false,
        explicit_modes: file_mode.is_some() || dir_mode.is_some(),
        log_file: None,
        announce: false,
    };
    Ok((cfg, c.origin))
}

/// A user: a number, or a name looked up in the user database.
fn user_id(s: &str) -> Result<u32, String> {
    id_of("user", s, |n| {
        nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw()))
    })
}

/// A group: a number, or a name looked up in the group database.
fn group_id(s: &str) -> Result<u32, String> {
    id_of("group", s, |n| {
        nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw()))
    })
}

fn id_of(
    what: &str,
    s: &str,
    by_name: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    match by_name(s) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!("no {what} named {s:?}")),
        Err(e) => Err(format!("cannot look up {what} {s:?}: {e}")),
    }
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

/// Permission bits in octal, as chmod(1) and mount-s3 take them: `0440`,
/// `440` or `0o440`; at most `0777` (no setuid, setgid or sticky bits).
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("{s:?} is not an octal mode (e.g. 0440)"));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m as u16),
        _ => Err(format!(
            "{s:?} is more than 0777 (setuid, setgid and sticky bits mean nothing here)"
        )),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("provenafs: {msg}");
    1
}

/// A usage error found outside clap (the `-o` translation), shown as clap
/// shows its own (message, usage line, `--help` hint), status 2.
fn usage_error(msg: &str, subcommand: Option<&str>) -> i32 {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    let err = clap::Error::raw(clap::error::ErrorKind::ValueValidation, msg);
    let err = match subcommand.and_then(|s| cmd.find_subcommand_mut(s)) {
        Some(sub) => err.format(sub),
        None => err.format(&mut cmd),
    };
    let _ = err.print();
    2
}

/// The long flags of `mount`, for translating `-o` options.
fn mount_flags() -> Vec<(String, bool)> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(mount) = cmd.find_subcommand("mount") else {
        return Vec::new();
    };
    mount
        .get_arguments()
        .filter_map(|a| {
            let takes = a.get_action().takes_values();
            a.get_long().map(|l| (l.to_string(), takes))
        })
        .collect()
}

/// Runs the command line; returns the exit status: 0 done (or help shown),
/// 1 a runtime failure, 2 a usage error (clap's convention).
pub fn main() -> i32 {
    let argv = match options::normalize(std::env::args_os().collect(), &mount_flags()) {
        Ok(a) => a,
        Err(e) => return usage_error(&e, Some("mount")),
    };
    if argv.get(1).is_some_and(|a| a == options::FAKE) {
        return 0;
    }
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            // clap's whole message: what is wrong, "did you mean", usage.
            let _ = e.print();
            return e.exit_code();
        }
    };
    let code = match run(cli.command) {
        Ok(()) => 0,
        Err(Exit::Message(m)) => fail(m),
        Err(Exit::Code(c)) => c,
    };
    if code != 0 {
        mount::signal_failed(code);
    }
    code
}

/// How a command ends when it does not succeed.
enum Exit {
    Message(String),
    /// Already reported.
    Code(i32),
}

impl From<String> for Exit {
    fn from(s: String) -> Self {
        Exit::Message(s)
    }
}

fn run(command: Command) -> Result<(), Exit> {
    match command {
        Command::Mount(a) => mount(*a),
        Command::Unmount { mountpoint, lazy } => Ok(mount::unmount_command(&mountpoint, lazy)?),
        Command::Status { mountpoint, json } => {
            let out = crate::status::run(mountpoint.as_deref(), json)?;
            print_out(&out)
        }
        Command::Provenance(a) => provenance::run(*a),
        Command::Login(a) => account::login(a),
        Command::Logout(a) => account::logout(a),
        Command::Whoami(a) => account::whoami(a),
        Command::Datasets(a) => {
            init_logging(None, None, "error")?;
            let rt = runtime()?;
            let session = rt.block_on(connect(&a.identity, &a.token, &a.api, None))?;
            let out = rt.block_on(crate::browse::datasets(
                &session.api,
                a.search.as_deref(),
                a.json,
            ))?;
            print_out(&out)
        }
        Command::Ls(a) => {
            init_logging(None, None, "error")?;
            let rt = runtime()?;
            let session = rt.block_on(a.connect.session(None))?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            rt.block_on(crate::browse::ls(
                &session,
                &a.target,
                a.recursive,
                a.human,
                &mut out,
            ))?;
            Ok(())
        }
        Command::Generate { what } => generate(what),
        Command::Credentials(a) => tools::credentials(a),
        Command::Url(a) => tools::url(a),
        Command::Prefetch(a) => prefetch::prefetch(*a),
        Command::Sim(a) => {
            init_logging(a.log.level().as_deref(), a.log.log_file.as_deref(), "info")?;
            runtime().and_then(|rt| rt.block_on(sim::run(a)))?;
            Ok(())
        }
        Command::Demo { mountpoint, log } => {
            init_daemon_logging(
                log.level().as_deref(),
                log.log_file.as_deref(),
                "warn",
                crate::retry::stall_timeout(crate::retry::DEFAULT_REQUEST_TIMEOUT),
            )?;
            crate::demo::run(&mountpoint)?;
            Ok(())
        }
    }
}

/// Whether systemd runs us with its journal on standard error (a service
/// unit): logs then stay there.
fn under_systemd() -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        return true;
    }
    // JOURNAL_STREAM is inherited by every shell of a desktop session; it
    // means "stderr is the journal" only while stderr is that stream
    // (systemd.exec(5): compare its device and inode).
    let Some(v) = std::env::var("JOURNAL_STREAM").ok() else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// Creates `dir` (and its parents) readable by its owner only: a log
/// names datasets, files and errors.
/// Creates `dir` (0700) as the log's folder, given up after `stall` (an
/// NFS home that hangs: see [`crate::folder`]).
fn private_dir(dir: &Path, stall: Duration) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let folder = crate::folder::Folder::new("log folder", dir, "not logging", stall, 1);
    let d = dir.to_path_buf();
    folder
        .run_blocking("make the log folder", move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
        })
        .map_err(|e| format!("cannot create the log folder {}: {e}", dir.display()))
}

fn mount(a: MountArgs) -> Result<(), Exit> {
    let file = config::load(a.connect.identity.config.as_deref())?;
    let (mut cfg, origin) = mount_config(&a, &file)?;
    let level = a.log.level().or(file.log_level.clone());
    let explicit_log = a
        .log
        .log_file
        .clone()
        .or(file.log_file.clone())
        .map(|p| absolute(&p))
        .transpose()?;
    // The parent of a background mount computes the same place as the
    // detached child it starts, to tell the user where the logs are.
    let background = !a.foreground || mount::is_detached_child();
    // Only a foreground mount keeps a journal on its stderr: a detached
    // child's stderr goes to /dev/null once it is mounted.
    let journal = !background && under_systemd();
    let default_log = if explicit_log.is_none() && background && !journal {
        crate::logfile::default_path(&cfg.mountpoint)
    } else {
        None
    };
    // A user without a writable home (a service account) still mounts;
    // the parent says it is not logging, and why.
    let mut no_log_because = None;
    let stall = crate::retry::stall_timeout(cfg.read.request_timeout);
    let default_log = default_log.filter(|p| match p.parent().map(|d| private_dir(d, stall)) {
        Some(Err(e)) => {
            no_log_because = Some(e);
            false
        }
        _ => true,
    });
    let log_path = explicit_log.or(default_log.clone());
    cfg.logs_to_file = log_path.is_some();
    cfg.log_file = log_path.clone();
    cfg.announce = a.foreground && !mount::is_detached_child();
    if !a.foreground {
        // Check what can be checked before detaching, for a fast answer.
        mount::check_mountpoint(&cfg.mountpoint).map_err(|e| e.to_string())?;
        // Each step of the child's start is bounded: the token exchange,
        // the data store and S3 checks and each pinned dataset by the
        // request timeout, each folder by the stall timeout.
        let steps = 4 + cfg.tree.datasets.as_ref().map_or(0, Vec::len) as u32;
        let ready_within = cfg.read.request_timeout * steps + Duration::from_secs(30);
        return match mount::spawn_detached(ready_within) {
            Ok(()) => {
                let logs = match (&log_path, &no_log_because) {
                    (Some(p), _) => format!("; logs in {}", p.display()),
                    (None, _) if journal => "; logs to the journal".to_string(),
                    (None, Some(why)) => format!("; not logging ({why}; use --log-file)"),
                    (None, None) => String::new(),
                };
                // On standard error, as every other word of ours: a job
                // script's standard output stays its own.
                eprintln!("provenafs: mounted at {}{logs}", cfg.mountpoint.display());
                Ok(())
            }
            Err(mount::MountError::ChildFailed(code)) => Err(Exit::Code(code)),
            Err(e) => Err(e.to_string().into()),
        };
    }
    // fuser warns about an unmount that already happened; not news.
    init_daemon_logging(
        level.as_deref(),
        log_path.as_deref(),
        "warn,fuser=error",
        crate::retry::stall_timeout(cfg.read.request_timeout),
    )?;
    let rt = runtime()?;
    let served = mount::run(cfg, &rt).map_err(|e| match e {
        mount::MountError::Auth(a) => token_error(a, &origin),
        e => e.to_string(),
    });
    // Unmounted: do not wait for work stuck in the blocking pool (a
    // disk cache on a stalled file system) before exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    // What the mount left to do in its folders (claims of fetches just
    // dropped to end, blocks to write), unless a folder does not answer.
    crate::folder::settle_all(std::time::Duration::from_secs(1));
    served?;
    Ok(())
}

/// `provenafs generate`: the man page (every subcommand's options in it)
/// or a shell's completions, on standard output.
fn generate(what: Generated) -> Result<(), Exit> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut buf: Vec<u8> = Vec::new();
    let shell = match what {
        Generated::Man => {
            man_page(cmd, &mut buf).map_err(|e| format!("cannot render the man page: {e}"))?;
            return print_out(&String::from_utf8_lossy(&buf));
        }
        Generated::CompleteBash => clap_complete::Shell::Bash,
        Generated::CompleteZsh => clap_complete::Shell::Zsh,
        Generated::CompleteFish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "provenafs", &mut buf);
    print_out(&String::from_utf8_lossy(&buf))
}

/// One page: the command, then a section per subcommand with its usage,
/// description and options, so `man provenafs` answers about `mount -o`.
fn man_page(mut cmd: clap::Command, w: &mut Vec<u8>) -> std::io::Result<()> {
    cmd.build();
    clap_mangen::Man::new(cmd.clone()).render(w)?;
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let man = clap_mangen::Man::new(sub.clone());
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim_start_matches("Usage: ");
        let mut text = format!(".SH \"PROVENAFS {}\"\n", sub.get_name().to_uppercase());
        text.push_str(&format!(".B {}\n.PP\n", roff_escape(usage)));
        let mut desc = Vec::new();
        man.render_description_section(&mut desc)?;
        let mut opts = Vec::new();
        man.render_options_section(&mut opts)?;
        // The sections' own headings would repeat DESCRIPTION and OPTIONS
        // once per subcommand; the subcommand's heading is enough.
        for part in [desc, opts] {
            let part = String::from_utf8_lossy(&part).into_owned();
            let body: Vec<&str> = part.lines().filter(|l| !l.starts_with(".SH")).collect();
            text.push_str(&body.join("\n"));
            text.push('\n');
        }
        w.extend_from_slice(text.as_bytes());
    }
    Ok(())
}

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// Writes command output; a closed pipe (`| head`) is not an error.
fn print_out(s: &str) -> Result<(), Exit> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write output: {e}").into()),
    }
}

async fn connect(
    id: &IdentityArgs,
    token: &TokenArgs,
    api: &ApiArgs,
    s3: Option<&S3Args>,
) -> Result<Session, String> {
    connect_sharing(id, token, api, s3, None).await
}

/// [`connect`], sharing the access token and read credentials through a
/// shared cache folder when given one (see [`crate::session::share_leases`]).
async fn connect_sharing(
    id: &IdentityArgs,
    token: &TokenArgs,
    api: &ApiArgs,
    s3: Option<&S3Args>,
    shared_cache: Option<&Path>,
) -> Result<Session, String> {
    let file = config::load(id.config.as_deref())?;
    let s = connect_settings(id, token, api, s3, &file)?;
    let (mut auth, mut api, mut s3) = client_configs(s.endpoints, s.request_timeout);
    api.page_size = s.registry_page_size;
    if let Some(dir) = shared_cache {
        crate::session::share_leases(dir, &s.token, &mut auth, &api, &mut s3);
    }
    Session::connect(s.token, auth, api, s3)
        .await
        .map_err(|e| session_error(e, &s.origin))
}

#[cfg(test)]
mod tests {
    #[test]
    fn users_and_groups_by_number_or_name() {
        assert_eq!(super::user_id("0"), Ok(0));
        assert_eq!(super::user_id("root"), Ok(0));
        assert_eq!(super::group_id("1234"), Ok(1234));
        assert_eq!(super::group_id("root"), Ok(0));
        assert!(super::group_id("no-such-group-here")
            .unwrap_err()
            .contains("no group"));
    }

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
    fn modes_are_octal_and_at_most_0777() {
        use super::parse_mode;
        assert_eq!(parse_mode("0440"), Ok(0o440));
        assert_eq!(parse_mode("440"), Ok(0o440));
        assert_eq!(parse_mode("0o550"), Ok(0o550));
        assert_eq!(parse_mode("0777"), Ok(0o777));
        assert_eq!(parse_mode("0"), Ok(0));
        assert!(parse_mode("0888")
            .unwrap_err()
            .contains("not an octal mode"));
        assert!(parse_mode("rw-r-----").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("-440").is_err());
        assert!(parse_mode("4755").unwrap_err().contains("more than 0777"));
        assert!(parse_mode("77777777777").is_err());
    }
}
