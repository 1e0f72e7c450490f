//! Thin, safe wrappers over the Linux syscalls the tree needs. Each returns `io::Result`
//! with the errno as it came; deciding what an errno means is the caller's job. Nothing
//! here takes a path of more than one component except [`openat2`], which is only called
//! with [`RESOLVE_STRICT`] by the parent module.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::op::Timestamp;

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `struct open_how` of linux/openat2.h (libc's is `non_exhaustive`, so it cannot be built).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The lookup rules for every path from the wire: stay beneath the directory fd, follow no
/// symlink at all (a symlinked parent is refused, not followed), no /proc magic links.
pub const RESOLVE_STRICT: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// openat2(2): opens `path` beneath `dirfd` under `resolve` rules.
pub fn openat2(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // The kernel answers EAGAIN when a concurrent rename raced the RESOLVE_BENEATH walk;
    // retrying is what openat2(2) asks callers to do.
    for _ in 0..16 {
        // SAFETY: `how` is a valid open_how of the size passed; `path` is NUL-terminated.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel just returned this fd to us.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        if errno(&e) != libc::EAGAIN {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// open(2) of an absolute path: only [`super::Tree::open`] calls it, for the root itself.
pub(super) fn open(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is NUL-terminated.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn openat(
    dirfd: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated.
    let fd = cvt(unsafe {
        libc::openat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

pub fn is_kind(st: &libc::stat, fmt: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == fmt
}

pub(crate) fn timespec(t: Option<Timestamp>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec {
            tv_sec: t.sec as libc::time_t,
            tv_nsec: t.nsec as libc::c_long,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

pub fn timestamp(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: nsec as u32,
    }
}

pub(crate) fn readlinkat(dirfd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid C string; `buf` is writable for its length.
        let n = cvt_size(unsafe {
            libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        // The target may have been cut: grow and read again (PATH_MAX bounds it).
        if buf.len() > libc::PATH_MAX as usize {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// The xattr names `list` writes into a buffer (a `listxattr`-family call returning the
/// bytes written, or -1 with errno), grown while the kernel says it is too small.
pub(crate) fn list_xattr_names(mut list: impl FnMut(&mut [u8]) -> isize) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match cvt_size(list(&mut buf)) {
            Ok(n) => break n,
            Err(e) if errno(&e) == libc::ERANGE && buf.len() < 1 << 20 => {
                buf.resize(buf.len() * 4, 0)
            }
            Err(e) if matches!(errno(&e), libc::ENOTSUP) => break 0,
            Err(e) => return Err(e),
        }
    };
    Ok(buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev as libc::dev_t) })
        .map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// linkat without AT_SYMLINK_FOLLOW: a symlink source gets a hard link to the symlink
/// itself, as link(2) does on Linux.
pub fn linkat(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, rmdir: bool) -> io::Result<()> {
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is readable for its length.
        let n = cvt_size(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        });
        match n {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is writable for its length.
        match cvt_size(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size =
        libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an owned fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// Granularity of hole detection in [`pwrite_sparse`]: the page and the usual block size.
pub const SPARSE_BLOCK: u64 = 4096;

/// Writes `buf` at `off` into a regular file whose size is `eof`, leaving every all-zero
/// block (aligned on file offsets) a hole, as the master's file most likely has it: such
/// blocks are skipped at or past EOF (the caller's final `ftruncate` makes the hole) and
/// punched below it (written as zeroes where the file system cannot punch). Returns the
/// file's size after the writes. One copy of this rule serves replay and full sync alike:
/// a fetch sends the zeroes of small holes, and writing them as data made replicas of
/// sparse trees several times their master's allocation.
pub fn pwrite_sparse(fd: BorrowedFd<'_>, buf: &[u8], off: u64, mut eof: u64) -> io::Result<u64> {
    let mut i = 0usize;
    while i < buf.len() {
        // A run of blocks that are all zero, or all not.
        let run = i;
        let mut zero = None;
        while i < buf.len() {
            let abs = off + i as u64;
            let next = (abs / SPARSE_BLOCK + 1) * SPARSE_BLOCK;
            let seg_end = buf.len().min(i + (next - abs) as usize);
            let z = buf[i..seg_end].iter().all(|&b| b == 0);
            if *zero.get_or_insert(z) != z {
                break;
            }
            i = seg_end;
        }
        let abs = off + run as u64;
        let n = (i - run) as u64;
        if zero == Some(false) {
            pwrite_all(fd, &buf[run..i], abs)?;
            eof = eof.max(abs + n);
        } else if abs < eof {
            let m = n.min(eof - abs);
            if !punch_hole(fd, abs, m)? {
                pwrite_all(fd, &buf[run..run + m as usize], abs)?;
            }
        }
    }
    Ok(eof)
}

/// Turns `[off, off+len)` into a hole; `Ok(false)` when the file system cannot punch
/// holes (the caller writes zeroes instead).
pub fn punch_hole(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<bool> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    match cvt(r) {
        Ok(_) => Ok(true),
        Err(e) if errno(&e) == libc::EOPNOTSUPP => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// 64 random bits as hex, for temporary names nobody can guess ahead.
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    // SAFETY: `b` is writable for its length. getrandom of 8 bytes does not block once the
    // pool is initialised and is never short for requests this small.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Only uniqueness matters here (O_EXCL catches a collision): fall back on time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ ((std::process::id() as u64) << 40)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Names in the directory `dir`, with whether each is a directory (from d_type, or lstat
/// where the file system does not fill d_type).
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, bool)>> {
    // Reading through the magic link opens this very directory, not a path.
    let rd = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let is_dir = e.file_type()?.is_dir();
        out.push((e.file_name().as_bytes().to_vec(), is_dir));
    }
    Ok(out)
}
