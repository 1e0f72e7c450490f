//! One object named the way the `*at` family wants it: a directory fd plus one component.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use super::sys::{cvt, cvt_size, errno, is_kind, list_xattr_names, readlinkat, timespec};
use crate::attrs::{Attrs, FileKind};
use crate::op::Timestamp;

const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;
/// Whether the `*xattrat` calls exist here: unknown until the first ENOSYS says missing.
static XATTRAT: AtomicU8 = AtomicU8::new(0);
const XATTRAT_MISSING: u8 = 2;

/// `struct xattr_args` of `getxattrat(2)` and `setxattrat(2)`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}
const XATTR_ARGS_LEN: usize = std::mem::size_of::<XattrArgs>();

/// A directory entry to work on, named relative to a directory fd (see module doc).
#[derive(Debug)]
pub struct Loc {
    dirfd: RawFd,
    name: CString,
    /// false for an entry (never follow its final component: it may be a symlink we are
    /// meant to change itself); true for `/proc/self/fd/N`, a magic link we must follow.
    follow: bool,
    /// For `/proc/self/fd/N`, N (the xattr calls name the object by it, see `xattrat`).
    fd: RawFd,
}

impl Loc {
    /// `name` inside the directory `dir`. The caller keeps `dir` open while using the Loc.
    pub fn entry(dir: BorrowedFd<'_>, name: &CStr) -> Loc {
        Loc {
            dirfd: dir.as_raw_fd(),
            name: name.to_owned(),
            follow: false,
            fd: -1,
        }
    }

    /// The directory held by `fd` itself (the caller keeps `fd` open while using the Loc).
    pub fn dir(fd: BorrowedFd<'_>) -> Loc {
        let name = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("no NUL in a formatted number");
        Loc {
            dirfd: libc::AT_FDCWD,
            name,
            follow: true,
            fd: fd.as_raw_fd(),
        }
    }

    pub fn name(&self) -> &CStr {
        &self.name
    }

    fn at_flags(&self) -> libc::c_int {
        if self.follow {
            0
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        }
    }

    /// A path for the xattr calls, which have no `*at` form in libc: the entry through its
    /// parent's magic link (the final component is still not followed: `l*xattr`).
    fn xattr_path(&self) -> CString {
        if self.follow {
            self.name.clone()
        } else {
            let mut p = format!("/proc/self/fd/{}/", self.dirfd).into_bytes();
            p.extend_from_slice(self.name.to_bytes());
            CString::new(p).expect("components hold no NUL")
        }
    }

    /// lstat of the entry; `None` when it does not exist.
    pub fn stat(&self) -> io::Result<Option<libc::stat>> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid C string and out-pointer.
        let r = unsafe {
            libc::fstatat(
                self.dirfd,
                self.name.as_ptr(),
                st.as_mut_ptr(),
                self.at_flags(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if errno(&e) == libc::ENOENT {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: fstatat succeeded.
        Ok(Some(unsafe { st.assume_init() }))
    }

    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let u = uid.unwrap_or(u32::MAX);
        let g = gid.unwrap_or(u32::MAX);
        // SAFETY: valid C string; -1 (u32::MAX) leaves that id unchanged.
        cvt(unsafe { libc::fchownat(self.dirfd, self.name.as_ptr(), u, g, self.at_flags()) })
            .map(drop)
    }

    /// chmod without following a final symlink. Linux has no mode on symlinks: for one,
    /// this does nothing.
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        let mode = mode & 0o7777;
        if self.follow {
            // SAFETY: valid C string.
            return cvt(unsafe { libc::fchmodat(self.dirfd, self.name.as_ptr(), mode, 0) })
                .map(drop);
        }
        // fchmodat2 (Linux 6.6) takes AT_SYMLINK_NOFOLLOW, so there is no window between
        // checking the type and changing the mode.
        // SAFETY: valid C string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                self.dirfd,
                self.name.as_ptr(),
                mode as libc::c_uint,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            libc::EOPNOTSUPP => Ok(()), // a symlink
            libc::ENOSYS => {
                if self.stat()?.is_some_and(|st| is_kind(&st, libc::S_IFLNK)) {
                    return Ok(());
                }
                // SAFETY: valid C string.
                cvt(unsafe { libc::fchmodat(self.dirfd, self.name.as_ptr(), mode, 0) }).map(drop)
            }
            _ => Err(e),
        }
    }

    /// Sets the times given, to the nanosecond; `None` leaves that time as it is.
    pub fn set_times(&self, atime: Option<Timestamp>, mtime: Option<Timestamp>) -> io::Result<()> {
        let ts = [timespec(atime), timespec(mtime)];
        // SAFETY: valid C string and a two-element timespec array.
        cvt(unsafe {
            libc::utimensat(self.dirfd, self.name.as_ptr(), ts.as_ptr(), self.at_flags())
        })
        .map(drop)
    }

    pub fn get_xattr(&self, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        // The path form only where the `*xattrat` one is missing (see `xattrat`).
        let p = || self.xattr_path();
        let mut buf = vec![0u8; 256];
        loop {
            let mut args = XattrArgs { value: buf.as_mut_ptr() as u64, size: buf.len() as u32, flags: 0 };
            // SAFETY: valid C strings; `args` points at `buf`, writable for its length.
            let r = unsafe {
                if let Some(r) = self.xattrat(|dir, path, flags| {
                    libc::syscall(SYS_GETXATTRAT, dir, path, flags, name.as_ptr(), &mut args as *mut XattrArgs, XATTR_ARGS_LEN)
                }) {
                    r
                } else if self.follow {
                    libc::getxattr(
                        p().as_ptr(),
                        name.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                } else {
                    libc::lgetxattr(
                        p().as_ptr(),
                        name.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                }
            };
            match cvt_size(r) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if errno(&e) == libc::ENODATA => return Ok(None),
                Err(e) if errno(&e) == libc::ERANGE && buf.len() < 1 << 17 => {
                    buf.resize(buf.len() * 4, 0)
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn set_xattr(&self, name: &CStr, value: &[u8]) -> io::Result<()> {
        // The path form only where the `*xattrat` one is missing (see `xattrat`).
        let p = || self.xattr_path();
        let args = XattrArgs { value: value.as_ptr() as u64, size: value.len() as u32, flags: 0 };
        // SAFETY: valid C strings; `args` points at `value`, readable for its length.
        let r = unsafe {
            if let Some(r) = self.xattrat(|dir, path, flags| {
                libc::syscall(SYS_SETXATTRAT, dir, path, flags, name.as_ptr(), &args as *const XattrArgs, XATTR_ARGS_LEN)
            }) {
                r as libc::c_int
            } else if self.follow {
                libc::setxattr(
                    p().as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            } else {
                libc::lsetxattr(
                    p().as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        };
        cvt(r).map(drop)
    }

    /// Removes one xattr; `Ok(false)` when it was not there.
    pub fn remove_xattr(&self, name: &CStr) -> io::Result<bool> {
        // The path form only where the `*xattrat` one is missing (see `xattrat`).
        let p = || self.xattr_path();
        // SAFETY: valid C strings.
        let r = unsafe {
            if let Some(r) = self.xattrat(|dir, path, flags| libc::syscall(SYS_REMOVEXATTRAT, dir, path, flags, name.as_ptr())) {
                r as libc::c_int
            } else if self.follow {
                libc::removexattr(p().as_ptr(), name.as_ptr())
            } else {
                libc::lremovexattr(p().as_ptr(), name.as_ptr())
            }
        };
        match cvt(r) {
            Ok(_) => Ok(true),
            Err(e) if errno(&e) == libc::ENODATA => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn list_xattrs(&self) -> io::Result<Vec<Vec<u8>>> {
        // Resolved only when the `*xattrat` form is missing (see `xattrat`).
        let mut path: Option<CString> = None;
        list_xattr_names(|buf| {
            // SAFETY: valid C strings; `buf` is writable for its length.
            unsafe {
                if let Some(r) = self.xattrat(|dir, p, flags| {
                    libc::syscall(SYS_LISTXATTRAT, dir, p, flags, buf.as_mut_ptr(), buf.len())
                }) {
                    return r;
                }
                let p = path.get_or_insert_with(|| self.xattr_path());
                if self.follow {
                    libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                } else {
                    libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
            }
        })
    }

    /// Runs one of the `*xattrat` system calls (Linux 6.13) on this object: they name an
    /// entry by its directory fd (never following its final component), and an object held
    /// open by its fd (`AT_EMPTY_PATH`), where the path calls need `/proc/self/fd/N/name`
    /// or `/proc/self/fd/N`, whose resolution through procfs was most of their cost
    /// (`llistxattr` took 6% of the server's samples at 1 000 changes/s, and replay lists a
    /// file's xattrs at every change of its attributes). `None` (for good, after the first
    /// ENOSYS) where the kernel lacks them: the caller uses the path form then.
    ///
    /// # Safety
    /// `call` must be one of those system calls with valid arguments after the three given.
    unsafe fn xattrat(&self, call: impl FnOnce(libc::c_int, *const libc::c_char, libc::c_uint) -> libc::c_long) -> Option<isize> {
        if XATTRAT.load(Ordering::Relaxed) == XATTRAT_MISSING {
            return None;
        }
        let r = if self.follow {
            call(self.fd, c"".as_ptr(), libc::AT_EMPTY_PATH as libc::c_uint)
        } else {
            call(self.dirfd, self.name.as_ptr(), libc::AT_SYMLINK_NOFOLLOW as libc::c_uint)
        };
        if r < 0 {
            match errno(&io::Error::last_os_error()) {
                libc::ENOSYS => {
                    XATTRAT.store(XATTRAT_MISSING, Ordering::Relaxed);
                    return None;
                }
                // An `O_PATH` fd: these calls refuse it, its magic link does not.
                libc::EBADF if self.follow => return None,
                _ => {}
            }
        }
        Some(r as isize)
    }

    pub fn readlink(&self) -> io::Result<Vec<u8>> {
        readlinkat(self.dirfd, &self.name)
    }

    /// The object's attributes and the `lstat` they came from (the final component is not
    /// followed); `Ok(None)` when nothing is there. A symlink's target is read whole
    /// (up to `PATH_MAX`), never cut short.
    pub fn attrs(&self) -> io::Result<Option<(Attrs, libc::stat)>> {
        let Some(st) = self.stat()? else {
            return Ok(None);
        };
        let Some(kind) = FileKind::from_mode(st.st_mode) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown file type",
            ));
        };
        let symlink_target = if kind == FileKind::Symlink {
            Some(self.readlink()?)
        } else {
            None
        };
        let mut xattrs = Vec::new();
        for name in self.list_xattrs()? {
            // Removed between list and get: it is simply not there.
            if let Some(value) = self.get_xattr(&super::cstring(&name)?)? {
                xattrs.push((name, value));
            }
        }
        let attrs = Attrs {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: super::sys::timestamp(st.st_atime, st.st_atime_nsec),
            mtime: super::sys::timestamp(st.st_mtime, st.st_mtime_nsec),
            size: st.st_size as u64,
            rdev: st.st_rdev,
            symlink_target,
            xattrs,
        };
        Ok(Some((attrs, st)))
    }

    /// Makes the object's owner, mode, xattrs and times `attrs`' (in that order: chown
    /// clears set-id bits, and every later change moves ctime only). Never follows a final
    /// symlink; a symlink has no mode of its own.
    pub fn set_attrs(&self, attrs: &Attrs) -> io::Result<()> {
        self.chown(Some(attrs.uid), Some(attrs.gid))?;
        self.chmod(attrs.mode)?;
        self.sync_xattrs(&attrs.xattrs)?;
        self.set_times(Some(attrs.atime), Some(attrs.mtime))
    }

    /// Makes the object's xattrs exactly `wanted`, except the host-local ones
    /// ([`xattr_is_local`]).
    pub fn sync_xattrs(&self, wanted: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
        for name in self.list_xattrs()? {
            if xattr_is_local(&name) || wanted.iter().any(|(w, _)| *w == name) {
                continue;
            }
            self.remove_xattr(&super::cstring(&name)?)?;
        }
        for (name, value) in wanted {
            self.set_xattr(&super::cstring(name)?, value).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("xattr {}: {e}", String::from_utf8_lossy(name)),
                )
            })?;
        }
        Ok(())
    }
}

/// Xattrs that belong to this host, not to the object: the SELinux label, which the
/// replica's own policy assigns.
pub fn xattr_is_local(name: &[u8]) -> bool {
    name == b"security.selinux"
}

/// [`Loc::set_attrs`] through an open regular file (owner, mode, xattrs, times).
pub fn set_attrs_fd(fd: BorrowedFd<'_>, attrs: &Attrs) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY (all calls below): a valid fd and buffers.
    cvt(unsafe { libc::fchown(raw, attrs.uid, attrs.gid) })?;
    cvt(unsafe { libc::fchmod(raw, attrs.mode & 0o7777) })?;
    Loc::dir(fd).sync_xattrs(&attrs.xattrs)?;
    let times = [timespec(Some(attrs.atime)), timespec(Some(attrs.mtime))];
    cvt(unsafe { libc::futimens(raw, times.as_ptr()) }).map(drop)
}
