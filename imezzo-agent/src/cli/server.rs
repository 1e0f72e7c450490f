//! `imezzo server`: serve one exported tree to replication clients.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use imezzo_agent::{config::ServerFlags, server::Server};

/// Serve one exported tree to the replication clients let in with --allow.
///
/// Capture journals every change under EXPORT; each client gets a copy of the tree, then the
/// journal as it grows. Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) for the eBPF capture. Capture
/// starts before anything is served, so no change slips between a client's initial copy
/// and the stream. The journal lives in STATE (journal.redb), next to the node identity
/// made by `imezzo init`. Once ready, one line goes to stderr:
/// `imezzo: server ready: listening on IP:PORT as NODE_ID`.
///
/// Every flag may also come from a TOML file (--config) with the same keys (export, state,
/// listen, allow = [...], retain_bytes); a flag wins over the file. Stop with Ctrl-C or
/// SIGTERM; clients reconnect on their own when it is back.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The exported directory.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
    /// The node's state directory (identity, journal).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The UDP address to listen on, such as 0.0.0.0:7070 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A client node id to let in (what `imezzo id` prints on it); repeat for each client.
    #[arg(long = "allow", value_name = "NODE_ID")]
    pub allow: Vec<String>,
    /// Bound of the journal's retained entries, in bytes (default 1 GiB). A client that
    /// stays away longer than the journal reaches back resyncs in full.
    #[arg(long, value_name = "BYTES")]
    pub retain_bytes: Option<u64>,
    /// A TOML file with the same keys as these flags.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let opts = ServerFlags {
        export: args.export,
        state: args.state,
        listen: args.listen,
        allow: args.allow,
        retain_bytes: args.retain_bytes,
        config: args.config,
    }
    .resolve()?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    rt.block_on(async {
        let server = Server::start(&opts).await?;
        eprintln!("imezzo: server ready: listening on {} as {}", server.local_addr(), server.node_id());
        server.run(crate::cli::server::terminated()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on the first SIGINT or SIGTERM: the clean stop of `server`, `client` and `demo`.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        // Without signal handlers the process still dies by the default action; wait forever.
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("cannot catch SIGINT/SIGTERM ({e}): a signal will kill the process without a clean stop");
            std::future::pending::<()>().await
        }
    }
}
