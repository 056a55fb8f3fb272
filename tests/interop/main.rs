//! The real `ubcache` binary against real clients (qemu-io, nbdinfo, nbdcopy, fio, ext4 over
//! nbdfuse): see README, "Tests".

#[path = "../support/common.rs"]
mod common;

mod cache_admin;
mod cache_modes;
mod cli;
mod ctl_runtime;
mod ext4;
mod ext4_crash;
mod fio;
mod nbd_backing;
mod nbdcopy;
mod nbdinfo;
mod qemu_io;
mod record;
mod replay;
