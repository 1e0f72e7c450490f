//! imezzo's agent: capture of every change under an exported tree, as a journal of
//! path-level operations. Replication (streaming and replay) builds on [`capture`].
pub mod capture;
pub mod client;
pub mod config;
pub mod extents;
pub mod identity;
pub mod inode_table;
pub mod journal;
pub mod kernel_btf;
pub mod op;
pub mod probes;
pub mod protocol;
pub mod replay;
pub mod server;
pub mod syscalls;
pub mod transport;
pub mod verify;
