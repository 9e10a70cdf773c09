//! `provenafs credentials` and `provenafs url`: the same credential chain
//! for other tools (boto3, the AWS CLI, GDAL, fsspec, rclone).
//!
//! `credentials` is meant to run as an AWS `credential_process`: its
//! standard output is the JSON the AWS SDKs read and nothing else, and its
//! only other words are one line on standard error when it fails (the SDKs
//! show that line to the user). The secret key and session token go to
//! standard output only, never into an error or a log line.

use std::time::{Duration, SystemTime};

use clap::Args;
use serde::Serialize;

use super::{ConnectArgs, Exit};
use crate::api::IssuedCredentials;
use crate::s3::{S3Error, StoreFactory};
use crate::session::Session;
use crate::wire::{parse_expiry, split_target};

#[derive(Args, Clone)]
pub struct CredentialsArgs {
    /// The dataset handle, e.g. 10378.1/1687966 (also as
    /// https://hdl.handle.net/10378.1/1687966).
    #[arg(value_parser = crate::wire::normalize_handle)]
    pub handle: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `export AWS_...=` lines for a shell instead of credential_process
    /// JSON: the keys, the region, and the S3 endpoint when --s3-endpoint
    /// (PROVENA_S3_ENDPOINT) names one.
    #[arg(long)]
    pub env: bool,
}

#[derive(Args, Clone)]
pub struct UrlArgs {
    /// HANDLE or HANDLE/PATH, e.g. 10378.1/1687966/data/sst.csv (also as
    /// https://hdl.handle.net/10378.1/1687966/data/sst.csv).
    pub target: String,
    // S3 is asked whether a PATH exists: every group.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The JSON an AWS `credential_process` prints (version 1 of the format,
/// as the AWS CLI and SDKs document it), fields in the documented order.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessCredentials<'a> {
    version: u8,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: &'a str,
    expiration: String,
}

/// `provenafs credentials HANDLE [--env]`.
pub fn credentials(a: CredentialsArgs) -> Result<(), Exit> {
    // Only errors by default: a credential_process's standard error is
    // shown to the user by the SDK when it fails, and should say why in
    // one line.
    super::init_logging(None, None, "error")?;
    let file = crate::config::load(a.connect.identity.config.as_deref())?;
    // The same endpoints `connect` will use; --env names S3's.
    let (endpoints, _) = super::endpoints(
        &a.connect.identity,
        Some(&a.connect.api),
        Some(&a.connect.s3),
        &file,
    );
    let rt = super::runtime()?;
    let issued = rt.block_on(async {
        let session = a.connect.session(None).await?;
        session
            .api
            .read_credentials(&a.handle, session.deadline())
            .await
            // The service's refusal does not name the dataset; say which.
            .map_err(|e| format!("cannot get read credentials for dataset {}: {e}", a.handle))
    })?;
    let expiration = expiration(&issued, SystemTime::now())?;
    let out = if a.env {
        env_lines(
            &issued,
            &expiration,
            &endpoints.s3_region,
            endpoints.s3_endpoint.as_deref(),
        )
    } else {
        process_json(&issued, expiration)?
    };
    super::print_out(&out)
}

/// The credentials' expiry as the local clock will see it, ISO 8601 in UTC
/// to the second (`2026-11-30T07:00:00Z`, what credential_process takes).
///
/// The service's clock (its `Date` header) measures how long they last,
/// and that lifetime is added to the local clock: a tool compares
/// `Expiration` with its own clock, and on a machine whose clock is behind
/// it would otherwise use the credentials after S3 stopped taking them.
fn expiration(issued: &IssuedCredentials, now: SystemTime) -> Result<String, String> {
    let raw = &issued.credentials.expiry;
    let expiry = parse_expiry(raw).ok_or_else(|| {
        format!("the data store sent a credential expiry {raw:?} that is not ISO 8601")
    })?;
    let local = match issued.server_time {
        Some(server) => now + expiry.duration_since(server).unwrap_or(Duration::ZERO),
        None => expiry,
    };
    let t: chrono::DateTime<chrono::Utc> = local.into();
    // Whole seconds, rounded down: never later than the truth.
    Ok(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The credential_process JSON, pretty-printed, with a final newline.
fn process_json(issued: &IssuedCredentials, expiration: String) -> Result<String, String> {
    let c = &issued.credentials;
    let body = ProcessCredentials {
        version: 1,
        access_key_id: &c.aws_access_key_id,
        secret_access_key: &c.aws_secret_access_key,
        session_token: &c.aws_session_token,
        expiration,
    };
    serde_json::to_string_pretty(&body)
        .map(|s| s + "\n")
        // serde_json's error names no value, so no secret can be in it.
        .map_err(|e| format!("cannot write the credentials: {e}"))
}

/// `export` lines for `eval "$(provenafs credentials --env HANDLE)"`.
///
/// The region is always given: the tools' own default (us-east-1, or
/// none) is not where a Provena bucket lives, and GDAL does not follow
/// S3's redirect to the right one. Both names are set, `AWS_REGION` (the
/// AWS CLI v2, the SDKs, GDAL) and `AWS_DEFAULT_REGION` (boto3 and the
/// AWS CLI v1 read only this one). The endpoint is given only when it is
/// not AWS S3 itself (an emulator or another S3-compatible store), as
/// `AWS_ENDPOINT_URL_S3`, which boto3, the AWS CLI and the SDKs read.
fn env_lines(
    issued: &IssuedCredentials,
    expiration: &str,
    region: &str,
    endpoint: Option<&str>,
) -> String {
    let c = &issued.credentials;
    let mut vars = vec![
        ("AWS_ACCESS_KEY_ID", c.aws_access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", c.aws_secret_access_key.as_str()),
        ("AWS_SESSION_TOKEN", c.aws_session_token.as_str()),
        // botocore and the AWS SDKs read it: they then know when the
        // keys stop working.
        ("AWS_CREDENTIAL_EXPIRATION", expiration),
        ("AWS_REGION", region),
        ("AWS_DEFAULT_REGION", region),
    ];
    if let Some(ep) = endpoint {
        vars.push(("AWS_ENDPOINT_URL_S3", ep));
    }
    vars.iter()
        .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
        .collect()
}

/// `s` as one shell word: single-quoted, a `'` inside written `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `provenafs url HANDLE[/PATH]`.
pub fn url(a: UrlArgs) -> Result<(), Exit> {
    super::init_logging(None, None, "error")?;
    let (handle, path) = split_target(&a.target)?;
    let rt = super::runtime()?;
    let url = rt.block_on(async {
        let session = a.connect.session(None).await?;
        locate(&session, &handle, &path).await
    })?;
    super::print_out(&format!("{url}\n"))
}

/// The `s3://bucket/key` of `path` in dataset `handle`: the dataset's
/// prefix for an empty path (ending in `/`), a file's key, or a folder's
/// prefix (ending in `/`). S3 is asked only when there is a path: a file
/// is one HEAD, a folder one LIST of at most one key (S3 has no empty
/// folders: a prefix with nothing below it does not exist). A key that is
/// both a file and a folder (`a` and `a/b`) is taken for the file, unless
/// the path ends in `/`.
async fn locate(session: &Session, handle: &str, path: &str) -> Result<String, String> {
    let item = session
        .api
        .fetch_dataset(handle, session.deadline())
        .await
        .map_err(|e| e.to_string())?;
    // The record's bucket and path as given (the service derives them);
    // the prefix as a folder, whatever its slashes.
    let bucket = &item.s3.bucket_name;
    let mut root = item.s3.path.trim_start_matches('/').to_string();
    if !root.is_empty() && !root.ends_with('/') {
        root.push('/');
    }
    if path.is_empty() {
        return Ok(format!("s3://{bucket}/{root}"));
    }
    let store = session.stores.open(handle, bucket);
    let key = format!("{root}{path}");
    let missing = || format!("no such file or folder: {handle}/{path}");
    if !path.ends_with('/') {
        match store.head(&key, session.deadline()).await {
            Ok(_) => return Ok(format!("s3://{bucket}/{key}")),
            Err(S3Error::NotFound) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let folder = if key.ends_with('/') { key } else { key + "/" };
    let page = store
        .list(&folder, Some("/"), None, Some(1), session.deadline())
        .await
        .map_err(|e| e.to_string())?;
    if page.objects.is_empty() && page.prefixes.is_empty() {
        return Err(missing());
    }
    Ok(format!("s3://{bucket}/{folder}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::AwsCredentials;

    fn issued(expiry: &str, server_time: Option<SystemTime>) -> IssuedCredentials {
        IssuedCredentials {
            credentials: AwsCredentials {
                aws_access_key_id: "ASIAKEY".into(),
                aws_secret_access_key: "se'cret".into(),
                aws_session_token: "token".into(),
                expiry: expiry.into(),
            },
            server_time,
        }
    }

    #[test]
    fn expiration_is_utc_to_the_second() {
        let i = issued("2026-11-30T17:00:00.75+10:00", None);
        assert_eq!(
            expiration(&i, SystemTime::now()).unwrap(),
            "2026-11-30T07:00:00Z"
        );
        assert!(expiration(&issued("tomorrow", None), SystemTime::now())
            .unwrap_err()
            .contains("not ISO 8601"));
    }

    #[test]
    fn expiration_follows_the_local_clock() {
        // The service says 08:00 and the keys last until 16:00; this
        // machine's clock says 07:50, so they last until 15:50 on it.
        let at = |s: &str| parse_expiry(s).unwrap();
        let i = issued("2026-11-30T16:00:00Z", Some(at("2026-11-30T08:00:00Z")));
        assert_eq!(
            expiration(&i, at("2026-11-30T07:50:00Z")).unwrap(),
            "2026-11-30T15:50:00Z"
        );
    }

    #[test]
    fn process_json_has_the_documented_fields() {
        let i = issued("2026-11-30T07:00:00Z", None);
        let text = process_json(&i, "2026-11-30T07:00:00Z".into()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["Version"], 1);
        assert_eq!(v["AccessKeyId"], "ASIAKEY");
        assert_eq!(v["SecretAccessKey"], "se'cret");
        assert_eq!(v["SessionToken"], "token");
        assert_eq!(v["Expiration"], "2026-11-30T07:00:00Z");
        assert_eq!(v.as_object().unwrap().len(), 5);
    }

    #[test]
    fn env_lines_are_shell_safe_and_name_the_endpoint_only_when_set() {
        let i = issued("2026-11-30T07:00:00Z", None);
        let aws = env_lines(&i, "2026-11-30T07:00:00Z", "ap-southeast-2", None);
        assert!(aws.contains("export AWS_SECRET_ACCESS_KEY='se'\\''cret'\n"));
        assert!(aws.contains("export AWS_REGION='ap-southeast-2'\n"));
        assert!(aws.contains("export AWS_DEFAULT_REGION='ap-southeast-2'\n"));
        assert!(!aws.contains("AWS_ENDPOINT_URL_S3"));
        let sim = env_lines(&i, "x", "ap-southeast-2", Some("http://127.0.0.1:9"));
        assert!(sim.ends_with("export AWS_ENDPOINT_URL_S3='http://127.0.0.1:9'\n"));
    }
}
