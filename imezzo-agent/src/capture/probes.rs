//! Loading, attaching and pinning the probes embedded in this binary.
//!
//! While the agent runs, its programs and maps are pinned under
//! `/sys/fs/bpf/imezzo/<instance>/` so that `bpftool prog show` and
//! `bpftool map dump pinned /sys/fs/bpf/imezzo/<instance>/imezzo_drops` show them; the pins
//! are removed when [`Probes`] is dropped (a clean exit). A pin directory left behind by a
//! killed agent is removed by the next one on the same root, which holds the instance lock.

use std::{
    fs, io,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::BtfTracePoint,
    Btf, Ebpf, EbpfLoader,
};
use imezzo_common::{Filter, OpenRun, DROPS_AIO_UNREAD, DROPS_RINGBUF_FULL, PATH_CAP};

use super::{kernel_btf, syscalls};

/// The probe object, built by build.rs from imezzo-ebpf.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imezzo"));

pub const BPFFS_DIR: &str = "/sys/fs/bpf/imezzo";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] kernel_btf::BtfError),
    #[error(
        "not allowed to load eBPF programs ({0}): run imezzo as root, or give it \
         CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"
    )]
    Privilege(String),
    #[error("cannot load the probes into this kernel: {0}")]
    Load(String),
    #[error("cannot attach probe {0}: {1}")]
    Attach(&'static str, String),
    #[error("cannot pin the probes under {0}: {1} (is bpffs mounted at /sys/fs/bpf?)")]
    Pin(PathBuf, String),
    #[error("the root path {0} is longer than {max} bytes, which the probes cannot match", max = PATH_CAP - 1)]
    RootTooLong(PathBuf),
}

pub struct ProbeConfig<'a> {
    /// Canonical absolute path of the exported root.
    pub root: &'a Path,
    /// Kernel-encoded device of the root, as `stat(2)` reports it.
    pub kernel_dev: u32,
    /// The root is on btrfs: the probes then report a btrfs inode's subvolume device, as
    /// `stat(2)` does, instead of the super block's `s_dev`.
    pub btrfs: bool,
    /// The root is on XFS: the probes then also watch `xfs_update_time` (XFS never marks
    /// an inode dirty for a data change's new times, see `imezzo_xfs_time`).
    pub xfs: bool,
    pub ring_bytes: u32,
    /// Name of the pin directory under [`BPFFS_DIR`].
    pub instance: &'a str,
}

pub struct Probes {
    _ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    drops: PerCpuArray<MapData, u64>,
    runs: PerCpuArray<MapData, OpenRun>,
    sleeping: Array<MapData, u32>,
    pin_dir: PathBuf,
}

fn is_permission(e: &dyn std::fmt::Display) -> bool {
    let s = e.to_string();
    s.contains("Operation not permitted") || s.contains("EPERM") || s.contains("os error 1)")
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Probes, ProbeError> {
        let mut offsets = kernel_btf::kernel_offsets()?;
        if cfg.btrfs {
            kernel_btf::add_btrfs(&mut offsets)?;
        }
        if cfg.xfs {
            kernel_btf::add_xfs(&mut offsets)?;
        }
        let root_bytes = cfg.root.as_os_str().as_encoded_bytes();
        if root_bytes.len() >= PATH_CAP {
            return Err(ProbeError::RootTooLong(cfg.root.to_path_buf()));
        }
        let mut filter = Filter {
            dev: cfg.kernel_dev,
            agent_tgid: std::process::id(),
            root_len: root_bytes.len() as u32,
            wake_bytes: cfg.ring_bytes / 8,
            quiet_dirty: syscalls::quiet_dirty_bitmap(),
            ..Filter::default()
        };
        filter.root_path[..root_bytes.len()].copy_from_slice(root_bytes);

        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("FILTER", &filter, true)
            .map_max_entries("imezzo_events", cfg.ring_bytes)
            .load(PROBE_OBJECT)
            .map_err(|e| load_error("the probe object", &e))?;

        let pin_dir = Path::new(BPFFS_DIR).join(cfg.instance);
        prepare_pin_dir(&pin_dir).map_err(|e| ProbeError::Pin(pin_dir.clone(), e.to_string()))?;

        // Tail-call targets first, then the dispatch table, then the entry points: once
        // attached, every syscall's exit goes through them.
        let btf = kernel_btf()?;
        let mut targets = Vec::new();
        for name in ["imezzo_write", "imezzo_path"] {
            let prog = tracing_program(&mut ebpf, name)?;
            prog.load("sys_exit", &btf).map_err(|e| load_error(name, &e))?;
            prog.pin(pin_dir.join(name)).map_err(|e| ProbeError::Pin(pin_dir.clone(), chain(&e)))?;
            targets.push(prog.fd().map_err(|e| ProbeError::Load(chain(&e)))?.try_clone().map_err(|e| ProbeError::Load(e.to_string()))?);
        }
        {
            let mut dispatch = ProgramArray::try_from(
                ebpf.map_mut("imezzo_dispatch").ok_or_else(|| ProbeError::Load("imezzo_dispatch missing".into()))?,
            )
            .map_err(|e| ProbeError::Load(chain(&e)))?;
            for (family, fd) in [(syscalls::WRITE_FAMILY, &targets[0]), (syscalls::PATH_FAMILY, &targets[1])] {
                for (nr, _) in family {
                    dispatch.set(*nr, fd, 0).map_err(|e| ProbeError::Load(chain(&e)))?;
                }
            }
        }
        let mut entry_points =
            vec![("imezzo_dirty", "writeback_mark_inode_dirty"), ("imezzo_exit", "sched_process_exit")];
        if offsets.uring_req_opcode != 0 {
            // io_kiocb is in the BTF (its opcode is never its first field).
            entry_points.push(("imezzo_uring_done", "io_uring_complete"));
        }
        if cfg.xfs {
            entry_points.push(("imezzo_xfs_time", "xfs_update_time"));
        }
        entry_points.push(("imezzo_sys_exit", "sys_exit"));
        for (name, tracepoint) in entry_points {
            let prog = tracing_program(&mut ebpf, name)?;
            prog.load(tracepoint, &btf).map_err(|e| load_error(name, &e))?;
            prog.attach().map_err(|e| ProbeError::Attach(name_static(name), chain(&e)))?;
            prog.pin(pin_dir.join(name)).map_err(|e| ProbeError::Pin(pin_dir.clone(), chain(&e)))?;
        }
        for name in ["imezzo_events", "imezzo_dispatch", "imezzo_drops", "imezzo_scratch", "imezzo_runs", "imezzo_mappers", "imezzo_sleeping"] {
            if let Some(map) = ebpf.map(name) {
                map.pin(pin_dir.join(name)).map_err(|e| ProbeError::Pin(pin_dir.clone(), chain(&e)))?;
            }
        }

        let events = RingBuf::try_from(ebpf.take_map("imezzo_events").expect("ring buffer in object"))
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        let drops = PerCpuArray::try_from(ebpf.take_map("imezzo_drops").expect("drop counter in object"))
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        let runs = PerCpuArray::try_from(ebpf.take_map("imezzo_runs").expect("write runs in object"))
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        let sleeping = Array::try_from(ebpf.take_map("imezzo_sleeping").expect("sleep flag in object"))
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        Ok(Probes { _ebpf: ebpf, events, drops, runs, sleeping, pin_dir })
    }

    /// Only the empty program on the exit of every syscall, attached and nothing else: what
    /// `imezzo_sys_exit` costs a writer beyond that is the capture's own work. Not pinned;
    /// detached when the returned object is dropped.
    pub fn load_empty() -> Result<Ebpf, ProbeError> {
        let mut ebpf = EbpfLoader::new()
            .load(PROBE_OBJECT)
            .map_err(|e| load_error("the probe object", &e))?;
        let btf = kernel_btf()?;
        let name = "imezzo_empty";
        let prog = tracing_program(&mut ebpf, name)?;
        prog.load("sys_exit", &btf).map_err(|e| load_error(name, &e))?;
        prog.attach().map_err(|e| ProbeError::Attach("imezzo_empty", chain(&e)))?;
        Ok(ebpf)
    }

    /// Events the probes could not deliver since load, summed over CPUs.
    pub fn drops(&self) -> u64 {
        self.counter(DROPS_RINGBUF_FULL)
    }

    /// io_submit calls since load whose control blocks were not all read (more than the
    /// probe reads), summed over CPUs.
    pub fn aio_unread(&self) -> u64 {
        self.counter(DROPS_AIO_UNREAD)
    }

    fn counter(&self, slot: u32) -> u64 {
        self.drops.get(&slot, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// The write run each CPU holds, as (cpu, run), for the runs that were stable while
    /// read: the probe makes `seq` odd while it changes a slot, so a slot read twice with
    /// the same even `seq` is consistent. A slot that was changing is skipped this time.
    /// Also the sum of every slot's `seq`, which grows at every write that grows, starts or
    /// ends a run (activity that puts nothing in the ring).
    pub fn open_runs(&self) -> (Vec<(u32, OpenRun)>, u64) {
        let (Ok(first), Ok(second)) = (self.runs.get(&0, 0), self.runs.get(&0, 0)) else {
            return (Vec::new(), 0);
        };
        let moves = second.iter().fold(0u64, |sum, r| sum.wrapping_add(r.seq));
        let open = first
            .iter()
            .zip(second.iter())
            .enumerate()
            .filter(|(_, (a, b))| a == b && a.seq % 2 == 0 && a.end > a.start)
            .map(|(cpu, (a, _))| (cpu as u32, *a))
            .collect();
        (open, moves)
    }

    /// Asks the probes to wake the agent at the next data event or write, which otherwise
    /// wake nobody (`Filter::wake_bytes`): set before the agent sleeps long while idle. The
    /// fence orders the flag before the caller's next look at the runs, so a write that the
    /// look misses sees the flag (a probe's plain load may still pass its own store to the
    /// run on another CPU: then the write waits for the end of the long sleep, unlost).
    pub fn ask_wake(&mut self) {
        // An array slot always exists; a failed update only costs the long sleep.
        let _ = self.sleeping.set(0, 1, 0);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub fn events_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

fn kernel_btf() -> Result<Btf, ProbeError> {
    Btf::from_sys_fs().map_err(|e| ProbeError::Load(format!("kernel BTF: {}", chain(&e))))
}

/// The BTF-typed tracepoint program `name` of the loaded object.
fn tracing_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint, ProbeError> {
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::Load(format!("{name} missing from the object")))?
        .try_into()
        .map_err(|e| ProbeError::Load(chain(&e)))
}

fn name_static(name: &str) -> &'static str {
    match name {
        "imezzo_dirty" => "imezzo_dirty",
        "imezzo_xfs_time" => "imezzo_xfs_time",
        "imezzo_uring_done" => "imezzo_uring_done",
        _ => "imezzo_sys_exit",
    }
}

fn load_error(name: &str, e: &dyn std::error::Error) -> ProbeError {
    let msg = format!("{name}: {}", chain(e));
    if is_permission(&msg) {
        ProbeError::Privilege(msg)
    } else {
        ProbeError::Load(msg)
    }
}

/// Makes sure bpffs is mounted and the instance's pin directory exists and is empty.
fn prepare_pin_dir(dir: &Path) -> io::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, ty) = (f.next(), f.next(), f.next());
        at == Some("/sys/fs/bpf") && ty == Some("bpf")
    });
    if !mounted {
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if dir.exists() {
        // Left by an agent that was killed; we hold the instance lock, so it is stale.
        remove_pins(dir)?;
    }
    fs::create_dir_all(dir)
}

fn remove_pins(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        fs::remove_file(entry?.path())?;
    }
    fs::remove_dir(dir)
}

impl Drop for Probes {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.pin_dir) {
            log::warn!("could not remove the pins in {}: {e}", self.pin_dir.display());
        }
    }
}
