//! imezzo's probes: every successful change under the exported tree, into one ring buffer.
//!
//! One raw tracepoint on `sys_exit` fires for every syscall. It exits at once for failed
//! calls, then tail-calls through `imezzo_dispatch`, a program array indexed by syscall
//! number that the agent fills only for the syscalls that change files; every other syscall
//! falls through the empty slot for the cost of one kernel read. At `sys_exit` the saved user
//! registers still hold the arguments, the return value says the call succeeded, and the
//! path strings are paged in because the kernel has just read them.
//!
//! * `imezzo_write`: the write family, `fallocate`, `ftruncate`, resolved fd -> inode here.
//! * `imezzo_path`: namespace and attribute calls; paths are copied raw with where they start
//!   (dirfd, cwd or process root) and resolved by the agent in its inode table.
//! * `imezzo_dirty`: a raw tracepoint on `writeback_mark_inode_dirty`, the safety net for
//!   data changes that no syscall probe sees (stores through mmap, io_uring, kernel writers).
//! * `imezzo_xfs_time`: the same net on `xfs_update_time`, attached for an XFS export only.
//!   XFS logs a data change's new mtime in a transaction and never marks the inode dirty
//!   for it, so a write into pages already dirty (io_uring, a store through mmap), a
//!   direct write or a reflink shows only there.
//! * `imezzo_uring_done`: a tp_btf on `io_uring_complete`; a completed io_uring write,
//!   splice, fallocate or ftruncate reports its file dirty (whole). The dirty nets miss an
//!   io_uring write that sets no new time (a file created in the same clock tick on tmpfs).
//! * `ioctl` FICLONE / FICLONERANGE (reflink): the destination's content changes with no
//!   write syscall; reported as a dirty file from `imezzo_write`.
//!
//! Struct offsets come from the running kernel's BTF through the `OFFSETS` global; nothing
//! here is compiled for one kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray, ProgramArray, RingBuf},
    programs::BtfTracePointContext,
};
use imezzo_common::{
    kind, DevIno, FdEvent, BTRFS_SUPER_MAGIC, Filter, KernelOffsets, OpenRun, PathEvent, DROPS_AIO_UNREAD, DROPS_RINGBUF_FULL, DROPS_SLOTS,
    PATH_CAP, SYSCALL_SLOTS,
};

#[no_mangle]
static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };

#[no_mangle]
static FILTER: Filter = unsafe { core::mem::zeroed() };

/// The agent sizes it at load time (`--ring-bytes`).
#[map(name = "imezzo_events")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map(name = "imezzo_dispatch")]
static DISPATCH: ProgramArray = ProgramArray::with_max_entries(SYSCALL_SLOTS as u32, 0);

/// Events that could not be delivered; the agent polls it and rescans when it grows.
#[map(name = "imezzo_drops")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROPS_SLOTS, 0);

/// The current run of contiguous writes on each CPU (see `OpenRun`).
#[map(name = "imezzo_runs")]
static RUNS: PerCpuArray<OpenRun> = PerCpuArray::with_max_entries(1, 0);

/// Non-zero while the agent sleeps long because nothing happened for a while. Data events
/// do not wake it (`data_wakeup`), and a write that only grows this CPU's run emits nothing:
/// the first of either after the agent set it clears it and wakes the agent, which then
/// polls every couple of milliseconds again. Two CPUs may both see it set: one more wakeup.
#[map(name = "imezzo_sleeping")]
static SLEEPING: Array<u32> = Array::with_max_entries(1, 0);

/// Processes (tgid) that made a shared writable mapping of a watched file: their munmap,
/// msync and exit are reported. An LRU map: a full table forgets the oldest process, whose
/// mappings the agent then treats as unmapped at its next batch (see `MAPPED`).
#[map(name = "imezzo_mappers")]
static MAPPERS: aya_ebpf::maps::LruHashMap<u32, u8> = aya_ebpf::maps::LruHashMap::with_max_entries(4096, 0);

/// A `PathEvent` is larger than the 512-byte BPF stack: it is built here.
#[map(name = "imezzo_scratch")]
static SCRATCH: PerCpuArray<PathEvent> = PerCpuArray::with_max_entries(1, 0);

const AT_FDCWD: i64 = -100;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const PF_IO_WORKER: u32 = 0x10;
const PF_WQ_WORKER: u32 = 0x20;
const PF_KTHREAD: u32 = 0x20_0000;

mod nr {
    pub const IOCTL: u64 = 16;
    pub const PWRITE64: u64 = 18;
    pub const FTRUNCATE: u64 = 77;
    pub const SPLICE: u64 = 275;
    pub const FALLOCATE: u64 = 285;
    pub const PWRITEV: u64 = 296;
    pub const COPY_FILE_RANGE: u64 = 326;
    pub const PWRITEV2: u64 = 328;
    pub const IO_SUBMIT: u64 = 209;
    pub const OPENAT2: u64 = 437;
    pub const MMAP: u64 = 9;
    pub const MUNMAP: u64 = 11;
    pub const MSYNC: u64 = 26;
}
const UTIMENSAT: u64 = 280;
const RWF_APPEND: u64 = 0x10;
/// `_IOW(0x94, 9, int)` and `_IOW(0x94, 13, struct file_clone_range)`: reflink the source
/// (whole, or a range) into the fd the ioctl is called on. FIDEDUPERANGE changes no bytes.
const FICLONE: u32 = 0x4004_9409;
const FICLONERANGE: u32 = 0x4020_940d;

/// A field of the `OFFSETS` global. The volatile read keeps the compiler from folding the
/// zero the object was compiled with: the agent patches the real value in at load time.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
    };
}

/// A field of the `FILTER` global, read like `off!`.
macro_rules! filt {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const FILTER.$($field)+) }
    };
}

/// A field of a struct the verifier knows the type of (a BTF pointer: the tracepoint's
/// typed arguments, `bpf_get_current_task_btf()` and what is reached from them): one
/// instruction, the kernel's exception table covers a bad pointer.
#[inline(always)]
fn ld<T: Copy>(base: *const u8, off: u32) -> T {
    unsafe { core::ptr::read(base.wrapping_add(off as usize) as *const T) }
}

#[inline(always)]
fn current_task() -> *const u8 {
    unsafe { bpf_get_current_task_btf() as *const u8 }
}

/// A field behind a pointer the verifier sees as a plain number (read from memory with
/// a helper): through `bpf_probe_read_kernel`.
#[inline(always)]
fn rd<T>(base: *const u8, off: u32) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }.map_err(|e| e as i64)
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Wakeup policy for data events: none until the agent has a good batch waiting, unless it
/// sleeps long (`SLEEPING`).
#[inline(always)]
fn data_wakeup() -> u64 {
    if agent_sleeping() || EVENTS.query(BPF_RB_AVAIL_DATA) >= filt!(wake_bytes) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Whether the agent sleeps long (see `SLEEPING`); clears the flag, so that the caller's
/// wakeup is the only one.
#[inline(always)]
fn agent_sleeping() -> bool {
    match SLEEPING.get_ptr_mut(0) {
        // SAFETY: a u32 slot of an array map; a racing CPU at worst wakes the agent twice.
        Some(flag) => unsafe {
            if *flag == 0 {
                false
            } else {
                *flag = 0;
                true
            }
        },
        None => false,
    }
}

/// A run grew or started without a record: wakes a sleeping agent, which reads the runs.
#[inline(always)]
fn wake_for_run() {
    if agent_sleeping() {
        // A full ring loses no change here (the agent is awake then, or wakes at the end
        // of its sleep and reads the runs): not counted as a drop, which would rescan.
        if let Some(mut entry) = EVENTS.reserve::<FdEvent>(0) {
            entry.write(FdEvent { kind: kind::WAKE, tgid: 0, nr: 0, cpu: 0, file: DevIno::default(), a: 0, b: 0, c: 0 });
            entry.submit(BPF_RB_FORCE_WAKEUP);
        }
    }
}

#[inline(always)]
fn count_drop() {
    if let Some(slot) = DROPS.get_ptr_mut(DROPS_RINGBUF_FULL) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Syscall argument `n` (0..6) from the saved user registers.
#[inline(always)]
fn arg(regs: *const u8, n: u32) -> Result<u64, i64> {
        let off = match n {
        0 => off!(regs_di),
        1 => off!(regs_si),
        2 => off!(regs_dx),
        3 => off!(regs_r10),
        4 => off!(regs_r8),
        _ => off!(regs_r9),
    };
    Ok(ld::<u64>(regs, off))
}

/// `fd -> struct file *` of the current task, or null when the fd is not open.
#[inline(always)]
fn fd_file(fd: u64) -> Result<*const u8, i64> {
        let task = current_task();
    let files: *const u8 = ld(task, off!(task_files));
    let fdt: *const u8 = ld(files, off!(files_fdt));
    let max: u32 = ld(fdt, off!(fdt_max_fds));
    if fd >= max as u64 {
        return Ok(core::ptr::null());
    }
    let table: *const u8 = ld(fdt, off!(fdt_fd));
    rd(table, (fd as u32).wrapping_mul(8))
}

/// The inode's device as `stat(2)` reports it, kernel-encoded: the super block's `s_dev`,
/// except on btrfs (when the export is on btrfs), where each subvolume has its own
/// anonymous device, `BTRFS_I(inode)->root->anon_dev`.
#[inline(always)]
fn inode_dev(inode: *const u8) -> Result<u32, i64> {
    let sb: *const u8 = rd(inode, off!(inode_sb))?;
    let anon_dev = off!(btrfs_root_anon_dev);
    if anon_dev != 0 {
        let magic: u64 = rd(sb, off!(sb_magic))?;
        if magic == BTRFS_SUPER_MAGIC {
            // container_of(inode, struct btrfs_inode, vfs_inode)->root->anon_dev
            let bi = inode.wrapping_sub(off!(btrfs_vfs_inode) as usize);
            let root: *const u8 = rd(bi, off!(btrfs_inode_root))?;
            return rd(root, anon_dev);
        }
    }
    rd(sb, off!(sb_dev))
}

#[inline(always)]
fn inode_devino(inode: *const u8) -> Result<DevIno, i64> {
    if inode.is_null() {
        return Ok(DevIno::default());
    }
    Ok(DevIno { dev: inode_dev(inode)?, _pad: 0, ino: rd(inode, off!(inode_ino))? })
}

#[btf_tracepoint(function = "sys_exit")]
pub fn imezzo_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let nr: u64 = ld(regs, off!(regs_orig_ax));
    // The hot path, a plain write or pwrite, is handled here: a tail call costs more than
    // the test.
    if nr == 1 || nr == nr::PWRITE64 {
        let _ = try_write(&ctx);
        return 0;
    }
    if nr < SYSCALL_SLOTS as u64 {
        // SAFETY: a failed tail call (empty slot) simply returns here.
        unsafe { DISPATCH.tail_call(&ctx, nr as u32) };
    }
    0
}

/// Does nothing: `imezzo capture --empty-probe` attaches only this, so that `cargo xtask bench
/// capture` can measure what any program on every syscall's exit costs, the floor beneath
/// `imezzo_sys_exit`'s own work.
#[btf_tracepoint(function = "sys_exit")]
pub fn imezzo_empty(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn imezzo_write(ctx: BtfTracePointContext) -> i32 {
    let _ = try_write(&ctx);
    0
}

/// Up to this many of an io_submit's control blocks are read. A call that submitted more
/// counts in `DROPS_AIO_UNREAD`, and the agent rescans: the dirty-inode safety net, which
/// io_submit does not silence, does not fire for every write (not for a new file's first
/// write on tmpfs, not for a direct write on ext4).
const AIO_IOCBS: usize = 64;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_PWRITEV: u16 = 8;

/// io_submit(2): libaio writes. Each submitted write control block names its fd, offset and
/// length; a vectored one only its iovec count, so its whole file is reported dirty. (A new
/// file's buffered aio write on tmpfs marks no inode dirty: the safety net never sees it.)
#[inline(always)]
fn try_io_submit(regs: *const u8, ret: i64) -> Result<(), i64> {
    let tgid = current_tgid();
    if tgid == filt!(agent_tgid) {
        return Ok(());
    }
    let iocbpp = arg(regs, 2)? as *const u64;
    if ret > AIO_IOCBS as i64 {
        if let Some(slot) = DROPS.get_ptr_mut(DROPS_AIO_UNREAD) {
            // SAFETY: per-CPU slot, no other writer on this CPU while we run.
            unsafe { *slot += 1 };
        }
    }
    for i in 0..AIO_IOCBS {
        if i as i64 >= ret {
            break;
        }
        let iocb: u64 = unsafe { bpf_probe_read_user(iocbpp.wrapping_add(i)) }.map_err(|e| e as i64)?;
        let base = iocb as *const u8;
        let opcode: u16 = unsafe { bpf_probe_read_user(base.wrapping_add(16) as *const u16) }.map_err(|e| e as i64)?;
        if opcode != IOCB_CMD_PWRITE && opcode != IOCB_CMD_PWRITEV {
            continue;
        }
        let fd: u32 = unsafe { bpf_probe_read_user(base.wrapping_add(20) as *const u32) }.map_err(|e| e as i64)?;
        let nbytes: u64 = unsafe { bpf_probe_read_user(base.wrapping_add(32) as *const u64) }.map_err(|e| e as i64)?;
        let offset: u64 = unsafe { bpf_probe_read_user(base.wrapping_add(40) as *const u64) }.map_err(|e| e as i64)?;
        let file = fd_file(fd as u64)?;
        if file.is_null() {
            continue;
        }
        let inode: *const u8 = rd(file, off!(file_inode))?;
        let dev = inode_dev(inode)?;
        if dev != filt!(dev) {
            continue;
        }
        let ino: u64 = rd(inode, off!(inode_ino))?;
        let (kind, a, b) = if opcode == IOCB_CMD_PWRITE { (kind::WRITE, offset, nbytes) } else { (kind::DIRTY, 0, 0) };
        match EVENTS.reserve::<FdEvent>(0) {
            Some(mut entry) => {
                entry.write(FdEvent {
                    kind,
                    tgid,
                    nr: nr::IO_SUBMIT as u32,
                    cpu: 0,
                    file: DevIno { dev, _pad: 0, ino },
                    a,
                    b,
                    c: 0,
                });
                entry.submit(data_wakeup());
            }
            None => count_drop(),
        }
    }
    Ok(())
}

/// mmap (shared, writable, of a watched file), and the munmap and msync of a process that
/// made one: the agent journals the mapped file again when its mapping is synced or goes,
/// once the stores through it are done.
fn try_map(regs: *const u8, nr: u64, ret: i64) -> Result<(), i64> {
    const PROT_WRITE: u64 = 2;
    const MAP_SHARED: u64 = 1;
    let tgid = current_tgid();
    if tgid == filt!(agent_tgid) {
        return Ok(());
    }
    let (kind, file) = if nr == nr::MMAP {
        if arg(regs, 2)? & PROT_WRITE == 0 || arg(regs, 3)? & MAP_SHARED == 0 {
            return Ok(());
        }
        let file = fd_file(arg(regs, 4)?)?;
        if file.is_null() {
            return Ok(());
        }
        let inode: *const u8 = rd(file, off!(file_inode))?;
        let dev = inode_dev(inode)?;
        if dev != filt!(dev) {
            return Ok(());
        }
        let _ = MAPPERS.insert(&tgid, &1, 0);
        (kind::MAPPED, DevIno { dev, _pad: 0, ino: rd(inode, off!(inode_ino))? })
    } else {
        if unsafe { MAPPERS.get(&tgid) }.is_none() {
            return Ok(());
        }
        (if nr == nr::MUNMAP { kind::UNMAPPED } else { kind::SYNCED }, DevIno::default())
    };
    let a = if nr == nr::MMAP { ret as u64 } else { arg(regs, 0)? };
    let b = arg(regs, 1)?;
    emit_fd(FdEvent { kind, tgid, nr: nr as u32, cpu: 0, file, a, b, c: 0 });
    Ok(())
}

#[inline(always)]
fn emit_fd(ev: FdEvent) {
    match EVENTS.reserve::<FdEvent>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(data_wakeup());
        }
        None => count_drop(),
    }
}

/// A process that made a shared writable mapping of a watched file exits: its mappings go.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn imezzo_exit(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The whole process: its last thread, the group leader, by the usual exit order.
    if pid_tgid as u32 != tgid || unsafe { MAPPERS.get(&tgid) }.is_none() {
        return 0;
    }
    let _ = MAPPERS.remove(&tgid);
    emit_fd(FdEvent { kind: kind::EXITED, tgid, nr: 0, cpu: 0, file: DevIno::default(), a: 0, b: 0, c: 0 });
    0
}

fn try_write(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let ret: i64 = ctx.arg(1);
    let regs: *const u8 = ctx.arg(0);
        let nr: u64 = ld(regs, off!(regs_orig_ax));
    if nr == nr::IO_SUBMIT {
        return try_io_submit(regs, ret);
    }
    if nr == nr::MMAP || nr == nr::MUNMAP || nr == nr::MSYNC {
        return try_map(regs, nr, ret);
    }
    if nr == nr::IOCTL {
        // Every ioctl comes here: leave at once unless it is a reflink.
        let cmd = arg(regs, 1)? as u32;
        if cmd != FICLONE && cmd != FICLONERANGE {
            return Ok(());
        }
    }
    let fd_arg = match nr {
        nr::SPLICE | nr::COPY_FILE_RANGE => 2,
        _ => 0,
    };
    let file = fd_file(arg(regs, fd_arg)?)?;
    if file.is_null() {
        return Ok(());
    }
    let inode: *const u8 = rd(file, off!(file_inode))?;
    let run = RUNS.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: per-CPU slot; the agent reads it concurrently only under `seq`.
    let run = unsafe { &mut *run };
    let extends = run.file == file as u64 && run.inode == inode as u64 && run.end > run.start;
    let tgid = current_tgid();
    let dev = if extends {
        // The run only ever holds a watched file written by someone else than the agent.
        run.dev
    } else {
        let dev = inode_dev(inode)?;
        if dev != filt!(dev) || tgid == filt!(agent_tgid) {
            return Ok(());
        }
        dev
    };
    let (kind, a, b, c) = match nr {
        nr::FTRUNCATE => (kind::TRUNCATE, arg(regs, 1)?, 0, 0),
        nr::FALLOCATE => (kind::FALLOCATE, arg(regs, 2)?, arg(regs, 3)?, arg(regs, 1)?),
        // A reflink: which bytes changed is the source's business; the whole file is dirty.
        nr::IOCTL => (kind::DIRTY, 0, 0, 0),
        _ => {
            if ret == 0 {
                return Ok(());
            }
            let len = ret as u64;
            let explicit = match nr {
                nr::PWRITE64 | nr::PWRITEV => Some(arg(regs, 3)?),
                nr::PWRITEV2 => match arg(regs, 3)? as i64 {
                    -1 => None,
                    // RWF_APPEND writes at the end whatever the offset, and leaves f_pos.
                    _ if arg(regs, 5)? & RWF_APPEND != 0 => {
                        Some(rd::<u64>(inode, off!(inode_size))?.wrapping_sub(len))
                    }
                    off => Some(off as u64),
                },
                nr::SPLICE | nr::COPY_FILE_RANGE => {
                    let ptr = arg(regs, 3)? as *const u64;
                    if ptr.is_null() {
                        None
                    } else {
                        // The kernel advanced *off_out by the bytes it wrote.
                        let after: u64 = unsafe { bpf_probe_read_user(ptr) }.map_err(|e| e as i64)?;
                        Some(after.wrapping_sub(len))
                    }
                }
                _ => None,
            };
            let offset = match explicit {
                Some(off) => off,
                // write, writev, sendfile and friends advanced f_pos past what they wrote
                // (O_APPEND included: f_pos is set to the end first).
                None => rd::<u64>(file, off!(file_pos))?.wrapping_sub(len),
            };
            if extends && offset == run.end {
                // The common case of a sequential writer: one more run, nothing emitted.
                run.seq += 1;
                run.end = offset.wrapping_add(len);
                run.seq += 1;
                wake_for_run();
                return Ok(());
            }
            let ino: u64 = rd(inode, off!(inode_ino))?;
            run.seq += 1;
            flush_run(run);
            run.run += 1;
            run.file = file as u64;
            run.inode = inode as u64;
            run.dev = dev;
            run.tgid = tgid;
            run.ino = ino;
            run.start = offset;
            run.end = offset.wrapping_add(len);
            run.seq += 1;
            wake_for_run();
            return Ok(());
        }
    };
    // Truncate, fallocate and reflink: after any run this CPU holds, so the journal keeps order.
    flush_this_cpu();
    let ino: u64 = rd(inode, off!(inode_ino))?;
    match EVENTS.reserve::<FdEvent>(0) {
        Some(mut entry) => {
            entry.write(FdEvent {
                kind,
                tgid,
                nr: nr as u32,
                cpu: 0,
                file: DevIno { dev, _pad: 0, ino },
                a,
                b,
                c,
            });
            entry.submit(data_wakeup());
        }
        None => count_drop(),
    }
    Ok(())
}

/// Emits this CPU's run, if it holds any bytes, and leaves it empty.
#[inline(always)]
fn flush_run(r: &mut OpenRun) {
    if r.end > r.start {
        match EVENTS.reserve::<FdEvent>(0) {
            Some(mut entry) => {
                entry.write(FdEvent {
                    kind: kind::WRITE,
                    tgid: r.tgid,
                    nr: 0,
                    cpu: unsafe { bpf_get_smp_processor_id() },
                    file: DevIno { dev: r.dev, _pad: 0, ino: r.ino },
                    a: r.start,
                    b: r.end - r.start,
                    c: r.run,
                });
                entry.submit(data_wakeup());
            }
            None => count_drop(),
        }
    }
    r.start = r.end;
}

/// Flushes this CPU's run under the slot's sequence counter.
#[inline(always)]
fn flush_this_cpu() {
    if let Some(r) = RUNS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; only the agent reads it concurrently, under `seq`.
        let r = unsafe { &mut *r };
        if r.end > r.start {
            r.seq += 1;
            flush_run(r);
            r.seq += 1;
        }
    }
}

/// How a syscall names its objects: where each path argument starts.
#[derive(Clone, Copy)]
enum Start {
    /// No such argument.
    None,
    /// Relative to the working directory (`AT_FDCWD` implied).
    Cwd,
    /// Relative to the directory fd in argument n.
    DirFd(u32),
    /// The fd in argument n names the object itself (fchmod, fsetxattr ...).
    Fd(u32),
    /// Argument n is a plain string, not a path (an xattr name, a symlink target).
    Text,
}

/// Per syscall: (start of path a, index of path a, start of b, index of b).
#[inline(always)]
fn layout(nr: u64) -> Option<(Start, u32, Start, u32)> {
    use Start::*;
    Some(match nr {
        2 | 85 | 83 | 133 | 87 | 84 | 76 | 90 | 92 | 94 | 132 | 235 => (Cwd, 0, None, 0),
        257 | 437 | 258 | 259 | 263 | 268 | 452 | 260 | 261 | 280 => (DirFd(0), 1, None, 0),
        82 | 86 => (Cwd, 0, Cwd, 1),
        264 | 316 | 265 => (DirFd(0), 1, DirFd(2), 3),
        88 => (Cwd, 1, Text, 0),
        266 => (DirFd(1), 2, Text, 0),
        91 | 93 => (Fd(0), 0, None, 0),
        188 | 189 | 197 | 198 => (Cwd, 0, Text, 1),
        190 | 199 => (Fd(0), 0, Text, 1),
        463 | 466 => (DirFd(0), 1, Text, 3),
        _ => return Option::None,
    })
}

#[btf_tracepoint(function = "sys_exit")]
pub fn imezzo_path(ctx: BtfTracePointContext) -> i32 {
    let _ = try_path(&ctx);
    0
}

/// The inode a path walk starts from: the fd's, the cwd's or the process root's.
#[inline(always)]
fn start_inode(abs: bool, dirfd: i64) -> Result<*const u8, i64> {
        if abs || dirfd == AT_FDCWD {
        let fs: *const u8 = ld(current_task(), off!(task_fs));
        let dentry: *const u8 = if abs {
            ld(fs, off!(fs_root).wrapping_add(off!(path_dentry)))
        } else {
            ld(fs, off!(fs_pwd).wrapping_add(off!(path_dentry)))
        };
        return Ok(ld(dentry, off!(dentry_inode)));
    }
    let file = fd_file(dirfd as u64)?;
    if file.is_null() {
        return Ok(core::ptr::null());
    }
    rd(file, off!(file_inode))
}

/// The fd number of a `/proc/self/fd/N` or `/proc/thread-self/fd/N` path, if it is one.
#[inline(always)]
fn proc_self_fd(path: &[u8; PATH_CAP]) -> Option<u64> {
    const SELF: &[u8; 14] = b"/proc/self/fd/";
    const THREAD: &[u8; 21] = b"/proc/thread-self/fd/";
    let start = if path[..SELF.len()] == SELF[..] {
        SELF.len()
    } else if path[..THREAD.len()] == THREAD[..] {
        THREAD.len()
    } else {
        return None;
    };
    let mut fd: u64 = 0;
    let mut i = 0usize;
    while i < 10 {
        let c = path[(start + i) & (PATH_CAP - 1)];
        if c == 0 {
            break;
        }
        if !c.is_ascii_digit() {
            return None;
        }
        fd = fd * 10 + (c - b'0') as u64;
        i += 1;
    }
    if i == 0 || i == 10 {
        return None;
    }
    Some(fd)
}

/// Is this absolute path the root or beneath it?
#[inline(always)]
fn beneath_root(path: &[u8; PATH_CAP]) -> bool {
    let n = filt!(root_len) as usize;
    if n == 0 || n >= PATH_CAP {
        return false;
    }
    let mut i = 0usize;
    while i < PATH_CAP - 1 {
        if i >= n {
            break;
        }
        if path[i] != filt!(root_path[i]) {
            return false;
        }
        i += 1;
    }
    let next = path[n & (PATH_CAP - 1)];
    next == 0 || next == b'/'
}

/// Fill one path argument of the event: its start inode and its bytes.
/// Returns whether it touches the watched device.
#[inline(always)]
fn fill_path(
    regs: *const u8,
    start: Start,
    idx: u32,
    dst: &mut [u8; PATH_CAP],
    len: &mut u16,
    at: &mut DevIno,
    truncated: &mut u32,
    bit: u32,
) -> Result<bool, i64> {
    let watched = filt!(dev);
    *len = 0;
    *at = DevIno::default();
    dst[0] = 0;
    match start {
        Start::None => Ok(false),
        Start::Fd(n) => {
            let file = fd_file(arg(regs, n)?)?;
            if file.is_null() {
                return Ok(false);
            }
            let inode: *const u8 = rd(file, off!(file_inode))?;
            *at = inode_devino(inode)?;
            Ok(at.dev == watched)
        }
        Start::Text | Start::Cwd | Start::DirFd(_) => {
            let ptr = arg(regs, idx)? as *const u8;
            if !ptr.is_null() {
                let got = unsafe { bpf_probe_read_user_str_bytes(ptr, dst) }.map_err(|e| e as i64)?;
                *len = got.len() as u16;
                if got.len() >= PATH_CAP - 1 {
                    *truncated |= bit;
                }
            }
            if let Start::Text = start {
                return Ok(false);
            }
            let dirfd = match start {
                Start::DirFd(n) => arg(regs, n)? as i32 as i64,
                _ => AT_FDCWD,
            };
            let abs = *len > 0 && dst[0] == b'/';
            if abs {
                if let Some(fd) = proc_self_fd(dst) {
                    // `/proc/self/fd/N` (tar's chmod of an O_PATH fd, for one) names the
                    // object open at fd N: resolve it here, while the fd is still open.
                    let file = fd_file(fd)?;
                    if file.is_null() {
                        return Ok(false);
                    }
                    let inode: *const u8 = rd(file, off!(file_inode))?;
                    *at = inode_devino(inode)?;
                    *len = 0;
                    dst[0] = 0;
                    return Ok(at.dev == watched);
                }
            }
            let inode = start_inode(abs, dirfd)?;
            *at = inode_devino(inode)?;
            Ok(at.dev == watched || (abs && beneath_root(dst)))
        }
    }
}

fn try_path(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let ret: i64 = ctx.arg(1);
    let regs: *const u8 = ctx.arg(0);
        let nr: u64 = ld(regs, off!(regs_orig_ax));
    let Some((start_a, idx_a, start_b, idx_b)) = layout(nr) else { return Ok(()) };
    let tgid = current_tgid();
    if tgid == filt!(agent_tgid) {
        return Ok(());
    }
    let ev = SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: per-CPU scratch, this program is its only user on this CPU.
    let ev = unsafe { &mut *ev };
    ev.kind = kind::PATH;
    ev.tgid = tgid;
    ev.nr = nr as u32;
    ev.truncated = 0;
    ev.ret = ret;
    let mut i = 0u32;
    while i < 6 {
        ev.args[i as usize] = arg(regs, i)?;
        i += 1;
    }
    let mut keep = fill_path(regs, start_a, idx_a, &mut ev.path_a, &mut ev.len_a, &mut ev.start_a, &mut ev.truncated, 1)?;
    keep |= fill_path(regs, start_b, idx_b, &mut ev.path_b, &mut ev.len_b, &mut ev.start_b, &mut ev.truncated, 2)?;
    ev.result = DevIno::default();
    ev.f_mode = 0;
    if matches!(nr, 2 | 85 | 257 | 437) {
        // open family: ret is the new fd; its inode says what was opened, f_mode whether
        // this call created it.
        let file = fd_file(ret as u64)?;
        if !file.is_null() {
            let inode: *const u8 = rd(file, off!(file_inode))?;
            ev.result = inode_devino(inode)?;
            ev.f_mode = rd(file, off!(file_mode))?;
            keep |= ev.result.dev == filt!(dev);
        }
        if nr == nr::OPENAT2 {
            // struct open_how { u64 flags; u64 mode; u64 resolve; } replaces (how, size).
            let how = ev.args[2] as *const u64;
            ev.args[2] = unsafe { bpf_probe_read_user(how) }.map_err(|e| e as i64)?;
            ev.args[3] = unsafe { bpf_probe_read_user(how.wrapping_add(1)) }.map_err(|e| e as i64)?;
        }
    }
    ev.extra = [u64::MAX; 2];
    if nr == UTIMENSAT && ev.args[2] != 0 {
        // struct timespec times[2] = { atime, mtime }: 16 bytes each, tv_nsec second.
        let times = ev.args[2] as *const u64;
        ev.extra[0] = unsafe { bpf_probe_read_user(times.wrapping_add(1)) }.map_err(|e| e as i64)?;
        ev.extra[1] = unsafe { bpf_probe_read_user(times.wrapping_add(3)) }.map_err(|e| e as i64)?;
    }
    if !keep {
        return Ok(());
    }
    // Writes this CPU still holds happened before this call: journal them first.
    flush_this_cpu();
    if EVENTS.output::<PathEvent>(ev, 0).is_err() {
        count_drop();
    }
    Ok(())
}

#[btf_tracepoint(function = "writeback_mark_inode_dirty")]
pub fn imezzo_dirty(ctx: BtfTracePointContext) -> i32 {
    let _ = try_dirty(&ctx);
    0
}

fn try_dirty(ctx: &BtfTracePointContext) -> Result<(), i64> {
    dirty_inode(ctx.arg(0), ctx.arg(1))
}

#[btf_tracepoint(function = "xfs_update_time")]
pub fn imezzo_xfs_time(ctx: BtfTracePointContext) -> i32 {
    // The argument is a `struct xfs_inode *`; its VFS inode is embedded in it.
    let ip: *const u8 = ctx.arg(0);
    let _ = dirty_inode(ip.wrapping_add(off!(xfs_vfs_inode) as usize), u64::MAX);
    0
}

mod uring_op {
    pub const WRITEV: u8 = 2;
    pub const WRITE_FIXED: u8 = 5;
    pub const FALLOCATE: u8 = 17;
    pub const WRITE: u8 = 23;
    pub const SPLICE: u8 = 30;
    pub const FTRUNCATE: u8 = 55;
    pub const WRITEV_FIXED: u8 = 61;
}
const IO_URING_ENTER: u32 = 426;

#[btf_tracepoint(function = "io_uring_complete")]
pub fn imezzo_uring_done(ctx: BtfTracePointContext) -> i32 {
    let _ = try_uring_done(&ctx);
    0
}

/// (ctx, req, cqe): the request's result is in the completion entry, its opcode and file
/// in the request (null for entries no request posted).
fn try_uring_done(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let req: *const u8 = ctx.arg(1);
    let cqe: *const u8 = ctx.arg(2);
    if req.is_null() || cqe.is_null() {
        return Ok(());
    }
    // struct io_uring_cqe { __u64 user_data; __s32 res; ... }
    let res: i32 = rd(cqe, 8)?;
    if res < 0 {
        return Ok(());
    }
    let opcode: u8 = rd(req, off!(uring_req_opcode))?;
    match opcode {
        uring_op::WRITEV | uring_op::WRITE_FIXED | uring_op::WRITE | uring_op::SPLICE | uring_op::WRITEV_FIXED => {
            if res == 0 {
                return Ok(());
            }
        }
        uring_op::FALLOCATE | uring_op::FTRUNCATE => {}
        _ => return Ok(()),
    }
    let file: *const u8 = rd(req, off!(uring_req_file))?;
    if file.is_null() {
        return Ok(());
    }
    let inode: *const u8 = rd(file, off!(file_inode))?;
    let dev = inode_dev(inode)?;
    if dev != filt!(dev) {
        return Ok(());
    }
    let mode: u16 = rd(inode, off!(inode_mode))?;
    if mode & S_IFMT != S_IFREG {
        return Ok(());
    }
    // A completion can be posted from any task (an interrupt's): no test of the agent's
    // own tgid, which does not use io_uring.
    let ino: u64 = rd(inode, off!(inode_ino))?;
    match EVENTS.reserve::<FdEvent>(0) {
        Some(mut entry) => {
            entry.write(FdEvent {
                kind: kind::DIRTY,
                tgid: current_tgid(),
                nr: IO_URING_ENTER,
                cpu: 0,
                file: DevIno { dev, _pad: 0, ino },
                a: 0,
                b: 0,
                c: 0,
            });
            entry.submit(data_wakeup());
        }
        None => count_drop(),
    }
    Ok(())
}

/// The safety net: `inode`, a regular file on the watched device, changed in a way no
/// syscall probe reports (unless the task is inside a syscall the probes already cover or
/// one that only reads): report it dirty, whole.
#[inline(always)]
fn dirty_inode(inode: *const u8, dirty_flags: u64) -> Result<(), i64> {
    let dev = inode_dev(inode)?;
    if dev != filt!(dev) {
        return Ok(());
    }
    let mode: u16 = rd(inode, off!(inode_mode))?;
    if mode & S_IFMT != S_IFREG {
        return Ok(());
    }
    let tgid = current_tgid();
    if tgid == filt!(agent_tgid) {
        return Ok(());
    }
    // Which syscall is this task in? A page fault's entry stores its error code where a
    // syscall stores its number; neither collides with the quiet set below.
    let task = current_task();
    let flags: u32 = ld(task, off!(task_flags));
    // A workqueue worker marks an inode dirty for its own bookkeeping while it writes
    // pages out (ext4's flush worker, after the pages of a database's checkpoint: once per
    // table, which then travelled whole). Its writes change no byte; a workqueue worker
    // that does write for someone (ksmbd, a loop device) dirties the pages it writes.
    if flags & PF_WQ_WORKER != 0 && flags & PF_IO_WORKER == 0 && dirty_flags & off!(i_dirty_pages) as u64 == 0 {
        return Ok(());
    }
    // Other io_uring workers and kernel threads write on someone's behalf with no syscall
    // of their own (their saved registers are zeroed): always report them.
    let in_thread = flags & (PF_KTHREAD | PF_IO_WORKER) != 0;
    let regs = unsafe { bpf_task_pt_regs(task as *mut aya_ebpf::bindings::task_struct) } as *const u8;
    let nr: u64 = ld(regs, off!(regs_orig_ax));
    if !in_thread && nr < SYSCALL_SLOTS as u64 {
        let word = filt!(quiet_dirty[(nr as usize / 64) & (SYSCALL_SLOTS / 64 - 1)]);
        if word & (1u64 << (nr % 64)) != 0 {
            return Ok(());
        }
    }
    let ino: u64 = rd(inode, off!(inode_ino))?;
    match EVENTS.reserve::<FdEvent>(0) {
        Some(mut entry) => {
            entry.write(FdEvent {
                kind: kind::DIRTY,
                tgid,
                nr: nr as u32,
                cpu: 0,
                file: DevIno { dev, _pad: 0, ino },
                a: dirty_flags,
                b: flags as u64,
                c: 0,
            });
            entry.submit(data_wakeup());
        }
        None => count_drop(),
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
