//! `provenafs credentials` and `provenafs url`: the same credential chain
//! for other tools (boto3, the AWS CLI, GDAL, fsspec, rclone).

use clap::Args;

use super::{ApiArgs, Exit, IdentityArgs, S3Args, TokenArgs};

#[derive(Args, Clone)]
pub struct CredentialsArgs {
    /// The dataset handle, e.g. 10378.1/1687966.
    pub handle: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub s3: S3Args,
    /// `export AWS_...=` lines instead of credential_process JSON.
    #[arg(long)]
    pub env: bool,
}

#[derive(Args, Clone)]
pub struct UrlArgs {
    /// HANDLE or HANDLE/PATH.
    pub target: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `provenafs credentials HANDLE [--env]`.
pub fn credentials(a: CredentialsArgs) -> Result<(), Exit> {
    let _ = a;
    Err(Exit::Message("credentials: not yet".into()))
}

/// `provenafs url HANDLE[/PATH]`.
pub fn url(a: UrlArgs) -> Result<(), Exit> {
    let _ = a;
    Err(Exit::Message("url: not yet".into()))
}
