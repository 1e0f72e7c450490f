//! A scratch directory on the disk under /tmp (state directories, peers' config files and
//! logs), removed with its content when dropped.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `/tmp/<prefix>-XXXXXX`.
    pub fn create(prefix: &str) -> Result<ScratchDir> {
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
        Ok(ScratchDir {
            path: PathBuf::from(std::ffi::OsString::from_vec(template)),
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
