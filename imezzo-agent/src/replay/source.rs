//! Where replay gets what the journal does not carry: file bytes and the master's current
//! attributes (InterMezzo's rule: the log holds operations, the receiver pulls the data).

use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::check_rel_path;
use super::sys;
use crate::op::{Op, RelPath, Timestamp};

/// The type of a file system object.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl FileKind {
    /// The kind encoded in `st_mode`'s `S_IFMT` bits; `None` for an unknown type.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }
}

/// A master object's current state, read when the operation is sent (the journal carries
/// no data and no attributes beyond what the syscall named).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Attrs {
    pub kind: FileKind,
    /// Permission bits, `0o7777` at most (the type is in `kind`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub size: u64,
    /// Device number, for character and block devices.
    pub rdev: u64,
    /// The link's content, for symlinks.
    pub symlink_target: Option<Vec<u8>>,
    /// Every extended attribute, `(name, value)`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Attrs {
    /// The operations that make `path` this object when replayed: created if absent, a
    /// regular file's whole data and size, its xattrs, its owner, mode and times (a
    /// directory's attributes are left to the caller: what is placed inside it moves its
    /// times). Replay takes data and xattr values from the master's current state. `None`
    /// for a symlink whose target was not read.
    pub fn recreate_ops(&self, path: &RelPath) -> Option<Vec<Op>> {
        let make = match self.kind {
            FileKind::Regular => Op::Create { path: path.clone(), mode: self.mode },
            FileKind::Directory => Op::Mkdir { path: path.clone(), mode: self.mode },
            FileKind::Symlink => Op::Symlink { path: path.clone(), target: RelPath(self.symlink_target.clone()?) },
            other => Op::Mknod { path: path.clone(), mode: other.type_bits() | self.mode, rdev: self.rdev },
        };
        let mut ops = vec![make];
        if self.kind == FileKind::Regular {
            // Truncate first: a stale longer tail must go, and the whole-file write that
            // follows is then built aside and renamed in (or filled in place when empty).
            ops.push(Op::Truncate { path: path.clone(), size: self.size });
            ops.push(Op::Write { path: path.clone(), offset: 0, len: u64::MAX, source: None, mode: None, ino: None });
        }
        for (name, _) in &self.xattrs {
            ops.push(Op::Setxattr { path: path.clone(), name: RelPath(name.clone()) });
        }
        if self.kind != FileKind::Directory {
            ops.push(self.setattr_op(path));
        }
        Some(ops)
    }

    /// A setattr of every attribute: owner, mode, access and modification times.
    pub fn setattr_op(&self, path: &RelPath) -> Op {
        Op::Setattr {
            path: path.clone(),
            mode: Some(self.mode),
            uid: Some(self.uid),
            gid: Some(self.gid),
            atime: Some(self.atime),
            mtime: Some(self.mtime),
        }
    }

    /// Reads the attributes of `path` without following a final symlink; `Ok(None)` when
    /// nothing is there.
    pub fn read(path: &Path) -> io::Result<Option<Attrs>> {
        Ok(Attrs::read_with_stat(path)?.map(|(attrs, _)| attrs))
    }

    /// [`read`](Self::read), with the `lstat` it was made from (for the inode, device and
    /// link count, without a second lookup).
    pub fn read_with_stat(path: &Path) -> io::Result<Option<(Attrs, libc::stat)>> {
        let Some(st) = sys::lstat_path(path)? else { return Ok(None) };
        let Some(kind) = FileKind::from_mode(st.st_mode) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown file type"));
        };
        let symlink_target = if kind == FileKind::Symlink { Some(sys::readlink_path(path)?) } else { None };
        let xattrs = sys::path_xattrs(path)?;
        let attrs = Attrs {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: sys::timestamp(st.st_atime, st.st_atime_nsec),
            mtime: sys::timestamp(st.st_mtime, st.st_mtime_nsec),
            size: st.st_size as u64,
            rdev: st.st_rdev,
            symlink_target,
            xattrs,
        };
        Ok(Some((attrs, st)))
    }
}

/// What replay asks of the master. A network implementation answers from what the sender
/// read and shipped with the operation; [`DirSource`] reads a local directory.
///
/// Which paths each operation asks about is listed in the [`super`] module docs, so a
/// sender knows what to ship.
pub trait DataSource {
    /// Bytes `[offset, offset+len)` of the master's regular file at `path`, as it is now.
    /// Fewer bytes than `len` means the file ends there. With `ino`, only from that inode:
    /// if `path` names another object now, an error of kind `NotFound` (see [`replaced`]).
    fn read_range(&mut self, path: &RelPath, offset: u64, len: u64, ino: Option<u64>) -> io::Result<Vec<u8>>;

    /// The master's current attributes of `path`, `Ok(None)` when nothing is there.
    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>>;
}

/// A [`DataSource`] reading a directory on this machine: the master's export when the
/// sender fills messages, or a second tree in tests.
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> DirSource {
        DirSource { root: root.into() }
    }

    fn path(&self, rel: &RelPath) -> io::Result<PathBuf> {
        // The same checks as for the replica, so a bad path cannot read outside either.
        check_rel_path(rel).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if rel.as_bytes().is_empty() {
            return Ok(self.root.clone());
        }
        Ok(self.root.join(std::ffi::OsStr::from_bytes(rel.as_bytes())))
    }
}

/// The error of a read that asked for one object and found another under its name.
pub fn replaced(path: &RelPath) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{:?} names another file on the master now; the data follows its file later", path.display()),
    )
}

impl DataSource for DirSource {
    fn read_range(&mut self, path: &RelPath, offset: u64, len: u64, ino: Option<u64>) -> io::Result<Vec<u8>> {
        let p = self.path(path)?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
        // Reading should not change the master: O_NOATIME needs ownership or CAP_FOWNER,
        // so fall back on a plain open where it is refused.
        let fd = match sys::open(&p, flags | libc::O_NOATIME) {
            Err(e) if sys::errno(&e) == libc::EPERM => sys::open(&p, flags)?,
            r => r?,
        };
        let st = sys::fstat(fd.as_fd())?;
        if !sys::is_kind(&st, libc::S_IFREG) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        if ino.is_some_and(|i| i != st.st_ino) {
            return Err(replaced(path));
        }
        // Allocate only what the file holds: `len` may run far past its end.
        let avail = (st.st_size as u64).saturating_sub(offset);
        let len = usize::try_from(len.min(avail)).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = sys::pread(fd.as_fd(), &mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>> {
        Attrs::read(&self.path(path)?)
    }
}
