//! NBD: the server's protocol (handshake, commands, errors, limits) and the NBD client device.

#[path = "../support/common.rs"]
mod common;

mod nbd_dev;
mod protocol;
