//! `cargo xtask run [ARGS...]`: build, then run `imezzo ARGS...`.

use std::{ffi::OsString, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{build, deps, exec, tmpfs::TmpfsDir, workspace::Workspace};

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
    let root = TmpfsDir::mount("imezzo-run")?;
    println!(
        "xtask: capturing {0}: make changes there from another terminal (e.g. `echo hi > {0}/a`), Ctrl-C to stop",
        root.path().display()
    );
    let mut cmd = Command::new(imezzo);
    cmd.arg("capture").arg("--root").arg(root.path());
    exec::announce(&cmd);
    // Ctrl-C stops imezzo; xtask catches it (see exec::catch_interrupts) and unmounts the scratch
    // tmpfs when dropping `root`.
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", imezzo.display()))?;
    if !status.success() && !exec::interrupted() {
        bail!("imezzo exited with {status}");
    }
    Ok(())
}
