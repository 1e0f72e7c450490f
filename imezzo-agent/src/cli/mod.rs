//! The `imezzo` subcommands, one file each; `main.rs` holds the command tree.

pub mod capture;
pub mod client;
pub mod demo;
pub mod identity;
pub mod server;
pub mod verify;
