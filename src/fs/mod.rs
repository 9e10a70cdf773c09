//! The file system: the inode table ([`tree`]), name rules ([`names`]) and
//! the FUSE adapter ([`fuse`]). Errors of every layer below end up as an
//! [`FsError`], turned into an errno in one place (`fuse::errno`).

pub mod errors;
pub mod fuse;
pub mod names;
pub mod passthrough;
pub mod tree;

use thiserror::Error;

use crate::api::ApiError;
use crate::auth::AuthError;
use crate::s3::S3Error;

#[derive(Debug, Clone, Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("the object changed since it was opened; open it again")]
    Stale,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid argument")]
    Invalid,
    #[error("no answer within --request-timeout")]
    TimedOut,
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Io(String),
}

impl From<ApiError> for FsError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(_) => FsError::NotFound,
            ApiError::PermissionDenied(d) => FsError::PermissionDenied(d),
            ApiError::Auth(AuthError::Rejected(d)) => FsError::PermissionDenied(format!(
                "offline token rejected ({d}); run `provenafs login` for a new one"
            )),
            e if e.is_timeout() => FsError::TimedOut,
            other => FsError::Io(other.to_string()),
        }
    }
}

impl From<S3Error> for FsError {
    fn from(e: S3Error) -> Self {
        match e {
            S3Error::NotFound => FsError::NotFound,
            S3Error::Stale => FsError::Stale,
            S3Error::AccessDenied => FsError::PermissionDenied("S3 refused access".into()),
            S3Error::Credentials(a) => a.into(),
            S3Error::TimedOut => FsError::TimedOut,
            other => FsError::Io(other.to_string()),
        }
    }
}
