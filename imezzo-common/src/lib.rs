//! Plain-old-data shared by the probes (`imezzo-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]` and crosses the kernel/user boundary as raw bytes, through
//! the ring buffer or as a global patched into the probe object at load time. Changing a layout
//! means rebuilding both sides, which the single embedded binary guarantees.
#![no_std]

/// Bytes of a path (or xattr name, or symlink target) the probe copies from user memory.
/// A longer string arrives with [`PathEvent::truncated`] set and makes the agent rescan.
pub const PATH_CAP: usize = 256;

/// Size of the syscall-number bitmaps below: x86_64 syscall numbers fit well under 512.
pub const SYSCALL_SLOTS: usize = 512;

/// Kinds of [`FdEvent`] and [`PathEvent`]; the first field of every ring-buffer record.
pub mod kind {
    /// Data written through a file descriptor: `a` = offset, `b` = length.
    pub const WRITE: u32 = 1;
    /// `ftruncate`: `a` = new size.
    pub const TRUNCATE: u32 = 2;
    /// `fallocate`: `a` = offset, `b` = length, `c` = mode.
    pub const FALLOCATE: u32 = 3;
    /// The dirty-inode safety net saw a data change outside any captured syscall
    /// (a store through a shared mmap, io_uring, an in-kernel writer): `a` = the inode
    /// state flags marked dirty (`u64::MAX` when the hook does not say), `b` = the task's
    /// `PF_*` flags; both for diagnostics.
    pub const DIRTY: u32 = 4;
    /// A namespace or attribute syscall: the record is a [`super::PathEvent`].
    pub const PATH: u32 = 5;
    /// `mmap` of a watched file, shared and writable: `a` = address, `b` = length. Stores
    /// through it show only as [`DIRTY`] when a page first becomes dirty (before the bytes
    /// are stored), and not at all while the page stays dirty.
    pub const MAPPED: u32 = 6;
    /// `munmap` by a process holding such a mapping: `a` = address, `b` = length.
    pub const UNMAPPED: u32 = 7;
    /// `msync` by a process holding such a mapping: `a` = address, `b` = length.
    pub const SYNCED: u32 = 8;
    /// A process holding such a mapping exited (its mappings are gone).
    pub const EXITED: u32 = 9;
    /// Nothing changed: the agent asked to be woken (it slept long while idle) and a write
    /// grew or started a run, which emits no record of its own.
    pub const WAKE: u32 = 10;
}

/// An inode as the kernel names it. `dev` is the kernel's encoding, `major << 20 | minor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevIno {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// A data change to an open file, already resolved to its inode in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FdEvent {
    pub kind: u32,
    pub tgid: u32,
    pub nr: u32,
    /// The CPU whose [`OpenRun`] this write run came from (when `c`, the run id, is not 0).
    pub cpu: u32,
    pub file: DevIno,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

/// A run of contiguous writes through one open file, held per CPU by the write probe
/// instead of one ring-buffer record per write. The probe emits it (a WRITE [`FdEvent`]
/// with `cpu` and `c` = `run`) when the run breaks or before any namespace event on that
/// CPU; the agent also reads the live runs every batch, under `seq` (odd while the probe
/// changes the slot), so a run that simply stops is journalled within one batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenRun {
    pub seq: u64,
    /// Run id, per CPU, increasing; 0 = never used.
    pub run: u64,
    /// `struct file *` and `struct inode *` of the run: a write through the same open file
    /// at the run's end extends it without reading anything else.
    pub file: u64,
    pub inode: u64,
    pub dev: u32,
    pub tgid: u32,
    pub ino: u64,
    pub start: u64,
    pub end: u64,
}

/// A namespace or attribute syscall that succeeded, with the strings it was given.
///
/// The kernel does not resolve paths: it reports where each path starts (`start_a`,
/// `start_b`: the directory of the `dirfd`, the working directory, or the process root for
/// an absolute path; for an fd-only call such as `fchmod`, the fd's own inode with an empty
/// path) and the agent walks the rest in its inode table.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PathEvent {
    pub kind: u32,
    pub tgid: u32,
    pub nr: u32,
    /// Bit 0: `path_a` was cut at [`PATH_CAP`]; bit 1: `path_b` was.
    pub truncated: u32,
    pub ret: i64,
    /// The syscall's six raw arguments.
    pub args: [u64; 6],
    pub start_a: DevIno,
    pub start_b: DevIno,
    /// For `open` family: the inode the returned fd refers to.
    pub result: DevIno,
    /// For `open` family: the returned file's `f_mode` (FMODE_CREATED says it was created).
    pub f_mode: u32,
    /// Call-specific values read from user memory at exit: for `utimensat`, the `tv_nsec`
    /// of the two timespecs (to tell UTIME_OMIT), or `u64::MAX` when `times` was NULL.
    pub extra: [u64; 2],
    pub len_a: u16,
    pub len_b: u16,
    pub path_a: [u8; PATH_CAP],
    pub path_b: [u8; PATH_CAP],
}

/// `tv_nsec` value of a timespec that `utimensat` must leave alone.
pub const UTIME_OMIT: u64 = (1 << 30) - 2;

/// `FMODE_CREATED` in `struct file`'s `f_mode`: the open created the file.
pub const FMODE_CREATED: u32 = 0x10_0000;

/// Offsets of the kernel struct fields the probes read, in bytes, taken from the running
/// kernel's BTF by the agent and patched into the probe object as the global `OFFSETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub task_fs: u32,
    pub task_flags: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_inode: u32,
    pub file_pos: u32,
    pub file_mode: u32,
    pub inode_sb: u32,
    pub inode_ino: u32,
    pub inode_mode: u32,
    pub inode_size: u32,
    pub sb_dev: u32,
    /// `super_block.s_magic`, to tell a btrfs inode.
    pub sb_magic: u32,
    /// btrfs only, zero elsewhere (see `BTRFS_SUPER_MAGIC`): `vfs_inode` and `root` in
    /// `struct btrfs_inode`, `anon_dev` in `struct btrfs_root`. Zero `btrfs_root_anon_dev`
    /// means the export is not on btrfs and the probes read `s_dev` alone.
    pub btrfs_vfs_inode: u32,
    pub btrfs_inode_root: u32,
    pub btrfs_root_anon_dev: u32,
    /// XFS only, zero elsewhere: `i_vnode` in `struct xfs_inode`, the VFS inode the XFS
    /// timestamp probe (`xfs_update_time`) reaches from the `struct xfs_inode *` it gets.
    pub xfs_vfs_inode: u32,
    /// `file` and `opcode` in `struct io_kiocb` (an io_uring request), for the completion
    /// probe; zero when the kernel has no io_uring.
    pub uring_req_file: u32,
    pub uring_req_opcode: u32,
    pub fs_root: u32,
    pub fs_pwd: u32,
    pub path_dentry: u32,
    pub dentry_inode: u32,
    pub regs_di: u32,
    pub regs_si: u32,
    pub regs_dx: u32,
    pub regs_r10: u32,
    pub regs_r8: u32,
    pub regs_r9: u32,
    pub regs_orig_ax: u32,
    /// Not an offset: the value of `I_DIRTY_PAGES` among this kernel's inode state flags
    /// (`enum inode_state_flags_t` since 6.12 or so, the constant 4 before).
    pub i_dirty_pages: u32,
}

/// `s_magic` of a btrfs super block (and `f_type` of its `statfs`). A btrfs inode's device,
/// as `stat(2)` reports it, is its subvolume's anonymous device (`root->anon_dev`), not the
/// super block's `s_dev`: the probes report that one, so that the kernel's and `stat`'s
/// devices agree on every file system.
pub const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;

/// `f_type` of an XFS file system's `statfs`. XFS logs timestamp updates in transactions
/// instead of marking the inode dirty, so on an XFS export the probes also watch
/// `xfs_update_time` (see `KernelOffsets::xfs_vfs_inode`).
pub const XFS_SUPER_MAGIC: u64 = 0x5846_5342;

/// What the agent tells the probes about the tree it watches, patched in as the global
/// `FILTER` at load time.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Filter {
    /// Kernel-encoded device of the exported root, as `stat(2)` reports it (on btrfs its
    /// subvolume's, see `BTRFS_SUPER_MAGIC`); events on other devices are dropped.
    pub dev: u32,
    /// The agent's own process: its changes are never captured.
    pub agent_tgid: u32,
    /// Length of `root_path`.
    pub root_len: u32,
    /// Data events do not wake the agent (it polls every few milliseconds) until this many
    /// bytes wait in the ring buffer: a wakeup per write would cost more than the probe.
    /// When the agent has been idle a while it sleeps long instead, asking (`imezzo_sleeping`)
    /// to be woken by the next data event or write.
    pub wake_bytes: u32,
    /// Canonical absolute path of the root: an absolute path argument is kept only when
    /// it lies beneath it.
    pub root_path: [u8; PATH_CAP],
    /// Syscalls during which the dirty-inode safety net stays quiet, because a syscall
    /// probe reports the change precisely, or because the syscall only reads
    /// (an atime update marks the inode dirty too).
    pub quiet_dirty: [u64; SYSCALL_SLOTS / 64],
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            dev: 0,
            agent_tgid: 0,
            root_len: 0,
            wake_bytes: 0,
            root_path: [0; PATH_CAP],
            quiet_dirty: [0; SYSCALL_SLOTS / 64],
        }
    }
}

/// Index of the lost-event counter in the per-CPU `imezzo_drops` array.
pub const DROPS_RINGBUF_FULL: u32 = 0;
/// io_submit calls that submitted more control blocks than the probe reads.
pub const DROPS_AIO_UNREAD: u32 = 1;
pub const DROPS_SLOTS: u32 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers and arrays of integers, with
    // explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::DevIno {}
    unsafe impl aya::Pod for super::FdEvent {}
    unsafe impl aya::Pod for super::OpenRun {}
    unsafe impl aya::Pod for super::PathEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Filter {}
}
