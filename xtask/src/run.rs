//! `cargo xtask run [ARGS...]`: build, then run `imezzo ARGS...`.

use std::{ffi::OsString, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{build, deps, exec, workspace::Workspace};

#[derive(Args)]
pub struct RunArgs {
    /// Arguments passed to `imezzo` verbatim.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

pub fn run(args: RunArgs) -> Result<()> {
    deps::ensure()?;
    let imezzo = build::agent(&Workspace::locate()?)?;
    if args.args.is_empty() {
        return run_default(&imezzo);
    }
    let mut cmd = Command::new(&imezzo);
    cmd.args(&args.args);
    exec::announce(&cmd);
    // exec only returns when it could not replace this process.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not execute {}", imezzo.display()))
}

/// What `cargo xtask run` does with no arguments: capture a fresh scratch tmpfs until Ctrl-C.
fn run_default(imezzo: &Path) -> Result<()> {
    // The demo mounts and removes its own scratch file systems: a server and a replication
    // client on loopback, a generated tree, live changes and their lag.
    println!("xtask: running the imezzo demo (a server and a client on loopback), Ctrl-C to stop");
    let mut cmd = Command::new(imezzo);
    cmd.arg("demo");
    exec::announce(&cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", imezzo.display()))?;
    if !status.success() && !exec::interrupted() {
        bail!("imezzo exited with {status}");
    }
    Ok(())
}
