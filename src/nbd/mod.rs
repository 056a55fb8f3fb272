//! The NBD protocol: wire types ([`proto`]), the server ([`server`]), an async client
//! ([`client`]), the remote export as a block device built on it ([`NbdDev`], so a cache set can
//! sit in front of a disk served by any NBD server), and the `nbd://` URIs both sides use
//! ([`uri`]).
//!
//! NBD sits above the device layer: the server serves any [`crate::dev::BlockDev`], and
//! [`NbdDev`] is one; nothing in `dev` knows about NBD.

pub mod client;
mod dev;
mod flush;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;
pub mod uri;

pub use client::{ClientError, ClientOptions, NbdClient};
pub use dev::{NbdDev, NbdDevOptions};
pub use server::{
    DeviceCalls, Export, ListenAddr, Server, ServerConfig, ServerError, build_runtime, serve_stream,
};
