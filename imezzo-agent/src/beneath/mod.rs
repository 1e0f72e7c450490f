//! The only code that touches a replica or an export by path.
//!
//! Every path that names something in a replica or an export comes, in the end, from
//! somewhere we do not trust: the wire (a journal entry, a manifest, a fetch request) or a
//! tree that local users can change under us (a directory swapped for a symlink between a
//! listing and a removal). So nothing outside this module ever hands a multi-component path
//! to the kernel. The rules:
//!
//! 1. A [`Tree`] holds an `O_PATH` descriptor of its root, opened once. Every lookup starts
//!    there, with `openat2` under [`RESOLVE_STRICT`] (`RESOLVE_BENEATH |
//!    RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`): a symlink anywhere on the way is refused,
//!    never followed, and `..` cannot climb out.
//! 2. Only directories are opened that way. The final component is handled by `*at` calls
//!    relative to its parent's descriptor, with `AT_SYMLINK_NOFOLLOW` (or `O_NOFOLLOW`), so a
//!    symlink there is acted on itself ([`Loc`]).
//! 3. Attributes are read and set through descriptors: `fchmodat2(AT_SYMLINK_NOFOLLOW)`,
//!    `fchownat`, `utimensat`, and the `l*xattr` calls on `/proc/self/fd/<parent>/<name>`,
//!    where the kernel resolves the magic link to the very directory held and does not
//!    follow the final name; on an open regular file, the `f*` calls.
//! 4. Walks and removals descend by descriptor ([`remove_tree`], and listings through
//!    [`Tree::open_dir_with`]): a
//!    directory replaced by a symlink mid-walk is not entered.
//!
//! [`sys`] holds the raw syscall wrappers; the errno is always the caller's to interpret.

mod entry;
pub mod sys;

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use entry::{set_attrs_fd, xattr_is_local, Loc};
pub use sys::{cstring, errno, is_kind, RESOLVE_STRICT};

use crate::attrs::Attrs;
use crate::op::RelPath;

/// Names starting with this are imezzo's temporary files (replay's and the full sync's,
/// on a replica); they are reserved: never exported, never replicated, swept after a crash.
pub const TEMP_PREFIX: &[u8] = b".imezzo-tmp.";

/// A fresh temporary name: [`TEMP_PREFIX`] and 64 random bits, so nobody can take it ahead
/// (creations with it use `O_EXCL` or fail on an existing name anyway).
pub fn temp_name() -> CString {
    let mut name = TEMP_PREFIX.to_vec();
    name.extend_from_slice(sys::random_hex().as_bytes());
    CString::new(name).unwrap_or_default()
}

/// Errors that mean "nothing of the tree is there" for a lookup: the name is absent, a
/// component is not a directory, or a symlink (refused, not followed) is in the way.
pub fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
    )
}

/// Splits `a/b/c` into (`a/b`, `c`); `None` for the root (the empty path).
pub fn split_parent(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.is_empty() {
        return None;
    }
    Some(match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    })
}

/// A directory tree (a replica or an export) held open by its root.
#[derive(Debug)]
pub struct Tree {
    path: PathBuf,
    /// `O_PATH | O_DIRECTORY` on the root: every lookup starts here.
    fd: OwnedFd,
}

impl Tree {
    /// Opens the root. The root's own path is the one path looked up from `/`; it comes
    /// from the operator, not the wire.
    pub fn open(root: &Path) -> io::Result<Tree> {
        let fd = sys::open(root, libc::O_PATH | libc::O_DIRECTORY)?;
        Ok(Tree {
            path: root.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` beneath the root under [`RESOLVE_STRICT`], with `flags`. The empty path
    /// is the root itself. Errors as they came (see [`is_absent`]).
    pub fn open_at(&self, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = if rel.is_empty() {
            c".".to_owned()
        } else {
            cstring(rel)?
        };
        sys::openat2(self.fd(), &c, flags, RESOLVE_STRICT)
    }

    /// The directory `rel` (`O_PATH`), `None` when no directory of the tree is there.
    pub fn open_dir(&self, rel: &[u8]) -> io::Result<Option<OwnedFd>> {
        self.open_dir_with(rel, libc::O_PATH)
    }

    /// The directory `rel` opened with `flags | O_DIRECTORY` (`O_RDONLY` to list it).
    pub fn open_dir_with(&self, rel: &[u8], flags: libc::c_int) -> io::Result<Option<OwnedFd>> {
        match self.open_at(rel, flags | libc::O_DIRECTORY) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The parent directory of `rel` and its final name; `None` for the root, or when the
    /// parent is not a directory of the tree.
    pub fn parent(&self, rel: &[u8]) -> io::Result<Option<(OwnedFd, CString)>> {
        let Some((parent, name)) = split_parent(rel) else {
            return Ok(None);
        };
        let name = cstring(name)?;
        Ok(self.open_dir(parent)?.map(|fd| (fd, name)))
    }

    /// Opens the regular file `rel` for reading, without changing its atime where allowed;
    /// `Ok(None)` when nothing, or something other than a regular file, is there now.
    pub fn open_regular(&self, rel: &[u8]) -> io::Result<Option<(File, std::fs::Metadata)>> {
        if rel.is_empty() {
            return Ok(None);
        }
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
        // O_NOATIME needs CAP_FOWNER or ownership: fall back on a plain open where refused.
        let fd = match self.open_at(rel, flags | libc::O_NOATIME) {
            Err(e) if errno(&e) == libc::EPERM => self.open_at(rel, flags),
            r => r,
        };
        let file = match fd {
            Ok(fd) => File::from(fd),
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Ok(None);
        }
        Ok(Some((file, meta)))
    }

    /// The attributes of `rel` without following its final component, with the `lstat`
    /// they were read from; `Ok(None)` when nothing is there.
    pub fn attrs_with_stat(&self, rel: &RelPath) -> io::Result<Option<(Attrs, libc::stat)>> {
        let r = match self.parent(rel.as_bytes())? {
            Some((dir, name)) => Loc::entry(dir.as_fd(), &name).attrs(),
            None if rel.as_bytes().is_empty() => Loc::dir(self.fd()).attrs(),
            None => return Ok(None),
        };
        match r {
            Err(e) if is_absent(&e) => Ok(None),
            r => r,
        }
    }

    /// [`attrs_with_stat`](Self::attrs_with_stat) without the stat.
    pub fn attrs(&self, rel: &RelPath) -> io::Result<Option<Attrs>> {
        Ok(self.attrs_with_stat(rel)?.map(|(a, _)| a))
    }
}

/// Removes `name` in `dir` and, for a directory, everything beneath it, descending by
/// descriptor and never following a symlink; calls `freed` with the `lstat` of each object
/// whose last name it removed. A name already gone counts as removed.
pub fn remove_tree(
    dir: BorrowedFd<'_>,
    name: &CStr,
    freed: &mut dyn FnMut(&libc::stat),
) -> io::Result<()> {
    let Some(st) = Loc::entry(dir, name).stat()? else {
        return Ok(());
    };
    if !is_kind(&st, libc::S_IFDIR) {
        ignore_enoent(sys::unlinkat(dir, name, false))?;
        if st.st_nlink <= 1 {
            freed(&st);
        }
        return Ok(());
    }
    let sub = match sys::openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) if errno(&e) == libc::ENOENT => return Ok(()),
        Err(e) => return Err(e),
    };
    for (child, _) in sys::read_dir(sub.as_fd())? {
        remove_tree(sub.as_fd(), &cstring(&child)?, freed)?;
    }
    ignore_enoent(sys::unlinkat(dir, name, true))?;
    freed(&st);
    Ok(())
}

fn ignore_enoent(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if errno(&e) == libc::ENOENT => Ok(()),
        r => r,
    }
}
