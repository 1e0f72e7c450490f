//! `imezzo client`: keep a directory a duplicate of a server's export.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Args;
use imezzo_agent::{
    client::{self, ClientEvent},
    config::ClientFlags,
};

/// Keep ROOT a duplicate of the server's exported tree, replaying its journal as it grows.
///
/// The first connection copies the tree (only what differs from what ROOT holds); from then
/// on every change is replayed in order and made durable before it is acknowledged. After
/// a restart or a network loss the client resumes where it was, reconnecting on its own.
/// Progress goes to stderr, in particular `imezzo: client: initial sync done at seq N` and
/// `imezzo: client: in sync at seq N`. A server that refuses this node, or that is not
/// SERVER_ID, is fatal (exit status 1).
///
/// Every flag may also come from a TOML file (--config) with the same keys (server,
/// server_id, root, state, mode); a flag wins over the file. Stop with Ctrl-C or SIGTERM.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The server's address, IP:PORT or HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub server: Option<String>,
    /// The server's node id (what `imezzo id` prints there): any other server is refused.
    #[arg(long, value_name = "NODE_ID")]
    pub server_id: Option<String>,
    /// The replica directory (created if missing). Keep it off the server's exported tree.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The node's state directory (identity, client.state, replay marks); not inside ROOT.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// How ROOT follows the server; `replicate` (a full duplicate) is the one mode.
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// A TOML file with the same keys as these flags.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

fn print_event(event: ClientEvent) {
    match event {
        ClientEvent::Connected { server } => log::info!("client: connected to {server}"),
        ClientEvent::FullSyncStarted { manifest_seq, why } => {
            log::info!("client: full sync at seq {manifest_seq}: {why}")
        }
        ClientEvent::InitialSyncDone { seq, .. } => eprintln!("imezzo: client: initial sync done at seq {seq}"),
        ClientEvent::Resumed { from_seq } => log::info!("client: resuming at seq {from_seq}"),
        ClientEvent::Applied { seq, op, .. } => {
            log::debug!("client: applied {}", imezzo_agent::op::JournalEntry { seq, op })
        }
        ClientEvent::InSync { seq } => eprintln!("imezzo: client: in sync at seq {seq}"),
        ClientEvent::Unreachable { retry_in, reason } => {
            log::info!("client: {reason}");
            eprintln!("imezzo: client: server unreachable, retrying in {}s", retry_in.as_secs());
        }
        ClientEvent::Disconnected { reason } => log::warn!("client: disconnected: {reason}"),
    }
}

pub fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let opts = ClientFlags {
        server: args.server,
        server_id: args.server_id,
        root: args.root,
        state: args.state,
        mode: args.mode,
        config: args.config,
    }
    .resolve()?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    // On a worker, not under block_on on this thread: the session then runs beside quinn's
    // tasks, and a packet that wakes it is not a hand-off to another thread (client CPU
    // -11% at 1 000 changes/s, a third fewer context switches; docs/benchmarks.md).
    let run = rt.spawn(async move { client::run(&opts, Arc::new(print_event), crate::cli::server::terminated()).await });
    rt.block_on(run).context("the client's task panicked")??;
    Ok(ExitCode::SUCCESS)
}
