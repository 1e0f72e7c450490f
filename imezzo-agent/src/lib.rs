//! imezzo's agent: capture of every change under an exported tree, as a journal of
//! path-level operations. Replication (streaming and replay) builds on [`capture`].
pub mod attrs;
pub mod beneath;
pub mod capture;
mod checksum;
pub mod client;
pub mod config;
pub mod identity;
pub mod journal;
pub mod memory;
mod names;
pub mod op;
pub mod protocol;
pub mod replay;
pub mod report;
pub mod server;
pub mod transport;
pub mod verify;
