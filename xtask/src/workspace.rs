//! Where the workspace and its build output are, and how to call cargo on it.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

pub struct Workspace {
    pub root: PathBuf,
    target: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context(
                "xtask's manifest directory has no parent: xtask must live at <workspace>/xtask",
            )?
            .to_path_buf();
        let target = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };
        Ok(Self { root, target })
    }

    /// A binary of a `--release` build, as an absolute path.
    pub fn release_bin(&self, name: &str) -> PathBuf {
        self.target.join("release").join(name)
    }

    /// `cargo` in the workspace root, with cargo's own bin directory on PATH so that the nested
    /// probe build finds a `cargo install`ed bpf-linker even when the caller's PATH lacks it.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&self.root);
        if let Some(path) = path_with_cargo_bin() {
            cmd.env("PATH", path);
        }
        cmd
    }
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(home.join("bin"))
}

/// PATH with the cargo bin directory in front, or None when it is already on PATH.
fn path_with_cargo_bin() -> Option<OsString> {
    let bin = cargo_bin_dir()?;
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|dir| dir == bin) {
        return None;
    }
    env::join_paths(std::iter::once(bin).chain(env::split_paths(&path))).ok()
}
