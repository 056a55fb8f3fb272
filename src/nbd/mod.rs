//! The NBD protocol: wire types ([`proto`]), the server ([`server`]) and an async client
//! ([`client`]) used by the tests and, later, for remote backing devices.

pub mod client;
mod flush;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;

pub use client::{ClientError, ClientOptions, NbdClient};
pub use server::{
    DeviceCalls, Export, ListenAddr, Server, ServerConfig, ServerError, build_runtime, serve_stream,
};
