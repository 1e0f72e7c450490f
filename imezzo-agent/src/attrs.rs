//! What an object is and carries, beyond its name: one type on the wire (manifests, fetch
//! answers), in replay, and in capture's walks. Read and set only through
//! [`crate::beneath`].

use crate::op::{Op, RelPath, Timestamp};

/// The type of a file system object.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
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
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
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
            FileKind::Regular => Op::Create {
                path: path.clone(),
                mode: self.mode,
            },
            FileKind::Directory => Op::Mkdir {
                path: path.clone(),
                mode: self.mode,
            },
            FileKind::Symlink => Op::Symlink {
                path: path.clone(),
                target: RelPath(self.symlink_target.clone()?),
            },
            other => Op::Mknod {
                path: path.clone(),
                mode: other.type_bits() | self.mode,
                rdev: self.rdev,
            },
        };
        let mut ops = vec![make];
        if self.kind == FileKind::Regular {
            // Truncate first: a stale longer tail must go, and the whole-file write that
            // follows is then built aside and renamed in (or filled in place when empty).
            ops.push(Op::Truncate {
                path: path.clone(),
                size: self.size,
            });
            ops.push(Op::Write {
                path: path.clone(),
                offset: 0,
                len: u64::MAX,
                source: None,
                mode: None,
                ino: None,
            });
        }
        for (name, _) in &self.xattrs {
            ops.push(Op::Setxattr {
                path: path.clone(),
                name: RelPath(name.clone()),
            });
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
}
