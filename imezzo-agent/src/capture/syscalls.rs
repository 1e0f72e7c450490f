//! The x86_64 syscalls imezzo captures, by number, and which probe handles each.
//!
//! The probes' dispatch table is filled from these lists, and the agent decodes events by the
//! same numbers, so this file is the one place that says what is captured.

/// Data changes through a file descriptor: handled by the `imezzo_write` probe.
pub const WRITE_FAMILY: &[(u32, &str)] = &[
    (1, "write"),
    // Shared writable mappings of watched files: made, synced, unmapped (see kind::MAPPED).
    (9, "mmap"),
    (11, "munmap"),
    // Only FICLONE and FICLONERANGE (reflink), which change the destination's bytes.
    (16, "ioctl"),
    (18, "pwrite64"),
    (20, "writev"),
    (26, "msync"),
    (40, "sendfile"),
    (77, "ftruncate"),
    (209, "io_submit"),
    (275, "splice"),
    (285, "fallocate"),
    (296, "pwritev"),
    (326, "copy_file_range"),
    (328, "pwritev2"),
];

/// Namespace and attribute changes: handled by the `imezzo_path` probe.
pub const PATH_FAMILY: &[(u32, &str)] = &[
    (2, "open"),
    (76, "truncate"),
    (82, "rename"),
    (83, "mkdir"),
    (84, "rmdir"),
    (85, "creat"),
    (86, "link"),
    (87, "unlink"),
    (88, "symlink"),
    (90, "chmod"),
    (91, "fchmod"),
    (92, "chown"),
    (93, "fchown"),
    (94, "lchown"),
    (132, "utime"),
    (133, "mknod"),
    (188, "setxattr"),
    (189, "lsetxattr"),
    (190, "fsetxattr"),
    (197, "removexattr"),
    (198, "lremovexattr"),
    (199, "fremovexattr"),
    (235, "utimes"),
    (257, "openat"),
    (258, "mkdirat"),
    (259, "mknodat"),
    (260, "fchownat"),
    (261, "futimesat"),
    (263, "unlinkat"),
    (264, "renameat"),
    (265, "linkat"),
    (266, "symlinkat"),
    (268, "fchmodat"),
    (280, "utimensat"),
    (316, "renameat2"),
    (437, "openat2"),
    (452, "fchmodat2"),
    (463, "setxattrat"),
    (466, "removexattrat"),
];

/// Syscalls that only read, or only flush, yet mark an inode dirty (atime updates,
/// writeback): the safety net ignores dirty inodes while a task is in one of them.
const READ_ONLY: &[u32] = &[
    0,   // read
    3,   // close
    9,   // mmap (file_accessed)
    17,  // pread64
    19,  // readv
    59,  // execve
    74,  // fsync
    75,  // fdatasync
    162, // sync
    187, // readahead
    221, // fadvise64
    277, // sync_file_range
    295, // preadv
    306, // syncfs
    322, // execveat
    327, // preadv2
];

pub fn name(nr: u32) -> &'static str {
    WRITE_FAMILY
        .iter()
        .chain(PATH_FAMILY)
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
        .unwrap_or("?")
}

/// The bitmap the dirty-inode probe consults: every captured syscall, plus the read-only ones.
pub fn quiet_dirty_bitmap() -> [u64; imezzo_common::SYSCALL_SLOTS / 64] {
    let mut bits = [0u64; imezzo_common::SYSCALL_SLOTS / 64];
    // io_submit's probe reads only its first control blocks, and ioctl's only the reflink
    // commands: the net stays on for both. munmap and msync report mappings, not the stores
    // through them: the net stays on for those too (mmap itself is read-only, below).
    let captured = WRITE_FAMILY
        .iter()
        .chain(PATH_FAMILY)
        .map(|(nr, _)| *nr)
        .filter(|&nr| !matches!(nr, 209 | 16 | 11 | 26));
    for nr in captured.chain(READ_ONLY.iter().copied()) {
        bits[nr as usize / 64] |= 1 << (nr % 64);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_captured_syscall_has_one_probe_and_fits_the_dispatch_table() {
        let mut seen = std::collections::HashSet::new();
        for (nr, name) in WRITE_FAMILY.iter().chain(PATH_FAMILY) {
            assert!((*nr as usize) < imezzo_common::SYSCALL_SLOTS, "{name}");
            assert!(seen.insert(*nr), "{name} listed twice");
        }
    }

    #[test]
    fn quiet_bitmap_covers_captured_and_read_syscalls_only() {
        let bits = quiet_dirty_bitmap();
        let quiet = |nr: u32| bits[nr as usize / 64] & (1 << (nr % 64)) != 0;
        assert!(quiet(1) && quiet(18) && quiet(0) && quiet(82));
        // A page fault stores its error code (6 or 7 for a user write) in orig_ax:
        // those must not be quiet, or mmap stores would go unseen.
        assert!(!quiet(6) && !quiet(7));
        // io_uring_enter writes inline: the safety net must report them.
        assert!(!quiet(426));
        // Other ioctls can change data (the probe reads only the reflink ones).
        assert!(!quiet(16) && !quiet(209));
        // munmap and msync report mappings, not the stores through them.
        assert!(quiet(9) && !quiet(11) && !quiet(26));
    }
}
