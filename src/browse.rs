//! Finding data without mounting: `provenafs datasets` and `provenafs ls`.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, UNIX_EPOCH};

use crate::api::DataStoreClient;
use crate::retry::Deadline;
use crate::s3::{ObjectStore, StoreFactory};
use crate::session::Session;
use crate::wire::{split_target, ItemDataset};

/// A counter on standard error while a long operation runs, when standard
/// error is a terminal; nothing at all otherwise (a pipe or a log file
/// gets no redraw noise).
pub fn progress() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

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
    let pb = progress();
    pb.set_message("Listing datasets...");
    let listed = api
        .list_datasets_counted(&mut |n| pb.set_message(format!("{n} datasets fetched")))
        .await;
    pb.finish_and_clear();
    let listed = listed.map_err(|e| e.to_string())?;
    if let Some(why) = &listed.incomplete {
        // One line, on standard error: the table or JSON stays clean.
        eprintln!("provenafs: listing incomplete: {why}");
    }
    let mut items = listed.items;
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

/// Where `ls` writes: stops quietly when the reader has gone (`| head`).
struct Out<'a> {
    w: &'a mut dyn std::io::Write,
    /// The reader closed the pipe: nothing more to write.
    closed: bool,
}

impl Out<'_> {
    fn line(&mut self, text: &str) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        match writeln!(self.w, "{text}").and_then(|()| self.w.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(format!("cannot write output: {e}")),
        }
    }
}

/// `aws s3 ls`, by handle: `HANDLE` or `HANDLE/PATH` (a handle may be
/// given as people copy it, see [`crate::wire::split_target`]). Lines are
/// written to `out` as each page arrives. A PATH with nothing below it
/// is an error ("no such folder"), as with `aws s3 ls`.
pub async fn ls(
    session: &Session,
    target: &str,
    recursive: bool,
    human: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let (handle, path) = split_target(target)?;
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
    let mut out = Out {
        w: out,
        closed: false,
    };
    let listed = list(
        store.as_ref(),
        &prefix,
        recursive,
        human,
        session.api.request_timeout(),
        &mut out,
    )
    .await?;
    // S3 has no empty folders: a path with nothing below it does not exist.
    // The dataset's root is there even when it holds nothing.
    if listed == 0 && !path.is_empty() {
        return Err(format!(
            "no such folder: {handle}/{}",
            printable(path.trim_end_matches('/'))
        ));
    }
    Ok(())
}

/// Lists `prefix` page by page into `out`; returns how many entries there were.
async fn list(
    store: &dyn ObjectStore,
    prefix: &str,
    recursive: bool,
    human: bool,
    request_timeout: std::time::Duration,
    out: &mut Out<'_>,
) -> Result<u64, String> {
    // Relative to the folder being listed, as `aws s3 ls` prints them.
    let base = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
    let mut walk = crate::s3::Pages::new();
    let mut total = (0u64, 0u64);
    let mut entries = 0u64;
    loop {
        let page = store
            .list(
                prefix,
                if recursive { None } else { Some("/") },
                walk.token(),
                Some(1000),
                Deadline::after(request_timeout),
            )
            .await
            .map_err(|e| e.to_string())?;
        let more = walk.advance(&page).map_err(|e| e.to_string())?;
        for p in &page.prefixes {
            entries += 1;
            out.line(&format!(
                "{:>30} {}",
                "PRE",
                printable(p.strip_prefix(base).unwrap_or(p))
            ))?;
        }
        for o in &page.objects {
            entries += 1;
            let when: chrono::DateTime<chrono::Local> = o.last_modified.into();
            let size = if human {
                human_size(o.size)
            } else {
                o.size.to_string()
            };
            total = (total.0 + 1, total.1 + o.size);
            out.line(&format!(
                "{} {:>10} {}",
                when.format("%Y-%m-%d %H:%M:%S"),
                size,
                printable(o.key.strip_prefix(base).unwrap_or(&o.key))
            ))?;
        }
        if out.closed {
            // Nobody reads on: no more pages.
            return Ok(entries);
        }
        if !more {
            break;
        }
    }
    if recursive && entries > 0 {
        let size = if human {
            human_size(total.1)
        } else {
            format!("{} bytes", total.1)
        };
        out.line(&format!(
            "\nTotal Objects: {}\n   Total Size: {size}",
            total.0
        ))?;
    }
    Ok(entries)
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
