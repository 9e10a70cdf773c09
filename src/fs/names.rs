//! Which S3 key segments may appear as file names.
//!
//! The rules of `docs/SEMANTICS.md`: a segment that is empty, `.` or `..`,
//! longer than 255 bytes, or holds NUL, `/` or other control characters
//! cannot be a POSIX file name and is hidden (logged once by the caller).

/// Longest file name Linux accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Hidden {
    Empty,
    Dot,
    TooLong,
    ControlChar,
}

impl Hidden {
    pub fn reason(self) -> &'static str {
        match self {
            Hidden::Empty => "empty path segment",
            Hidden::Dot => "`.` or `..` segment",
            Hidden::TooLong => "name longer than 255 bytes",
            Hidden::ControlChar => "control character in name",
        }
    }
}

/// Whether `name` (one key segment, no `/`) can be shown as a file name.
pub fn check(name: &str) -> Result<(), Hidden> {
    if name.is_empty() {
        return Err(Hidden::Empty);
    }
    if name == "." || name == ".." {
        return Err(Hidden::Dot);
    }
    if name.len() > NAME_MAX {
        return Err(Hidden::TooLong);
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err(Hidden::ControlChar);
    }
    Ok(())
}

/// `by-name/` entries: (file name, handle) for each (handle, dataset
/// name). A name is made a valid file name (`/` and control characters
/// become `_`, cut to 255 bytes); a dataset without a name, or whose name
/// is shared with another dataset, gets its handle appended (`Coral
/// survey (10378.1_42)`), so every entry is unique.
pub fn by_name(datasets: &[(String, String)]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let clean = |n: &str| -> String {
        let s: String = n
            .trim()
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        if s == "." || s == ".." {
            String::new()
        } else {
            s
        }
    };
    let cut = |s: String, room: usize| -> String {
        if s.len() <= room {
            return s;
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].trim_end().to_string()
    };
    let tagged = |c: &str, handle: &str| {
        let tag = format!(" ({})", handle.replace('/', "_"));
        let base = cut(c.to_string(), NAME_MAX - tag.len());
        format!("{base}{tag}").trim_start().to_string()
    };
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, name) in datasets {
        *count.entry(clean(name)).or_default() += 1;
    }
    let mut out: Vec<(String, String)> = datasets
        .iter()
        .map(|(handle, name)| {
            let c = clean(name);
            let file = if !c.is_empty() && count[&c] == 1 {
                cut(c, NAME_MAX)
            } else {
                tagged(&c, handle)
            };
            (file, handle.clone())
        })
        .collect();
    // A dataset may be named exactly like another's tagged name ("Dup
    // (10378.1_3)"): tag every one involved, so none is lost. Handles are
    // unique, so names tagged with their own handle are too.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (f, _) in &out {
        *seen.entry(f.clone()).or_default() += 1;
    }
    for (f, handle) in out.iter_mut() {
        let own = format!(" ({})", handle.replace('/', "_"));
        if seen[f.as_str()] > 1 && !f.ends_with(&own) {
            *f = tagged(f, handle);
        }
    }
    out.sort();
    out
}

/// A handle prefix as Handle.net writes them (`10378.1`, `102.100.100`):
/// starts with a digit, then digits, letters, dots and dashes. Names that
/// cannot be a prefix (`.git`, `__pycache__`) are refused without a call.
pub fn is_handle_prefix(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// A handle suffix: non-empty, printable, no `/`.
pub fn is_handle_suffix(name: &str) -> bool {
    check(name).is_ok() && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_what_cannot_be_a_name() {
        assert_eq!(check(""), Err(Hidden::Empty));
        assert_eq!(check("."), Err(Hidden::Dot));
        assert_eq!(check(".."), Err(Hidden::Dot));
        assert_eq!(check(&"x".repeat(256)), Err(Hidden::TooLong));
        assert_eq!(check("a\nb"), Err(Hidden::ControlChar));
        assert_eq!(check("a\0b"), Err(Hidden::ControlChar));
        assert!(check("...").is_ok());
        assert!(check("a b ü 日本").is_ok());
        assert!(check(&"é".repeat(127)).is_ok());
    }

    #[test]
    fn handle_prefixes() {
        assert!(is_handle_prefix("10378.1"));
        assert!(is_handle_prefix("102.100.100"));
        assert!(!is_handle_prefix(".git"));
        assert!(!is_handle_prefix("__pycache__"));
        assert!(!is_handle_prefix("desktop.ini"));
    }

    #[test]
    fn by_name_entries_are_unique_valid_names() {
        let d = |h: &str, n: &str| (h.to_string(), n.to_string());
        let out = by_name(&[
            d("10378.1/1", "Coral cover"),
            d("10378.1/2", "Reef / temps"),
            d("10378.1/3", "Dup"),
            d("10378.1/4", "Dup"),
            d("10378.1/5", ""),
            d("10378.1/6", &"long".repeat(100)),
        ]);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "(10378.1_5)");
        assert!(names.contains(&"Coral cover"));
        assert!(names.contains(&"Reef _ temps"));
        assert!(names.contains(&"Dup (10378.1_3)"));
        assert!(names.contains(&"Dup (10378.1_4)"));
        for n in &names {
            assert!(check(n).is_ok(), "{n:?}");
        }
        assert_eq!(out.len(), 6);
        // A name that equals another's tagged form loses nobody.
        let out = by_name(&[
            d("10378.1/3", "Dup"),
            d("10378.1/4", "Dup"),
            d("10378.1/9", "Dup (10378.1_3)"),
        ]);
        let mut files: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        files.dedup();
        assert_eq!(files.len(), 3, "{out:?}");
    }
}
