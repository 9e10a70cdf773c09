//! provenafs: the Provena data store as a read-only FUSE file system.
//!
//! Layers, top to bottom (each knows only the ones below):
//! [`cli`] → [`mount`] → [`fs`] (FUSE adapter, inode table) → [`read`]
//! (per-open-file reads) → [`s3`] (object stores) → [`credentials`]
//! (per-dataset STS) → [`api`] (data store client) → [`auth`] (tokens).
//! [`sim`] is the emulator; it shares only [`wire`] with the rest.
//! Beside the mount: [`login`] (device flow), [`browse`] (`datasets`,
//! `ls`), [`prefetch`] (stage-in to a cache folder), [`session`] (a
//! signed-in connection), [`config`] (settings file, endpoints, token
//! lookup).

pub mod api;
pub mod auth;
pub mod browse;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod folder;
pub mod fs;
pub mod http;
pub mod lease;
pub mod logfile;
pub mod login;
pub mod mount;
pub mod mountinfo;
pub mod prefetch;
pub mod provenance;
pub mod read;
pub mod retry;
pub mod s3;
pub mod secret;
pub mod session;
pub mod shared_lease;
pub mod sim;
pub mod status;
pub mod task;
pub mod wire;
