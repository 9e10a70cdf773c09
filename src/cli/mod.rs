//! Command line: flags, environment and the config file into plain config
//! structs, then run. Only this module (with [`crate::config`]) reads
//! flags, environment variables and settings files.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::ApiConfig;
use crate::auth::AuthConfig;
use crate::config::{self, EndpointChoice, Endpoints, FileSettings};
use crate::fs::fuse::FuseConfig;
use crate::fs::tree::TreeConfig;
use crate::mount::{self, MountConfig};
use crate::read::{DiskConfig, ReadConfig};
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::session::Session;
use crate::sim::SimConfig;

mod options;

/// Settings every command that talks to a deployment takes. Each may also
/// come from the environment variable named in `--help`, or from the config
/// file; the order is flag, environment, config file, default.
#[derive(Args, Clone, Debug, Default)]
pub struct ConnectArgs {
    /// Config file [default: $XDG_CONFIG_HOME/provenafs/config.toml].
    #[arg(long, env = "PROVENAFS_CONFIG", global = true)]
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
    /// Data store API base URL (overrides --domain).
    #[arg(long, env = "PROVENA_API_URL")]
    pub api_url: Option<String>,
    /// S3 endpoint URL [default: AWS S3 itself].
    #[arg(long, env = "PROVENA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: ap-southeast-2].
    #[arg(long, env = "PROVENA_S3_REGION")]
    pub s3_region: Option<String>,
    /// Read the offline token from this file [default: RRAP_OFFLINE_TOKEN,
    /// then the config file's token_file, then the token `provenafs login` stored].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Allow plain http:// endpoints that are not on this machine (tokens
    /// would cross the network unencrypted).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Seconds any one operation may take, retries included: a read,
    /// listing or lookup that gets no answer in time fails with ETIMEDOUT
    /// [default: 30].
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<u64>,
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
    Mount(MountArgs),
    /// Unmount a provenafs mount (works for root and for the user who mounted it).
    Unmount {
        mountpoint: PathBuf,
        /// Detach a busy mount now; it goes when its last user does.
        #[arg(short, long)]
        lazy: bool,
    },
    /// Sign in through the browser (OAuth2 device flow) and store the offline token.
    Login(LoginArgs),
    /// Delete the offline token `provenafs login` stored.
    Logout,
    /// List the datasets you can see.
    Datasets(DatasetsArgs),
    /// List a dataset's files by handle, like `aws s3 ls`: HANDLE[/PATH].
    Ls(LsArgs),
    /// Run the local Provena emulator (identity, data store API, S3) over a folder.
    Sim(SimArgs),
    /// Generate sample datasets, run the emulator and mount it in the foreground.
    Demo {
        mountpoint: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log to this file instead of standard error.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a RUST_LOG-style directive.
    #[arg(long, env = "PROVENAFS_LOG")]
    pub log_level: Option<String>,
}

#[derive(Args, Clone)]
pub struct LoginArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
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
pub struct DatasetsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Only datasets whose handle, name or description hold every word.
    #[arg(long)]
    pub search: Option<String>,
}

#[derive(Args, Clone)]
pub struct LsArgs {
    /// HANDLE or HANDLE/PATH, e.g. 10378.1/1687966/data
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
    /// Stay attached; unmount on Ctrl-C / SIGTERM.
    #[arg(short, long)]
    pub foreground: bool,
    /// Show only this dataset (repeatable); the registry is never listed.
    #[arg(long = "dataset", value_name = "HANDLE")]
    pub datasets: Vec<String>,
    /// Add `by-name/<dataset name>`: symlinks to the handle folders.
    #[arg(long)]
    pub by_name: bool,
    /// Seconds listings and attributes are trusted before asking again [default: 60].
    #[arg(long)]
    pub metadata_ttl: Option<u64>,
    /// FUSE worker threads [default: 16].
    #[arg(long)]
    pub max_threads: Option<usize>,
    /// Memory block cache budget, e.g. 96MiB, 1GiB [default: 96MiB].
    #[arg(long, value_parser = parse_size)]
    pub memory_cache_size: Option<u64>,
    /// Bytes of read-ahead GETs in flight at once, all files together [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Largest read-ahead window of one file [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub max_read_ahead: Option<u64>,
    /// Keep fetched blocks on disk in this folder (created 0700).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
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
    /// Owner shown for every file [default: the mounting user].
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group shown for every file [default: the mounting user's group].
    #[arg(long)]
    pub gid: Option<u32>,
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
    /// Seconds a device login stays open.
    #[arg(long, default_value_t = 600)]
    pub device_expires_in: u64,
    /// Answer `slow_down` to polls closer than this many seconds, whatever
    /// interval was advertised (a busy server).
    #[arg(long, default_value_t = 0)]
    pub device_min_interval: u64,
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
    /// S3 requests whose key (or listing prefix or continuation token)
    /// contains TEXT are accepted and never answered (until cleared through
    /// `POST /_sim/faults?s3_hang=`).
    #[arg(long, value_name = "TEXT")]
    pub s3_hang: Option<String>,
    /// Identity and data store requests are accepted and never answered
    /// (until `POST /_sim/faults?api_hang=0`).
    #[arg(long)]
    pub api_hang: bool,
    /// Seconds the S3 side's clock runs ahead (negative: behind); beyond 15
    /// minutes requests answer RequestTimeTooSkewed.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub clock_skew: i64,
    /// First write the demo's sample datasets into --root.
    #[arg(long)]
    pub sample_data: bool,
    #[command(flatten)]
    pub log: LogArgs,
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
            use std::os::unix::fs::OpenOptionsExt;
            // Created readable by its owner only: a log names datasets,
            // keys and errors other users need not see.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| format!("cannot open log file {}: {e}", p.display()))?;
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

/// Everything a connection needs, resolved from flags, environment and file.
struct Connect {
    endpoints: Endpoints,
    token: Secret,
    request_timeout: Duration,
}

impl ConnectArgs {
    /// The endpoints as flags and environment gave them, and whether plain
    /// http off this machine is allowed (flag or file).
    fn endpoints(&self, file: &FileSettings) -> (Endpoints, bool) {
        let choice = EndpointChoice {
            domain: self.domain.clone(),
            realm: self.realm.clone(),
            auth_url: self.auth_url.clone(),
            api_url: self.api_url.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
        };
        let insecure = self.allow_insecure_http || file.allow_insecure_http.unwrap_or(false);
        (config::endpoints(&choice, file), insecure)
    }
}

fn connect_settings(c: &ConnectArgs, file: &FileSettings) -> Result<Connect, String> {
    let (endpoints, insecure) = c.endpoints(file);
    endpoints.check(insecure)?;
    let token = config::offline_token(c.token_file.as_deref(), file)?;
    let secs = c
        .request_timeout
        .or(file.request_timeout)
        .unwrap_or(crate::retry::DEFAULT_REQUEST_TIMEOUT.as_secs());
    if secs == 0 {
        return Err("--request-timeout must be at least 1 second".into());
    }
    Ok(Connect {
        endpoints,
        token,
        request_timeout: Duration::from_secs(secs),
    })
}

/// The three clients' settings for `e`, each bounding one call by
/// `request_timeout`.
fn client_configs(e: Endpoints, request_timeout: Duration) -> (AuthConfig, ApiConfig, S3Config) {
    (
        AuthConfig {
            realm_url: e.auth_url,
            request_timeout,
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

fn mount_config(a: &MountArgs, file: &FileSettings) -> Result<MountConfig, String> {
    let c = connect_settings(&a.connect, file)?;
    let request_timeout = c.request_timeout;
    let metadata_ttl = Duration::from_secs(a.metadata_ttl.or(file.metadata_ttl).unwrap_or(60));
    let (auth, api, mut s3) = client_configs(c.endpoints, request_timeout);
    // A dataset the user may not read is refused from memory as long as
    // anything else is trusted.
    s3.refusal_ttl = metadata_ttl;
    let mut datasets = a.datasets.clone();
    if datasets.is_empty() {
        datasets = file.dataset.clone().unwrap_or_default();
    }
    for h in &datasets {
        if crate::wire::split_handle(h).is_none() {
            return Err(format!("--dataset {h:?} is not a handle (PREFIX/SUFFIX)"));
        }
    }
    let read_defaults = ReadConfig::default();
    let cache_dir = a.cache_dir.clone().or_else(|| file.cache_dir.clone());
    let cache_size = size_setting(a.cache_size, &file.cache_size, 10 << 30)?;
    let cache_shared = a.cache_shared || file.cache_shared.unwrap_or(false);
    let cache_group = a.cache_group || file.cache_group.unwrap_or(false);
    if (cache_shared || cache_group) && cache_dir.is_none() {
        return Err("--cache-shared and --cache-group need --cache-dir".into());
    }
    let mut fuse = FuseConfig::default();
    if let Some(uid) = a.uid.or(file.uid) {
        fuse.uid = uid;
    }
    if let Some(gid) = a.gid.or(file.gid) {
        fuse.gid = gid;
    }
    fuse.request_timeout = request_timeout;
    Ok(MountConfig {
        mountpoint: a.mountpoint.clone(),
        token: c.token,
        auth,
        api,
        s3,
        tree: TreeConfig {
            metadata_ttl,
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
            }),
            request_timeout,
            ..read_defaults
        },
        fuse,
        max_threads: a.max_threads.or(file.max_threads).unwrap_or(16),
        allow_other: a.allow_other || file.allow_other.unwrap_or(false),
        allow_root: a.allow_root || file.allow_root.unwrap_or(false),
        logs_to_file: false,
        explicit_modes: false,
        log_file: None,
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

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let argv = match options::normalize(std::env::args_os().collect(), &mount_flags()) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    if argv.get(1).is_some_and(|a| a == options::FAKE) {
        return 0;
    }
    let cli = match Cli::try_parse_from(argv) {
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
    match run(cli.command) {
        Ok(()) => 0,
        Err(Exit::Message(m)) => fail(m),
        Err(Exit::Code(c)) => c,
    }
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

fn file_settings(c: &ConnectArgs) -> Result<FileSettings, String> {
    config::load(c.config.as_deref())
}

fn run(command: Command) -> Result<(), Exit> {
    match command {
        Command::Mount(a) => {
            let file = file_settings(&a.connect)?;
            let mut cfg = mount_config(&a, &file)?;
            let log = LogArgs {
                log_file: a.log.log_file.clone().or(file.log_file.clone()),
                log_level: a.log.log_level.clone().or(file.log_level.clone()),
            };
            cfg.logs_to_file = log.log_file.is_some();
            cfg.log_file = log.log_file.clone();
            if !a.foreground {
                // Check what can be checked before detaching, for a fast answer.
                mount::check_mountpoint(&cfg.mountpoint).map_err(|e| e.to_string())?;
                return match mount::spawn_detached() {
                    Ok(()) => Ok(()),
                    Err(mount::MountError::ChildFailed(code)) => Err(Exit::Code(code)),
                    Err(e) => Err(e.to_string().into()),
                };
            }
            // fuser warns about an unmount that already happened; not news.
            init_logging(&log, "warn,fuser=error")?;
            let rt = runtime()?;
            let served = mount::run(cfg, &rt).map_err(|e| e.to_string());
            // Unmounted: do not wait for work stuck in the blocking pool (a
            // disk cache on a stalled file system) before exiting.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            served?;
            Ok(())
        }
        Command::Unmount { mountpoint, lazy } => Ok(mount::unmount_command(&mountpoint, lazy)?),
        Command::Login(a) => login(a),
        Command::Logout => {
            let Some(p) = config::stored_token_path() else {
                return Err(
                    "cannot tell where the token is stored: set HOME or XDG_CONFIG_HOME"
                        .to_string()
                        .into(),
                );
            };
            match std::fs::remove_file(&p) {
                Ok(()) => eprintln!("Removed {}", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("Not logged in (no {})", p.display())
                }
                Err(e) => return Err(format!("cannot remove {}: {e}", p.display()).into()),
            }
            Ok(())
        }
        Command::Datasets(a) => {
            init_logging(&LogArgs::default(), "error")?;
            let rt = runtime()?;
            let session = rt.block_on(connect(&a.connect))?;
            let out = rt.block_on(crate::browse::datasets(
                &session.api,
                a.search.as_deref(),
                a.json,
            ))?;
            print_out(&out)
        }
        Command::Ls(a) => {
            init_logging(&LogArgs::default(), "error")?;
            let rt = runtime()?;
            let session = rt.block_on(connect(&a.connect))?;
            let out = rt.block_on(crate::browse::ls(&session, &a.target, a.recursive, a.human))?;
            print_out(&out)
        }
        Command::Sim(a) => {
            init_logging(&a.log, "info")?;
            runtime().and_then(|rt| rt.block_on(run_sim(a)))?;
            Ok(())
        }
        Command::Demo { mountpoint, log } => {
            init_logging(&log, "warn")?;
            crate::demo::run(&mountpoint)?;
            Ok(())
        }
    }
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

async fn connect(c: &ConnectArgs) -> Result<Session, String> {
    let file = file_settings(c)?;
    let s = connect_settings(c, &file)?;
    let (auth, api, s3) = client_configs(s.endpoints, s.request_timeout);
    Session::connect(s.token, auth, api, s3)
        .await
        .map_err(|e| e.to_string())
}

fn login(a: LoginArgs) -> Result<(), Exit> {
    init_logging(&LogArgs::default(), "error")?;
    let file = file_settings(&a.connect)?;
    // Only the identity service is involved.
    let (e, insecure) = a.connect.endpoints(&file);
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
            eprintln!(
                "Offline token stored in {} (readable only by you). `provenafs mount` will use it.",
                p.display()
            );
            Ok(())
        }
    }
}

async fn run_sim(a: SimArgs) -> Result<(), String> {
    if a.sample_data {
        crate::demo::generate(&a.root)
            .map_err(|e| format!("cannot write sample data in {}: {e}", a.root.display()))?;
    }
    let cfg = SimConfig {
        root: a.root,
        addr: a.addr,
        access_token_ttl: a.access_token_ttl,
        credentials_ttl: a.credentials_ttl,
        page_size: a.page_size.max(1),
        s3_page_size: a.page_size.clamp(1, 1000),
        deny: a.deny,
        device_interval: a.device_interval,
        device_expires_in: a.device_expires_in,
        device_min_interval: a.device_min_interval,
        auto_approve: a.auto_approve,
        s3_fault_rate: a.s3_fault_rate,
        api_fault_rate: a.api_fault_rate,
        latency_ms: a.latency_ms,
        extra_keys: a.extra_keys,
        s3_hang: a.s3_hang,
        api_hang: a.api_hang,
        clock_skew: a.clock_skew,
    };
    let sim = crate::sim::Sim::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let lines = sim.env.shell();
    if let Some(p) = &a.env_file {
        config::write_private(p, &lines)
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
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
}
