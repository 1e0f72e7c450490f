//! `cargo xtask build`: the toolchain, then the self-contained `imezzo` binary. The agent's build.rs
//! builds the probes and embeds them, so this is a plain cargo build.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::{deps, workspace::Workspace};

pub fn run() -> Result<()> {
    deps::ensure()?;
    agent(&Workspace::locate()?)?;
    Ok(())
}

/// Builds `imezzo` in release mode and returns the absolute path of the binary.
pub fn agent(workspace: &Workspace) -> Result<PathBuf> {
    crate::exec::run(workspace.cargo().args(["build", "--release", "-p", "imezzo-agent"]))
        .context("building imezzo failed: see cargo's messages above (`cargo xtask deps` installs the toolchain)")?;
    let binary = workspace.release_bin("imezzo");
    if !binary.is_file() {
        bail!(
            "cargo reported success but {} does not exist",
            binary.display()
        );
    }
    println!("xtask: built {}", binary.display());
    Ok(binary)
}
