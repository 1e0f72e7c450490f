//! `imezzo init --state DIR` and `imezzo id --state DIR`: the node's identity.

use std::{
    io::{self, Write},
    path::PathBuf,
};

use anyhow::Context;
use clap::Args;
use imezzo_agent::identity::{Identity, NodeId};

/// Create this node's identity in DIR and print its node id.
///
/// The identity is a self-signed certificate and its private key, `identity.cert.der` and
/// `identity.key.der` (mode 0600) in DIR, which is created with mode 0700 if missing. The
/// node id is the SHA-256 of the certificate, 64 hex digits: a server lets this node in with
/// `--allow NODE_ID`, a client trusts this node as its server with `--server-id NODE_ID`.
///
/// Only the id goes to stdout, so `ID=$(imezzo init --state DIR)` works. Refuses to replace
/// an identity DIR already holds: the id is what the other nodes know this node by.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The node's state directory.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
}

/// Print this node's id (the one `imezzo init` printed), alone on one line.
#[derive(Args, Debug)]
pub struct IdArgs {
    /// The node's state directory, as given to `imezzo init`.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let identity = Identity::create(&args.state)?;
    log::info!(
        "created the identity of node {} in {}: a server lets it in with `--allow {}`",
        identity.id,
        args.state.display(),
        identity.id
    );
    print_id(identity.id)
}

pub fn id(args: IdArgs) -> anyhow::Result<()> {
    print_id(Identity::load(&args.state)?.id)
}

fn print_id(id: NodeId) -> anyhow::Result<()> {
    // Not println!: a closed stdout is an error to report, not a panic.
    writeln!(io::stdout().lock(), "{id}").context("cannot write the node id to stdout")
}
