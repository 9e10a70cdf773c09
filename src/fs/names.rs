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
}
