//! The JSON shapes of Keycloak and the Provena data store API.
//!
//! Shared by the client (`auth`, `api`) and the emulator (`sim`) so the two
//! cannot drift apart silently. Every shape here comes from
//! `docs/provena-api.md`; client-side deserialisation is lenient (unknown
//! fields ignored, optional fields defaulted) because the real service sends
//! far more than we read.

use serde::{Deserialize, Serialize};

/// OIDC client used for scripted access; public, no secret.
pub const CLIENT_ID: &str = "automated-access";
/// Grant type of the device authorisation poll.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Successful answer of the token endpoint (any grant).
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_in: u64,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub refresh_expires_in: Option<u64>,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// Error answer of the Keycloak endpoints (`{"error": ..., "error_description": ...}`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

/// Answer of the device authorisation endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceAuthResponse {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default = "default_interval")]
    pub interval: u64,
}

fn default_interval() -> u64 {
    5
}

/// `"status"` member carried by every data store answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub success: bool,
    #[serde(default)]
    pub details: String,
}

/// FastAPI-style error body (`{"detail": ...}`) used for 401/403/422 answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub detail: serde_json::Value,
}

/// Answer of `GET /registry/items/fetch-dataset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchDatasetResponse {
    pub status: Status,
    #[serde(default)]
    pub item: Option<ItemDataset>,
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    #[serde(default)]
    pub locked: Option<bool>,
}

/// Body of `POST /registry/items/list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListRequest {
    pub page_size: u32,
    pub pagination_key: Option<serde_json::Value>,
    pub sort_by: Option<serde_json::Value>,
}

/// Answer of `POST /registry/items/list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListResponse {
    pub status: Status,
    #[serde(default)]
    pub items: Vec<ItemDataset>,
    #[serde(default)]
    pub total_item_count: Option<u64>,
    /// Opaque; passed back unchanged until it is null.
    #[serde(default)]
    pub pagination_key: Option<serde_json::Value>,
}

/// Body of `POST /registry/credentials/generate-read-access-credentials`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CredentialsRequest {
    pub dataset_id: String,
    pub console_session_required: bool,
}

/// Answer of `generate-read-access-credentials`.
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialsResponse {
    pub status: Status,
    pub credentials: AwsCredentials,
    #[serde(default)]
    pub console_session_url: Option<String>,
}

/// STS session credentials for one dataset.
#[derive(Clone, Serialize, Deserialize)]
pub struct AwsCredentials {
    pub aws_access_key_id: String,
    pub aws_secret_access_key: String,
    pub aws_session_token: String,
    /// ISO 8601 datetime.
    pub expiry: String,
}

/// The parts of a registry dataset record a client uses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemDataset {
    /// The handle, `<prefix>/<suffix>`.
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub collection_format: Option<CollectionFormat>,
    pub s3: S3Location,
    #[serde(default)]
    pub created_timestamp: Option<i64>,
    #[serde(default)]
    pub updated_timestamp: Option<i64>,
    #[serde(default)]
    pub release_status: Option<String>,
    /// Everything else the service sends, kept so the emulator can serve a
    /// realistic record and a client can pass it through (`--json`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ItemDataset {
    /// Human-readable name, falling back to the display name.
    pub fn name(&self) -> Option<&str> {
        self.collection_format
            .as_ref()
            .and_then(|c| c.dataset_info.as_ref())
            .and_then(|i| i.name.as_deref())
            .or(self.display_name.as_deref())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CollectionFormat {
    #[serde(default)]
    pub dataset_info: Option<DatasetInfo>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DatasetInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct S3Location {
    pub bucket_name: String,
    /// Key prefix of the dataset, e.g. `datasets/10378-1-1687966/`.
    pub path: String,
    #[serde(default)]
    pub s3_uri: Option<String>,
}

/// Splits a handle into `(prefix, suffix)`; a handle has exactly one `/`.
pub fn split_handle(handle: &str) -> Option<(&str, &str)> {
    let (prefix, suffix) = handle.split_once('/')?;
    if prefix.is_empty() || suffix.is_empty() || suffix.contains('/') {
        return None;
    }
    Some((prefix, suffix))
}

/// The text of a handle as people copy it, without what is not the handle:
/// surrounding spaces, a resolver address (`https://hdl.handle.net/`,
/// `http://`, no scheme, or the `hdl:` URI form) and leading slashes.
/// What follows the handle (`/PATH`, a trailing `/`) is kept.
pub fn strip_resolver(s: &str) -> &str {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let mut cut = 0;
    for scheme in ["https://", "http://"] {
        if lower.starts_with(scheme) {
            cut = scheme.len();
            break;
        }
    }
    if lower[cut..].starts_with("hdl.handle.net/") {
        cut += "hdl.handle.net/".len();
    } else if cut == 0 && lower.starts_with("hdl:") {
        cut = "hdl:".len();
    }
    t[cut..].trim_start_matches('/')
}

/// A dataset handle as people copy it (`10378.1/1687966`, with a trailing
/// slash, or as `https://hdl.handle.net/10378.1/1687966`), reduced to the
/// handle itself. Used for `--dataset`, the config file's `dataset`, `ls`
/// targets and a mount helper's SOURCE, so all accept the same forms.
pub fn normalize_handle(s: &str) -> Result<String, String> {
    let h = strip_resolver(s).trim_end_matches('/');
    match split_handle(h) {
        Some(_) => Ok(h.to_string()),
        None => Err(format!(
            "{s:?} is not a dataset handle (PREFIX/SUFFIX, e.g. 10378.1/1687966)"
        )),
    }
}

/// `HANDLE[/PATH]` as people copy it, split into the handle and the path
/// below it (empty for the dataset's root; a trailing `/` is kept).
pub fn split_target(s: &str) -> Result<(String, String), String> {
    let t = strip_resolver(s);
    let mut parts = t.splitn(3, '/');
    let bad = || {
        format!("{s:?} is not a dataset handle (PREFIX/SUFFIX[/PATH], e.g. 10378.1/1687966/data)")
    };
    let (Some(p), Some(x)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    let handle = format!("{p}/{x}");
    if split_handle(&handle).is_none() {
        return Err(bad());
    }
    Ok((handle, parts.next().unwrap_or_default().to_string()))
}

/// Parses the `expiry` of read credentials: ISO 8601, with or without a
/// zone (no zone means UTC, as the service's Python `isoformat()` may send).
pub fn parse_expiry(s: &str) -> Option<std::time::SystemTime> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    let dt: DateTime<Utc> = match DateTime::parse_from_rfc3339(s) {
        Ok(dt) => dt.with_timezone(&Utc),
        Err(_) => NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()?
            .and_utc(),
    };
    let secs = dt.timestamp();
    let nanos = dt.timestamp_subsec_nanos();
    if secs < 0 {
        return None;
    }
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_split_on_exactly_one_slash() {
        assert_eq!(
            split_handle("10378.1/1687966"),
            Some(("10378.1", "1687966"))
        );
        assert_eq!(split_handle("10378.1"), None);
        assert_eq!(split_handle("a/b/c"), None);
        assert_eq!(split_handle("/b"), None);
    }

    #[test]
    fn handles_are_accepted_as_people_copy_them() {
        let h = "10378.1/1687966";
        for form in [
            "10378.1/1687966",
            "10378.1/1687966/",
            " 10378.1/1687966// ",
            "/10378.1/1687966",
            "https://hdl.handle.net/10378.1/1687966",
            "https://hdl.handle.net/10378.1/1687966/",
            "HTTPS://HDL.HANDLE.NET/10378.1/1687966",
            "http://hdl.handle.net/10378.1/1687966",
            "hdl.handle.net/10378.1/1687966",
            "hdl:10378.1/1687966",
        ] {
            assert_eq!(normalize_handle(form).as_deref(), Ok(h), "{form}");
        }
        for bad in [
            "",
            "10378.1",
            "10378.1/",
            "https://hdl.handle.net/",
            "https://example.org/10378.1/1687966",
            "10378.1/1687966/data",
        ] {
            assert!(normalize_handle(bad).is_err(), "{bad}");
        }
        assert!(normalize_handle("x")
            .unwrap_err()
            .contains("not a dataset handle"));
    }

    #[test]
    fn targets_split_into_handle_and_path() {
        let t = |s: &str| split_target(s).map(|(h, p)| format!("{h}|{p}"));
        assert_eq!(t("10378.1/1").unwrap(), "10378.1/1|");
        assert_eq!(t("10378.1/1/").unwrap(), "10378.1/1|");
        assert_eq!(t("10378.1/1/data").unwrap(), "10378.1/1|data");
        assert_eq!(t("10378.1/1/data/").unwrap(), "10378.1/1|data/");
        assert_eq!(
            t("https://hdl.handle.net/10378.1/1/a/b.csv").unwrap(),
            "10378.1/1|a/b.csv"
        );
        assert!(t("nonsense").is_err());
        assert!(t("10378.1//x").is_err());
    }

    #[test]
    fn expiry_parses_with_and_without_zone() {
        let a = parse_expiry("2026-11-28T12:00:00+00:00").unwrap();
        let b = parse_expiry("2026-11-28T12:00:00Z").unwrap();
        let c = parse_expiry("2026-11-28T12:00:00").unwrap();
        let d = parse_expiry("2026-11-28T22:00:00.5+10:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(d, a + std::time::Duration::from_millis(500));
        assert!(parse_expiry("tomorrow").is_none());
    }

    #[test]
    fn dataset_record_keeps_unknown_fields() {
        let j = r#"{"id":"1/2","s3":{"bucket_name":"b","path":"datasets/1-2/"},
            "collection_format":{"dataset_info":{"name":"N","keywords":["k"]}},
            "item_subtype":"DATASET"}"#;
        let d: ItemDataset = serde_json::from_str(j).unwrap();
        assert_eq!(d.name(), Some("N"));
        assert_eq!(d.extra["item_subtype"], "DATASET");
    }
}
