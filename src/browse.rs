//! Finding data without mounting: `provenafs datasets` and `provenafs ls`.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::api::DataStoreClient;
use crate::retry::Deadline;
use crate::s3::{ObjectStore, StoreFactory};
use crate::session::Session;
use crate::wire::{split_handle, ItemDataset};

fn date(t: Option<i64>) -> String {
    match t.filter(|t| *t > 0) {
        Some(t) => {
            chrono::DateTime::<chrono::Utc>::from(UNIX_EPOCH + Duration::from_secs(t as u64))
                .format("%Y-%m-%d")
                .to_string()
        }
        None => "-".into(),
    }
}

/// Whether `item` matches every word of `search` (case-insensitive) in its
/// handle, name or description.
fn matches(item: &ItemDataset, search: &str) -> bool {
    let description = item
        .collection_format
        .as_ref()
        .and_then(|c| c.dataset_info.as_ref())
        .and_then(|i| i.description.as_deref())
        .unwrap_or_default();
    let hay = format!(
        "{} {} {}",
        item.id,
        item.name().unwrap_or_default(),
        description
    )
    .to_lowercase();
    search
        .split_whitespace()
        .all(|w| hay.contains(&w.to_lowercase()))
}

/// Every dataset the user can see (all registry pages), filtered.
pub async fn datasets(
    api: &DataStoreClient,
    search: Option<&str>,
    json: bool,
) -> Result<String, String> {
    let mut items = api.list_datasets().await.map_err(|e| e.to_string())?;
    if let Some(s) = search {
        items.retain(|i| matches(i, s));
    }
    items.sort_by(|a, b| a.id.cmp(&b.id));
    if json {
        let v: Vec<serde_json::Value> = items
            .iter()
            .map(|i| {
                serde_json::json!({
                    "handle": i.id,
                    "name": i.name(),
                    "release_status": i.release_status,
                    "updated": date(i.updated_timestamp.or(i.created_timestamp)),
                    "s3_uri": i.s3.s3_uri,
                })
            })
            .collect();
        return serde_json::to_string_pretty(&v)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string());
    }
    let rows: Vec<[String; 4]> = items
        .iter()
        .map(|i| {
            [
                i.id.clone(),
                printable(i.name().unwrap_or("-")),
                i.release_status.clone().unwrap_or_else(|| "-".into()),
                date(i.updated_timestamp.or(i.created_timestamp)),
            ]
        })
        .collect();
    Ok(table(["HANDLE", "NAME", "STATUS", "UPDATED"], &rows))
}

fn table(head: [&str; 4], rows: &[[String; 4]]) -> String {
    let mut w = head.map(|h| h.chars().count());
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 4]| {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
    };
    line(&mut out, head);
    for r in rows {
        line(&mut out, [&r[0], &r[1], &r[2], &r[3]]);
    }
    out
}

/// `aws s3 ls`, by handle: `HANDLE` or `HANDLE/PATH`.
pub async fn ls(
    session: &Session,
    target: &str,
    recursive: bool,
    human: bool,
) -> Result<String, String> {
    let target = target.trim_start_matches('/');
    let mut parts = target.splitn(3, '/');
    let (Some(p), Some(s)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "{target:?} is not a dataset handle (PREFIX/SUFFIX[/PATH])"
        ));
    };
    let handle = format!("{p}/{s}");
    if split_handle(&handle).is_none() {
        return Err(format!(
            "{target:?} is not a dataset handle (PREFIX/SUFFIX[/PATH])"
        ));
    }
    let path = parts.next().unwrap_or_default();
    let item = session
        .api
        .fetch_dataset(&handle, session.deadline())
        .await
        .map_err(|e| e.to_string())?;
    let mut root = item.s3.path.trim_start_matches('/').to_string();
    if !root.ends_with('/') {
        root.push('/');
    }
    let store = session.stores.open(&handle, &item.s3.bucket_name);
    let mut prefix = format!("{root}{path}");
    if !path.is_empty() && !path.ends_with('/') {
        // `ls H/data` means the folder if there is one, as `aws s3 ls` does
        // with a trailing slash.
        let probe = store
            .list(
                &format!("{prefix}/"),
                Some("/"),
                None,
                Some(1),
                session.deadline(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !probe.objects.is_empty() || !probe.prefixes.is_empty() {
            prefix.push('/');
        }
    }
    list(
        store.as_ref(),
        &prefix,
        recursive,
        human,
        session.api.request_timeout(),
    )
    .await
}

async fn list(
    store: &dyn ObjectStore,
    prefix: &str,
    recursive: bool,
    human: bool,
    request_timeout: std::time::Duration,
) -> Result<String, String> {
    // Relative to the folder being listed, as `aws s3 ls` prints them.
    let base = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
    let mut out = String::new();
    let mut token = None;
    let mut total = (0u64, 0u64);
    loop {
        let page = store
            .list(
                prefix,
                if recursive { None } else { Some("/") },
                token.take(),
                Some(1000),
                Deadline::after(request_timeout),
            )
            .await
            .map_err(|e| e.to_string())?;
        for p in &page.prefixes {
            let _ = writeln!(
                out,
                "{:>30} {}",
                "PRE",
                printable(p.strip_prefix(base).unwrap_or(p))
            );
        }
        for o in &page.objects {
            let when: chrono::DateTime<chrono::Local> = o.last_modified.into();
            let size = if human {
                human_size(o.size)
            } else {
                o.size.to_string()
            };
            total = (total.0 + 1, total.1 + o.size);
            let _ = writeln!(
                out,
                "{} {:>10} {}",
                when.format("%Y-%m-%d %H:%M:%S"),
                size,
                printable(o.key.strip_prefix(base).unwrap_or(&o.key))
            );
        }
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    if recursive {
        let size = if human {
            human_size(total.1)
        } else {
            format!("{} bytes", total.1)
        };
        let _ = writeln!(out, "\nTotal Objects: {}\n   Total Size: {size}", total.0);
    }
    Ok(out)
}

/// Text safe to print on a terminal: control characters (a key may hold
/// an escape sequence) become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["Bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} Bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_aws_cli() {
        assert_eq!(human_size(12), "12 Bytes");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn search_matches_every_word() {
        let item: ItemDataset = serde_json::from_value(serde_json::json!({
            "id": "10378.1/42",
            "collection_format": {"dataset_info": {"name": "Coral cover 2024", "description": "Reef survey"}},
            "s3": {"bucket_name": "b", "path": "datasets/x/"},
        }))
        .unwrap();
        assert!(matches(&item, "coral"));
        assert!(matches(&item, "REEF 2024"));
        assert!(matches(&item, "10378.1/42"));
        assert!(!matches(&item, "coral seagrass"));
    }
}
