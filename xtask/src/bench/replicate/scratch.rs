//! A scratch directory on the disk under /tmp (state directories, peers' config files and
//! logs), removed with its content when dropped.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;

pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `/tmp/<prefix>-XXXXXX`.
    pub fn create(prefix: &str) -> Result<ScratchDir> {
        Ok(ScratchDir {
            path: crate::tmpfs::make_temp_dir(prefix)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "xtask: warning: could not remove {}: {err}",
                self.path.display()
            );
        }
    }
}
