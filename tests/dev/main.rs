//! Block devices: files, the crash simulator, fault injection, slow devices, a real loop device.

mod blockdev;
mod fault;
mod file;
mod sim;
mod slow;
