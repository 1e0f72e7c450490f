//! Where replay gets what the journal does not carry: file bytes and the master's current
//! attributes (InterMezzo's rule: the log holds operations, the receiver pulls the data).

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::check_rel_path;
use crate::attrs::Attrs;
use crate::beneath::{sys, Tree};
use crate::op::RelPath;

/// What replay asks of the master. A network implementation answers from what the sender
/// read and shipped with the operation; [`DirSource`] reads a local directory.
///
/// Which paths each operation asks about is listed in the [`super`] module docs, so a
/// sender knows what to ship.
pub trait DataSource {
    /// Bytes `[offset, offset+len)` of the master's regular file at `path`, as it is now.
    /// Fewer bytes than `len` means the file ends there. With `ino`, only from that inode:
    /// if `path` names another object now, an error of kind `NotFound` (see [`replaced`]).
    fn read_range(
        &mut self,
        path: &RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
    ) -> io::Result<Vec<u8>>;

    /// The master's current attributes of `path`, `Ok(None)` when nothing is there.
    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>>;
}

/// A [`DataSource`] reading a directory on this machine: the master's export when the
/// sender fills messages, or a second tree in tests.
#[derive(Debug, Clone)]
pub struct DirSource {
    tree: Arc<Tree>,
}

impl DirSource {
    pub fn new(root: impl AsRef<Path>) -> io::Result<DirSource> {
        Ok(DirSource {
            tree: Arc::new(Tree::open(root.as_ref())?),
        })
    }

    fn check(rel: &RelPath) -> io::Result<()> {
        // The same checks as for the replica, so a bad path cannot read outside either.
        check_rel_path(rel).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }
}

/// The error of a read that asked for one object and found another under its name.
pub fn replaced(path: &RelPath) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{:?} names another file on the master now; the data follows its file later",
            path.display()
        ),
    )
}

impl DataSource for DirSource {
    fn read_range(
        &mut self,
        path: &RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
    ) -> io::Result<Vec<u8>> {
        Self::check(path)?;
        let Some((file, meta)) = self.tree.open_regular(path.as_bytes())? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no regular file there",
            ));
        };
        if ino.is_some_and(|i| i != meta.ino()) {
            return Err(replaced(path));
        }
        let fd = file.as_fd();
        let st_size = meta.len();
        // Allocate only what the file holds: `len` may run far past its end.
        let avail = st_size.saturating_sub(offset);
        let len = usize::try_from(len.min(avail))
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = sys::pread(fd, &mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>> {
        Self::check(path)?;
        self.tree.attrs(path)
    }
}
