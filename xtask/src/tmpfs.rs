//! A scratch directory under /tmp with its own tmpfs mounted on it: its own device, nothing else
//! on it, gone when dropped.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::exec;

pub struct TmpfsDir {
    path: PathBuf,
    mounted: bool,
}

impl TmpfsDir {
    /// Creates `/tmp/<prefix>-XXXXXX` and mounts a tmpfs on it.
    pub fn mount(prefix: &str) -> Result<Self> {
        exec::require_root("mounting a scratch tmpfs")?;
        let mut dir = Self {
            path: make_temp_dir(prefix)?,
            mounted: false,
        };
        exec::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&dir.path),
        )
        .with_context(|| format!("could not mount a tmpfs on {}", dir.path.display()))?;
        dir.mounted = true;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TmpfsDir {
    fn drop(&mut self) {
        if self.mounted {
            let mut umount = Command::new("umount");
            umount.arg(&self.path);
            if let Err(err) = exec::run(&mut umount) {
                eprintln!(
                    "xtask: warning: {err:#}; {} is left mounted, unmount it by hand",
                    self.path.display()
                );
                return;
            }
        }
        if let Err(err) = fs::remove_dir(&self.path) {
            eprintln!(
                "xtask: warning: could not remove {}: {err}",
                self.path.display()
            );
        }
    }
}

/// Creates `/tmp/<prefix>-XXXXXX` (mkdtemp) and returns its path.
pub fn make_temp_dir(prefix: &str) -> Result<PathBuf> {
    let template = CString::new(format!("/tmp/{prefix}-XXXXXX"))
        .context("the scratch directory prefix contains a NUL byte")?;
    let mut template = template.into_bytes_with_nul();
    // SAFETY: the template is NUL-terminated and writable; mkdtemp replaces the X's in place.
    let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(std::io::Error::last_os_error())
            .context("could not create a scratch directory under /tmp");
    }
    template.pop(); // the NUL
    Ok(PathBuf::from(std::ffi::OsString::from_vec(template)))
}
