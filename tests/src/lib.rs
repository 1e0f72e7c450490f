//! Shared harness for the integration tests.
//!
//! The tests drive the real `imezzo` binary, with its real probes, against
//! real file systems mounted for each test:
//!
//! * [`Fs`] mounts a fresh tmpfs (or a loop-mounted ext4, btrfs or XFS image) under `/tmp`
//!   and creates `root/` (the directory under capture) and `sibling/` (same
//!   file system, outside the root) in it. Everything is unmounted and removed
//!   on drop.
//! * [`Capture`] runs `imezzo capture --root <root> --json`, reads its stdout
//!   (journal ops, one JSON object a line) and stderr (logs) on two threads,
//!   and offers [`Capture::ops_until`] / [`Capture::mark`] / [`Capture::expect`]
//!   to assert the exact journal a scenario produces.
//! * [`sys`] wraps the raw syscalls the scenarios perform (through
//!   `libc::syscall`, so that each test exercises exactly the syscall it names).
//! * [`replica`] runs `imezzo server` and `imezzo client` for the replication
//!   tests, builds trees and tarballs, and speaks the wire protocol as a hostile peer.
//!
//! CI rule: these tests run as root. A test that cannot mount, or whose agent
//! cannot load its probes, fails (panics with the agent's stderr); nothing here
//! skips.

use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use serde_json::json;

/// Servers, clients and trees for the replication tests.
pub mod replica;

/// The random differential tester: seeded concurrent workloads, faults, convergence check.
pub mod differential;

/// How long the agent may take to print `capture ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a journal op may take to show up after the syscall that caused it.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to exit after a signal (or after a start-up error).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the agent pins its programs and maps: one subdirectory per instance.
pub const PIN_BASE: &str = "/sys/fs/bpf/imezzo";

/// The agent binary: `$IMEZZO_BIN`, else `<workspace>/target/release/imezzo`.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("IMEZZO_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/imezzo"),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static INIT: Once = Once::new();

/// Process-wide set-up shared by all tests of one binary: a known umask
/// (tests still compute expected modes from `stat`, never from the umask).
fn init_process() {
    INIT.call_once(|| unsafe {
        libc::umask(0o022);
    });
}

/// Serialises the tests of one test binary that must not overlap with any
/// other agent start (e.g. tests that diff `/sys/fs/bpf/imezzo`). Test
/// binaries run one after another, so a process-wide lock is enough.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn cstr(p: impl AsRef<OsStr>) -> CString {
    CString::new(p.as_ref().as_bytes()).expect("path contains a NUL byte")
}

fn run_cmd(prog: &str, args: &[&OsStr]) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    if !out.status.success() {
        panic!(
            "{prog} {:?} failed ({}):\nstdout: {}\nstderr: {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// File systems
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Tmpfs,
    Ext4,
    /// A loop-mounted XFS image (Debian xfsprogs).
    Xfs,
    /// A loop-mounted btrfs image (Debian btrfs-progs).
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Tmpfs => "tmpfs",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }

    pub fn parse(s: &str) -> Option<FsKind> {
        [FsKind::Tmpfs, FsKind::Ext4, FsKind::Xfs, FsKind::Btrfs]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// A freshly mounted file system private to one test.
///
/// Layout: `<base>/mnt` is the mount point; inside it `root/` is the exported
/// root and `sibling/` is a directory outside the root on the same device.
/// An ext4, btrfs or XFS image lives at `<base>/disk.img`, outside the mount.
pub struct Fs {
    pub kind: FsKind,
    pub base: PathBuf,
    pub mnt: PathBuf,
    pub root: PathBuf,
    pub sibling: PathBuf,
    mounted: bool,
}

impl Fs {
    pub fn tmpfs(tag: &str) -> Fs {
        Fs::new(tag, FsKind::Tmpfs)
    }

    pub fn ext4(tag: &str) -> Fs {
        Fs::new(tag, FsKind::Ext4)
    }

    pub fn btrfs(tag: &str) -> Fs {
        Fs::new(tag, FsKind::Btrfs)
    }

    pub fn xfs(tag: &str) -> Fs {
        Fs::new(tag, FsKind::Xfs)
    }

    pub fn new(tag: &str, kind: FsKind) -> Fs {
        Fs::new_sized(tag, kind, None)
    }

    /// Like [`Fs::new`], with a size: a tmpfs mounted with `size=BYTES`, or a loop image of
    /// that many bytes (sparse). Without a size: an unlimited tmpfs, a 64 MiB ext4 image, or
    /// the smallest XFS (300 MiB) or btrfs (256 MiB) image the mkfs tools accept.
    pub fn new_sized(tag: &str, kind: FsKind, size: Option<u64>) -> Fs {
        init_process();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = PathBuf::from(format!(
            "/tmp/imezzo-it-{}-{}-{}",
            tag,
            std::process::id(),
            n
        ));
        let mnt = base.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap_or_else(|e| panic!("mkdir {mnt:?}: {e}"));
        let mut fs = Fs {
            kind,
            root: mnt.join("root"),
            sibling: mnt.join("sibling"),
            base,
            mnt,
            mounted: false,
        };
        match kind {
            FsKind::Tmpfs => {
                let src = cstr("imezzo-test");
                let target = cstr(&fs.mnt);
                let fstype = cstr("tmpfs");
                let data = cstr(match size {
                    Some(bytes) => format!("mode=0755,size={bytes}"),
                    None => "mode=0755".to_string(),
                });
                let r = unsafe {
                    libc::mount(
                        src.as_ptr(),
                        target.as_ptr(),
                        fstype.as_ptr(),
                        0,
                        data.as_ptr() as *const libc::c_void,
                    )
                };
                if r != 0 {
                    panic!(
                        "mount tmpfs on {:?}: {}",
                        fs.mnt,
                        std::io::Error::last_os_error()
                    );
                }
            }
            FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs => {
                let img = fs.base.join("disk.img");
                let default = match kind {
                    FsKind::Xfs => 300 << 20,
                    FsKind::Btrfs => 256 << 20,
                    _ => 64 << 20,
                };
                let bytes = size.unwrap_or(default).to_string();
                run_cmd(
                    "truncate",
                    &[OsStr::new("-s"), OsStr::new(&bytes), img.as_os_str()],
                );
                match kind {
                    FsKind::Xfs => run_cmd(
                        "mkfs.xfs",
                        &[OsStr::new("-q"), OsStr::new("-f"), img.as_os_str()],
                    ),
                    FsKind::Btrfs => run_cmd(
                        "mkfs.btrfs",
                        &[OsStr::new("-q"), OsStr::new("-f"), img.as_os_str()],
                    ),
                    _ => run_cmd(
                        "mkfs.ext4",
                        &[OsStr::new("-q"), OsStr::new("-F"), img.as_os_str()],
                    ),
                }
                run_cmd(
                    "mount",
                    &[
                        OsStr::new("-o"),
                        OsStr::new("loop"),
                        img.as_os_str(),
                        fs.mnt.as_os_str(),
                    ],
                );
            }
        }
        fs.mounted = true;
        std::fs::create_dir(&fs.root).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", fs.root));
        std::fs::create_dir(&fs.sibling).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", fs.sibling));
        fs
    }

    /// A path inside the root (`""` is the root itself).
    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// A path inside `sibling/` (outside the root).
    pub fn s(&self, rel: &str) -> PathBuf {
        self.sibling.join(rel)
    }

    /// Set-up helper: writes a file inside the root (parents must exist).
    pub fn put(&self, rel: &str, data: &[u8]) {
        let p = self.p(rel);
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
    }

    /// Set-up helper: creates a directory (and its parents) inside the root.
    pub fn dirs(&self, rel: &str) {
        let p = self.p(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir -p {p:?}: {e}"));
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if self.mounted {
            let c = cstr(&self.mnt);
            unsafe {
                if libc::umount2(c.as_ptr(), 0) != 0 {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

type OpLine = Result<Value, String>;

/// A running `imezzo capture`.
pub struct Capture {
    child: Child,
    pub pid: i32,
    pub root: PathBuf,
    ops_rx: mpsc::Receiver<OpLine>,
    stdout_closed: bool,
    stderr: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
    /// Every journal op read so far, in order.
    pub seen: Vec<Value>,
    markers: u32,
}

fn spawn_reader(
    stream: impl std::io::Read + Send + 'static,
    mut sink: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while buf.last() == Some(&b'\n') || buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                    sink(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        }
    })
}

impl Capture {
    /// Starts `imezzo capture --root ROOT --json` and waits for `capture ready`.
    pub fn start(root: &Path) -> Capture {
        Capture::start_with(root, &[])
    }

    /// Like [`Capture::start`], with extra arguments (e.g. `--ring-bytes`).
    pub fn start_with(root: &Path, extra: &[&str]) -> Capture {
        let mut c = Capture::spawn(root, extra);
        c.wait_ready();
        c
    }

    /// Spawns `imezzo capture --root ROOT --json EXTRA...` without waiting.
    pub fn spawn(root: &Path, extra: &[&str]) -> Capture {
        let mut args: Vec<OsString> = vec![
            "capture".into(),
            "--root".into(),
            root.as_os_str().into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        Capture::spawn_args(root, &args)
    }

    /// Spawns the agent binary with arbitrary arguments.
    pub fn spawn_args(root: &Path, args: &[OsString]) -> Capture {
        init_process();
        let bin = agent_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the agent {bin:?}: {e} (build it with `cargo build --release -p imezzo-agent` \
                     or set IMEZZO_BIN)"
                )
            });
        let pid = child.id() as i32;
        let (tx, ops_rx) = mpsc::channel::<OpLine>();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let t1 = spawn_reader(out, move |line| {
            if line.trim().is_empty() {
                return;
            }
            let msg = match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() => Ok(v),
                _ => Err(line),
            };
            let _ = tx.send(msg);
        });
        let sink = stderr.clone();
        let t2 = spawn_reader(err, move |line| sink.lock().unwrap().push(line));
        Capture {
            child,
            pid,
            root: root.to_path_buf(),
            ops_rx,
            stdout_closed: false,
            stderr,
            threads: vec![t1, t2],
            status: None,
            seen: Vec::new(),
            markers: 0,
        }
    }

    /// All stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// A description of everything the agent said so far, for panic messages.
    pub fn context(&self) -> String {
        let mut s = String::new();
        if let Some(st) = self.status {
            s += &format!("agent exited: {st}\n");
        }
        s += &format!("journal ops seen so far ({}):\n", self.seen.len());
        let n = self.seen.len();
        for (i, op) in self.seen.iter().enumerate() {
            if n > 120 && i >= 20 && i < n - 80 {
                if i == 20 {
                    s += &format!("    ... {} more ...\n", n - 100);
                }
                continue;
            }
            s += &format!("    {op}\n");
        }
        let err = self.stderr();
        s += &format!("agent stderr ({} lines):\n", err.len());
        for l in err
            .iter()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            s += &format!("    {l}\n");
        }
        s
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits until a stderr line satisfies `pred`; returns it, or None on timeout.
    pub fn wait_stderr(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            if self.exited().is_some() {
                // Give the reader thread a moment to drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return self
                    .stderr
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| pred(l))
                    .cloned();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to 20 s) for the `capture ready` line; panics with the
    /// agent's stderr if it does not come (probes failed to load, ...).
    pub fn wait_ready(&mut self) {
        if self
            .wait_stderr(|l| l.contains("capture ready"), READY_TIMEOUT)
            .is_none()
        {
            let st = self.exited();
            panic!(
                "the agent did not print `capture ready` within {READY_TIMEOUT:?} (exit status: {st:?})\n{}",
                self.context()
            );
        }
    }

    /// The next journal op, or None if none arrived within `timeout` (or stdout closed).
    pub fn next_op(&mut self, timeout: Duration) -> Option<Value> {
        if self.stdout_closed {
            return None;
        }
        match self.ops_rx.recv_timeout(timeout) {
            Ok(Ok(v)) => {
                self.seen.push(v.clone());
                Some(v)
            }
            Ok(Err(line)) => panic!(
                "the agent printed a line on stdout that is not a JSON object: {line:?}\n{}",
                self.context()
            ),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                None
            }
        }
    }

    /// Collects ops until one satisfies `pred`; returns `(ops before it, it)`.
    /// Panics (with context) if none does within `timeout`.
    pub fn ops_until_with(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
        what: &str,
    ) -> (Vec<Value>, Value) {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; ops collected meanwhile: {}\n{}",
                    fmt_ops(&got),
                    self.context()
                );
            }
            match self.next_op(deadline - now) {
                Some(op) if pred(&op) => return (got, op),
                Some(op) => got.push(op),
                None if self.stdout_closed => {
                    let _ = self.exited();
                    panic!(
                        "the agent's stdout closed while waiting for {what}; ops collected meanwhile: {}\n{}",
                        fmt_ops(&got),
                        self.context()
                    );
                }
                None => {}
            }
        }
    }

    /// Collects ops until one satisfies `pred`; returns the ops before it.
    pub fn ops_until(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Vec<Value> {
        self.ops_until_with(pred, timeout, "a matching op").0
    }

    /// Creates a new marker file `root/.marker-N` and returns every op
    /// journalled before the marker's `create`.
    pub fn mark(&mut self) -> Vec<Value> {
        self.markers += 1;
        let name = format!(".marker-{}", self.markers);
        let path = self.root.join(&name);
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create marker {path:?}: {e}"));
        let want = name.clone();
        self.ops_until_with(
            move |op| op["op"] == "create" && op["path"] == want.as_str(),
            OP_TIMEOUT,
            &format!("the create of marker {name}"),
        )
        .0
    }

    /// Marks, then asserts that the ops before the marker are exactly `expected`
    /// (compared after [`normalize`]). Returns those ops.
    pub fn expect(&mut self, expected: &[Value]) -> Vec<Value> {
        let ops = self.mark();
        let got: Vec<Value> = ops.iter().map(normalize).collect();
        let want: Vec<Value> = expected.iter().map(normalize).collect();
        if got != want {
            // Show what the agent journals shortly after the marker too: it
            // tells an op journalled late (out of order) from one never journalled.
            let mut late = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Some(op) = self.next_op(deadline.saturating_duration_since(Instant::now())) {
                late.push(op);
            }
            panic!(
                "journal mismatch\n  expected: {}\n  got:      {}\n  journalled after the marker (within 2 s): {}\n{}",
                fmt_ops(&want),
                fmt_ops(&got),
                fmt_ops(&late),
                self.context()
            );
        }
        ops
    }

    pub fn signal(&self, sig: libc::c_int) {
        unsafe {
            libc::kill(self.pid, sig);
        }
    }

    /// Waits for the agent to exit (SIGKILL and panic after `timeout`), then
    /// drains its output. Returns the exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let st = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
                panic!(
                    "the agent did not exit within {timeout:?}; killed it\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        while let Some(_op) = self.next_op(Duration::from_millis(0)) {}
        st
    }

    /// SIGINT, wait for the exit; returns the exit status and all stderr lines.
    pub fn stop(&mut self) -> (ExitStatus, Vec<String>) {
        self.signal(libc::SIGINT);
        let st = self.wait_exit(EXIT_TIMEOUT);
        (st, self.stderr())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Try a clean stop first so the agent unpins its probes.
            self.signal(libc::SIGCONT);
            self.signal(libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.exited().is_none() {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Journal helpers
// ---------------------------------------------------------------------------

/// An op as compared by [`Capture::expect`]: without `seq`, without null
/// fields, without `exchange: false` / `noreplace: false`.
pub fn normalize(op: &Value) -> Value {
    let mut m = op.as_object().cloned().unwrap_or_default();
    m.remove("seq");
    m.retain(|k, v| {
        !v.is_null() && !((k == "exchange" || k == "noreplace") && *v == Value::Bool(false))
    });
    Value::Object(m)
}

pub fn fmt_ops(ops: &[Value]) -> String {
    if ops.is_empty() {
        return "[]".into();
    }
    let mut s = String::from("[\n");
    for op in ops {
        s += &format!("      {op}\n");
    }
    s + "    ]"
}

/// The union of the `[offset, offset+len)` extents of the `write` ops for
/// `path`, sorted and merged.
pub fn write_extents(ops: &[Value], path: &str) -> Vec<(u64, u64)> {
    let v = ops
        .iter()
        .filter(|o| o["op"] == "write" && o["path"] == path)
        .map(|o| {
            let off = o["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("write op without a numeric offset: {o}"));
            let len = o["len"]
                .as_u64()
                .unwrap_or_else(|| panic!("write op without a numeric len: {o}"));
            (off, off + len)
        })
        .collect();
    merge_extents(v)
}

pub fn merge_extents(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(a, b)| b > a);
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `{"sec": s, "nsec": n}` as the journal prints times.
pub fn ts(sec: i64, nsec: i64) -> Value {
    json!({"sec": sec, "nsec": nsec})
}

/// (atime, mtime) of `path` (not following a final symlink), journal-style.
pub fn stat_times(path: &Path) -> (Value, Value) {
    let st = sys::lstat(path).unwrap();
    (
        ts(st.st_atime, st.st_atime_nsec),
        ts(st.st_mtime, st.st_mtime_nsec),
    )
}

/// Permission bits of `path` (st_mode & 07777, not following a final symlink).
pub fn perm(path: &Path) -> u32 {
    sys::lstat(path).unwrap().st_mode & 0o7777
}

/// The agent's summary line on stop: `imezzo: capture stopped: events=N drops=N rescans=N ops=N
/// coarsened=N polls=N woken=N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub events: u64,
    pub drops: u64,
    pub rescans: u64,
    pub ops: u64,
    /// Times the capture loop woke to drain.
    pub polls: u64,
    /// Long idle sleeps the probes cut short.
    pub woken: u64,
}

pub fn summary(stderr: &[String]) -> Option<Summary> {
    let line = stderr
        .iter()
        .rev()
        .find(|l| l.contains("imezzo: capture stopped:"))?;
    let rest = &line[line.find("capture stopped:")? + "capture stopped:".len()..];
    let get = |k: &str| -> Option<u64> {
        rest.split_whitespace()
            .find_map(|t| t.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
    };
    Some(Summary {
        events: get("events")?,
        drops: get("drops")?,
        rescans: get("rescans")?,
        ops: get("ops")?,
        polls: get("polls")?,
        woken: get("woken")?,
    })
}

/// Instance directories currently under `/sys/fs/bpf/imezzo`.
pub fn pin_instances() -> BTreeSet<PathBuf> {
    match std::fs::read_dir(PIN_BASE) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The BPF program and map ids that process `pid` holds open (from /proc/PID/fdinfo).
pub fn bpf_ids_of(pid: i32) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut progs, mut maps) = (BTreeSet::new(), BTreeSet::new());
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for line in text.lines() {
                let mut kv = line.splitn(2, ':');
                let (k, v) = (kv.next().unwrap_or(""), kv.next().unwrap_or("").trim());
                match (k, v.parse::<u64>()) {
                    ("prog_id", Ok(id)) => {
                        progs.insert(id);
                    }
                    ("map_id", Ok(id)) => {
                        maps.insert(id);
                    }
                    _ => {}
                }
            }
        }
    }
    (progs, maps)
}

/// `bpftool -j <args>` parsed as JSON; panics if bpftool is missing or fails.
pub fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool (Debian package `bpftool`): {e}"));
    assert!(
        out.status.success(),
        "bpftool -j {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool -j {args:?} printed no JSON: {e}"))
}

/// The instance directories under [`PIN_BASE`] in which the BPF programs or
/// maps held open by process `pid` are pinned. Unlike a before/after diff of
/// the directory, this is not disturbed by other agents running meanwhile.
pub fn pin_dirs_of(pid: i32) -> BTreeSet<PathBuf> {
    let (progs, maps) = bpf_ids_of(pid);
    let mut dirs = BTreeSet::new();
    for (kind, ids) in [("prog", &progs), ("map", &maps)] {
        let list = bpftool_json(&["-f", kind, "show"]);
        for obj in list.as_array().into_iter().flatten() {
            if !obj["id"]
                .as_u64()
                .map(|id| ids.contains(&id))
                .unwrap_or(false)
            {
                continue;
            }
            for pin in obj["pinned"].as_array().into_iter().flatten() {
                let Some(rest) = pin
                    .as_str()
                    .and_then(|p| Path::new(p).strip_prefix(PIN_BASE).ok())
                else {
                    continue;
                };
                if let Some(first) = rest.components().next() {
                    dirs.insert(Path::new(PIN_BASE).join(first));
                }
            }
        }
    }
    dirs
}

/// Every entry (files and directories) below `dir`, recursively.
pub fn entries_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(entries_under(&p));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Raw syscalls
// ---------------------------------------------------------------------------

/// Thin wrappers around the raw syscalls, so each test exercises exactly the
/// syscall it names (glibc would turn `open` into `openat`, `chmod` into
/// `fchmodat`...). All return a [`SysErr`] with the call and errno on failure.
/// Syscall numbers are x86_64's.
pub mod sys {
    use super::cstr;
    use libc::{c_long, c_void};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::path::Path;

    pub const SYS_FCHMODAT2: c_long = 452;
    pub const SYS_SETXATTRAT: c_long = 463;
    pub const SYS_REMOVEXATTRAT: c_long = 466;
    pub const RWF_APPEND: i32 = 0x10;
    pub const AT_FDCWD: RawFd = libc::AT_FDCWD;
    /// `-1` as a uid/gid argument: leave unchanged.
    pub const KEEP: u32 = u32::MAX;

    #[derive(Debug)]
    pub struct SysErr {
        pub what: String,
        pub errno: i32,
        pub msg: String,
    }
    pub type SysResult<T> = Result<T, SysErr>;

    fn ret(r: c_long, what: impl FnOnce() -> String) -> SysResult<i64> {
        if r < 0 {
            let e = std::io::Error::last_os_error();
            Err(SysErr {
                what: what(),
                errno: e.raw_os_error().unwrap_or(0),
                msg: e.to_string(),
            })
        } else {
            Ok(r)
        }
    }

    fn fd(r: SysResult<i64>) -> SysResult<OwnedFd> {
        r.map(|n| unsafe { OwnedFd::from_raw_fd(n as RawFd) })
    }

    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }

    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    fn iovecs(bufs: &[&[u8]]) -> Vec<libc::iovec> {
        bufs.iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut c_void,
                iov_len: b.len(),
            })
            .collect()
    }

    fn opt_ptr(o: Option<&mut i64>) -> *mut i64 {
        match o {
            Some(r) => r as *mut i64,
            None => std::ptr::null_mut(),
        }
    }

    pub fn lstat(p: &Path) -> SysResult<libc::stat> {
        let c = cstr(p);
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        ret(
            unsafe { libc::lstat(c.as_ptr(), &mut st) } as c_long,
            || format!("lstat({p:?})"),
        )?;
        Ok(st)
    }

    /// An O_RDONLY|O_DIRECTORY fd on a directory, for the *at() calls.
    pub fn dir(p: &Path) -> SysResult<OwnedFd> {
        openat(AT_FDCWD, p, libc::O_RDONLY | libc::O_DIRECTORY, 0)
    }

    pub fn open(p: &Path, flags: i32, mode: u32) -> SysResult<OwnedFd> {
        let c = cstr(p);
        fd(ret(
            unsafe { libc::syscall(libc::SYS_open, c.as_ptr(), flags | libc::O_CLOEXEC, mode) },
            || format!("open({p:?}, {flags:#o}, {mode:#o})"),
        ))
    }

    pub fn openat(dirfd: RawFd, p: &Path, flags: i32, mode: u32) -> SysResult<OwnedFd> {
        let c = cstr(p);
        fd(ret(
            unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    dirfd,
                    c.as_ptr(),
                    flags | libc::O_CLOEXEC,
                    mode,
                )
            },
            || format!("openat({dirfd}, {p:?}, {flags:#o}, {mode:#o})"),
        ))
    }

    pub fn openat2(
        dirfd: RawFd,
        p: &Path,
        flags: i32,
        mode: u32,
        resolve: u64,
    ) -> SysResult<OwnedFd> {
        let c = cstr(p);
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: mode as u64,
            resolve,
        };
        fd(ret(
            unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dirfd,
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            },
            || format!("openat2({dirfd}, {p:?}, {flags:#o}, {mode:#o}, {resolve:#x})"),
        ))
    }

    pub fn creat(p: &Path, mode: u32) -> SysResult<OwnedFd> {
        let c = cstr(p);
        let f = fd(ret(
            unsafe { libc::syscall(libc::SYS_creat, c.as_ptr(), mode) },
            || format!("creat({p:?}, {mode:#o})"),
        ))?;
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(f)
    }

    pub fn mkdir(p: &Path, mode: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_mkdir, c.as_ptr(), mode) },
            || format!("mkdir({p:?}, {mode:#o})"),
        )
    }

    pub fn mkdirat(dirfd: RawFd, p: &Path, mode: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_mkdirat, dirfd, c.as_ptr(), mode) },
            || format!("mkdirat({dirfd}, {p:?}, {mode:#o})"),
        )
    }

    pub fn mknod(p: &Path, mode: u32, dev: u64) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_mknod, c.as_ptr(), mode, dev as u32) },
            || format!("mknod({p:?}, {mode:#o}, {dev:#x})"),
        )
    }

    pub fn mknodat(dirfd: RawFd, p: &Path, mode: u32, dev: u64) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_mknodat, dirfd, c.as_ptr(), mode, dev as u32) },
            || format!("mknodat({dirfd}, {p:?}, {mode:#o}, {dev:#x})"),
        )
    }

    pub fn unlink(p: &Path) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_unlink, c.as_ptr()) },
            || format!("unlink({p:?})"),
        )
    }

    pub fn unlinkat(dirfd: RawFd, p: &Path, flags: i32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_unlinkat, dirfd, c.as_ptr(), flags) },
            || format!("unlinkat({dirfd}, {p:?}, {flags:#x})"),
        )
    }

    pub fn rmdir(p: &Path) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_rmdir, c.as_ptr()) },
            || format!("rmdir({p:?})"),
        )
    }

    pub fn rename(old: &Path, new: &Path) -> SysResult<i64> {
        let (a, b) = (cstr(old), cstr(new));
        ret(
            unsafe { libc::syscall(libc::SYS_rename, a.as_ptr(), b.as_ptr()) },
            || format!("rename({old:?}, {new:?})"),
        )
    }

    pub fn renameat(olddir: RawFd, old: &Path, newdir: RawFd, new: &Path) -> SysResult<i64> {
        let (a, b) = (cstr(old), cstr(new));
        ret(
            unsafe { libc::syscall(libc::SYS_renameat, olddir, a.as_ptr(), newdir, b.as_ptr()) },
            || format!("renameat({olddir}, {old:?}, {newdir}, {new:?})"),
        )
    }

    pub fn renameat2(
        olddir: RawFd,
        old: &Path,
        newdir: RawFd,
        new: &Path,
        flags: u32,
    ) -> SysResult<i64> {
        let (a, b) = (cstr(old), cstr(new));
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    olddir,
                    a.as_ptr(),
                    newdir,
                    b.as_ptr(),
                    flags,
                )
            },
            || format!("renameat2({olddir}, {old:?}, {newdir}, {new:?}, {flags:#x})"),
        )
    }

    pub fn link(old: &Path, new: &Path) -> SysResult<i64> {
        let (a, b) = (cstr(old), cstr(new));
        ret(
            unsafe { libc::syscall(libc::SYS_link, a.as_ptr(), b.as_ptr()) },
            || format!("link({old:?}, {new:?})"),
        )
    }

    pub fn linkat(
        olddir: RawFd,
        old: &Path,
        newdir: RawFd,
        new: &Path,
        flags: i32,
    ) -> SysResult<i64> {
        let (a, b) = (cstr(old), cstr(new));
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_linkat,
                    olddir,
                    a.as_ptr(),
                    newdir,
                    b.as_ptr(),
                    flags,
                )
            },
            || format!("linkat({olddir}, {old:?}, {newdir}, {new:?}, {flags:#x})"),
        )
    }

    pub fn symlink(target: &str, linkpath: &Path) -> SysResult<i64> {
        let (a, b) = (cstr(target), cstr(linkpath));
        ret(
            unsafe { libc::syscall(libc::SYS_symlink, a.as_ptr(), b.as_ptr()) },
            || format!("symlink({target:?}, {linkpath:?})"),
        )
    }

    pub fn symlinkat(target: &str, dirfd: RawFd, linkpath: &Path) -> SysResult<i64> {
        let (a, b) = (cstr(target), cstr(linkpath));
        ret(
            unsafe { libc::syscall(libc::SYS_symlinkat, a.as_ptr(), dirfd, b.as_ptr()) },
            || format!("symlinkat({target:?}, {dirfd}, {linkpath:?})"),
        )
    }

    pub fn truncate(p: &Path, len: i64) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_truncate, c.as_ptr(), len) },
            || format!("truncate({p:?}, {len})"),
        )
    }

    pub fn ftruncate(f: &OwnedFd, len: i64) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_ftruncate, f.as_raw_fd(), len) },
            || format!("ftruncate({len})"),
        )
    }

    pub fn chmod(p: &Path, mode: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_chmod, c.as_ptr(), mode) },
            || format!("chmod({p:?}, {mode:#o})"),
        )
    }

    pub fn fchmod(f: &OwnedFd, mode: u32) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_fchmod, f.as_raw_fd(), mode) },
            || format!("fchmod({mode:#o})"),
        )
    }

    pub fn fchmodat(dirfd: RawFd, p: &Path, mode: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_fchmodat, dirfd, c.as_ptr(), mode) },
            || format!("fchmodat({dirfd}, {p:?}, {mode:#o})"),
        )
    }

    pub fn fchmodat2(dirfd: RawFd, p: &Path, mode: u32, flags: i32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(SYS_FCHMODAT2, dirfd, c.as_ptr(), mode, flags) },
            || format!("fchmodat2({dirfd}, {p:?}, {mode:#o}, {flags:#x})"),
        )
    }

    pub fn chown(p: &Path, uid: u32, gid: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_chown, c.as_ptr(), uid, gid) },
            || format!("chown({p:?}, {uid}, {gid})"),
        )
    }

    pub fn fchown(f: &OwnedFd, uid: u32, gid: u32) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_fchown, f.as_raw_fd(), uid, gid) },
            || format!("fchown({uid}, {gid})"),
        )
    }

    pub fn lchown(p: &Path, uid: u32, gid: u32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_lchown, c.as_ptr(), uid, gid) },
            || format!("lchown({p:?}, {uid}, {gid})"),
        )
    }

    pub fn fchownat(dirfd: RawFd, p: &Path, uid: u32, gid: u32, flags: i32) -> SysResult<i64> {
        let c = cstr(p);
        ret(
            unsafe { libc::syscall(libc::SYS_fchownat, dirfd, c.as_ptr(), uid, gid, flags) },
            || format!("fchownat({dirfd}, {p:?}, {uid}, {gid}, {flags:#x})"),
        )
    }

    pub fn timespec(sec: i64, nsec: i64) -> libc::timespec {
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        }
    }

    /// utimensat(dirfd, path or NULL, times or NULL, flags).
    pub fn utimensat(
        dirfd: RawFd,
        p: Option<&Path>,
        times: Option<[libc::timespec; 2]>,
        flags: i32,
    ) -> SysResult<i64> {
        let c = p.map(cstr);
        let pp = c.as_ref().map(|c| c.as_ptr()).unwrap_or(std::ptr::null());
        let tp = times
            .as_ref()
            .map(|t| t.as_ptr())
            .unwrap_or(std::ptr::null());
        ret(
            unsafe { libc::syscall(libc::SYS_utimensat, dirfd, pp, tp, flags) },
            || {
                format!(
                    "utimensat({dirfd}, {p:?}, {:?}, {flags:#x})",
                    times.map(|t| [(t[0].tv_sec, t[0].tv_nsec), (t[1].tv_sec, t[1].tv_nsec)])
                )
            },
        )
    }

    /// futimens(fd, times) is utimensat(fd, NULL, times, 0) in the kernel.
    pub fn futimens(f: &OwnedFd, times: Option<[libc::timespec; 2]>) -> SysResult<i64> {
        utimensat(f.as_raw_fd(), None, times, 0)
    }

    pub fn utimes(p: &Path, times: Option<[libc::timeval; 2]>) -> SysResult<i64> {
        let c = cstr(p);
        let tp = times
            .as_ref()
            .map(|t| t.as_ptr())
            .unwrap_or(std::ptr::null());
        ret(
            unsafe { libc::syscall(libc::SYS_utimes, c.as_ptr(), tp) },
            || format!("utimes({p:?})"),
        )
    }

    pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_setxattr,
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr(),
                    value.len(),
                    flags,
                )
            },
            || format!("setxattr({p:?}, {name:?}, {flags:#x})"),
        )
    }

    pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_lsetxattr,
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr(),
                    value.len(),
                    flags,
                )
            },
            || format!("lsetxattr({p:?}, {name:?}, {flags:#x})"),
        )
    }

    pub fn fsetxattr(f: &OwnedFd, name: &str, value: &[u8], flags: i32) -> SysResult<i64> {
        let n = cstr(name);
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_fsetxattr,
                    f.as_raw_fd(),
                    n.as_ptr(),
                    value.as_ptr(),
                    value.len(),
                    flags,
                )
            },
            || format!("fsetxattr({name:?}, {flags:#x})"),
        )
    }

    pub fn removexattr(p: &Path, name: &str) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        ret(
            unsafe { libc::syscall(libc::SYS_removexattr, c.as_ptr(), n.as_ptr()) },
            || format!("removexattr({p:?}, {name:?})"),
        )
    }

    pub fn lremovexattr(p: &Path, name: &str) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        ret(
            unsafe { libc::syscall(libc::SYS_lremovexattr, c.as_ptr(), n.as_ptr()) },
            || format!("lremovexattr({p:?}, {name:?})"),
        )
    }

    pub fn fremovexattr(f: &OwnedFd, name: &str) -> SysResult<i64> {
        let n = cstr(name);
        ret(
            unsafe { libc::syscall(libc::SYS_fremovexattr, f.as_raw_fd(), n.as_ptr()) },
            || format!("fremovexattr({name:?})"),
        )
    }

    pub fn setxattrat(
        dirfd: RawFd,
        p: &Path,
        at_flags: i32,
        name: &str,
        value: &[u8],
        flags: u32,
    ) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        let args = XattrArgs {
            value: value.as_ptr() as u64,
            size: value.len() as u32,
            flags,
        };
        ret(
            unsafe {
                libc::syscall(
                    SYS_SETXATTRAT,
                    dirfd,
                    c.as_ptr(),
                    at_flags,
                    n.as_ptr(),
                    &args as *const XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            },
            || format!("setxattrat({dirfd}, {p:?}, {at_flags:#x}, {name:?}, {flags:#x})"),
        )
    }

    pub fn removexattrat(dirfd: RawFd, p: &Path, at_flags: i32, name: &str) -> SysResult<i64> {
        let (c, n) = (cstr(p), cstr(name));
        ret(
            unsafe { libc::syscall(SYS_REMOVEXATTRAT, dirfd, c.as_ptr(), at_flags, n.as_ptr()) },
            || format!("removexattrat({dirfd}, {p:?}, {at_flags:#x}, {name:?})"),
        )
    }

    pub fn write(f: &OwnedFd, buf: &[u8]) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_write, f.as_raw_fd(), buf.as_ptr(), buf.len()) },
            || format!("write({} bytes)", buf.len()),
        )
    }

    pub fn pwrite64(f: &OwnedFd, buf: &[u8], off: i64) -> SysResult<i64> {
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_pwrite64,
                    f.as_raw_fd(),
                    buf.as_ptr(),
                    buf.len(),
                    off,
                )
            },
            || format!("pwrite64({} bytes at {off})", buf.len()),
        )
    }

    pub fn writev(f: &OwnedFd, bufs: &[&[u8]]) -> SysResult<i64> {
        let iov = iovecs(bufs);
        ret(
            unsafe { libc::syscall(libc::SYS_writev, f.as_raw_fd(), iov.as_ptr(), iov.len()) },
            || format!("writev({} iovecs)", iov.len()),
        )
    }

    /// pwritev(fd, iov, cnt, pos_l, pos_h): on 64-bit the whole offset goes in pos_l.
    pub fn pwritev(f: &OwnedFd, bufs: &[&[u8]], off: i64) -> SysResult<i64> {
        let iov = iovecs(bufs);
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_pwritev,
                    f.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    off,
                    0,
                )
            },
            || format!("pwritev({} iovecs at {off})", iov.len()),
        )
    }

    pub fn pwritev2(f: &OwnedFd, bufs: &[&[u8]], off: i64, flags: i32) -> SysResult<i64> {
        let iov = iovecs(bufs);
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_pwritev2,
                    f.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    off,
                    0,
                    flags,
                )
            },
            || format!("pwritev2({} iovecs at {off}, flags {flags:#x})", iov.len()),
        )
    }

    pub fn copy_file_range(
        fin: &OwnedFd,
        off_in: Option<&mut i64>,
        fout: &OwnedFd,
        off_out: Option<&mut i64>,
        len: usize,
    ) -> SysResult<i64> {
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_copy_file_range,
                    fin.as_raw_fd(),
                    opt_ptr(off_in),
                    fout.as_raw_fd(),
                    opt_ptr(off_out),
                    len,
                    0u32,
                )
            },
            || format!("copy_file_range({len})"),
        )
    }

    pub fn sendfile(
        out: &OwnedFd,
        fin: &OwnedFd,
        off: Option<&mut i64>,
        count: usize,
    ) -> SysResult<i64> {
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_sendfile,
                    out.as_raw_fd(),
                    fin.as_raw_fd(),
                    opt_ptr(off),
                    count,
                )
            },
            || format!("sendfile({count})"),
        )
    }

    pub fn splice(
        fin: &OwnedFd,
        off_in: Option<&mut i64>,
        out: &OwnedFd,
        off_out: Option<&mut i64>,
        len: usize,
    ) -> SysResult<i64> {
        ret(
            unsafe {
                libc::syscall(
                    libc::SYS_splice,
                    fin.as_raw_fd(),
                    opt_ptr(off_in),
                    out.as_raw_fd(),
                    opt_ptr(off_out),
                    len,
                    0u32,
                )
            },
            || format!("splice({len})"),
        )
    }

    pub fn fallocate(f: &OwnedFd, mode: i32, off: i64, len: i64) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_fallocate, f.as_raw_fd(), mode, off, len) },
            || format!("fallocate(mode {mode:#x}, {off}, {len})"),
        )
    }

    pub fn lseek(f: &OwnedFd, off: i64, whence: i32) -> SysResult<i64> {
        ret(
            unsafe { libc::syscall(libc::SYS_lseek, f.as_raw_fd(), off, whence) },
            || format!("lseek({off}, {whence})"),
        )
    }

    #[repr(C)]
    #[derive(Default)]
    struct SqRingOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        flags: u32,
        dropped: u32,
        array: u32,
        resv1: u32,
        user_addr: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct CqRingOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        overflow: u32,
        cqes: u32,
        flags: u32,
        resv1: u32,
        user_addr: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct IoUringParams {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        sq_off: SqRingOffsets,
        cq_off: CqRingOffsets,
    }

    #[repr(C)]
    struct IoUringSqe {
        opcode: u8,
        flags: u8,
        ioprio: u16,
        fd: i32,
        off: u64,
        addr: u64,
        len: u32,
        rw_flags: u32,
        user_data: u64,
        buf_index: u16,
        personality: u16,
        splice_fd_in: i32,
        addr3: u64,
        pad2: u64,
    }

    #[repr(C)]
    struct IoUringCqe {
        user_data: u64,
        res: i32,
        flags: u32,
    }

    /// One IORING_OP_WRITE of `buf` at `off` through a fresh io_uring, waited
    /// for. With `in_worker` the request is forced to an io-wq worker thread
    /// (IOSQE_ASYNC), i.e. the write happens in a kernel thread with no write
    /// syscall at all. Returns the completion's result (bytes written).
    pub fn io_uring_write(f: &OwnedFd, buf: &[u8], off: u64, in_worker: bool) -> SysResult<i64> {
        use std::sync::atomic::{AtomicU32, Ordering};
        const IORING_OFF_CQ_RING: i64 = 0x8000000;
        const IORING_OFF_SQES: i64 = 0x10000000;
        const IORING_OP_WRITE: u8 = 23;
        const IOSQE_ASYNC: u8 = 1 << 4;
        const IORING_ENTER_GETEVENTS: u32 = 1;
        let mut p = IoUringParams::default();
        let ring = fd(ret(
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut p as *mut IoUringParams) },
            || "io_uring_setup(4)".to_string(),
        ))?;
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len =
            p.cq_off.cqes as usize + p.cq_entries as usize * std::mem::size_of::<IoUringCqe>();
        let sqes_len = p.sq_entries as usize * std::mem::size_of::<IoUringSqe>();
        let map = |len: usize, off: i64| -> SysResult<*mut u8> {
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    ring.as_raw_fd(),
                    off,
                )
            };
            if m == libc::MAP_FAILED {
                ret(-1, || format!("mmap io_uring region {off:#x}"))?;
            }
            Ok(m as *mut u8)
        };
        let sq = map(sq_len, 0)?;
        let cq = map(cq_len, IORING_OFF_CQ_RING)?;
        let sqes = map(sqes_len, IORING_OFF_SQES)?;
        let res = unsafe {
            let tail = &*(sq.add(p.sq_off.tail as usize) as *const AtomicU32);
            let mask = *(sq.add(p.sq_off.ring_mask as usize) as *const u32);
            let t = tail.load(Ordering::Acquire);
            let idx = t & mask;
            std::ptr::write(
                (sqes as *mut IoUringSqe).add(idx as usize),
                IoUringSqe {
                    opcode: IORING_OP_WRITE,
                    flags: if in_worker { IOSQE_ASYNC } else { 0 },
                    ioprio: 0,
                    fd: f.as_raw_fd(),
                    off,
                    addr: buf.as_ptr() as u64,
                    len: buf.len() as u32,
                    rw_flags: 0,
                    user_data: 42,
                    buf_index: 0,
                    personality: 0,
                    splice_fd_in: 0,
                    addr3: 0,
                    pad2: 0,
                },
            );
            *(sq.add(p.sq_off.array as usize) as *mut u32).add(idx as usize) = idx;
            tail.store(t.wrapping_add(1), Ordering::Release);
            let entered = ret(
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    ring.as_raw_fd(),
                    1u32,
                    1u32,
                    IORING_ENTER_GETEVENTS,
                    std::ptr::null::<c_void>(),
                    0usize,
                ),
                || "io_uring_enter".to_string(),
            );
            let res = entered.map(|_| {
                let head = &*(cq.add(p.cq_off.head as usize) as *const AtomicU32);
                let ctail = &*(cq.add(p.cq_off.tail as usize) as *const AtomicU32);
                let cmask = *(cq.add(p.cq_off.ring_mask as usize) as *const u32);
                let h = head.load(Ordering::Acquire);
                assert_ne!(
                    h,
                    ctail.load(Ordering::Acquire),
                    "io_uring_enter returned without a completion"
                );
                let cqe = &*((cq.add(p.cq_off.cqes as usize) as *const IoUringCqe)
                    .add((h & cmask) as usize));
                assert_eq!(cqe.user_data, 42);
                let r = cqe.res;
                head.store(h.wrapping_add(1), Ordering::Release);
                r
            });
            libc::munmap(sq as *mut c_void, sq_len);
            libc::munmap(cq as *mut c_void, cq_len);
            libc::munmap(sqes as *mut c_void, sqes_len);
            res?
        };
        if res < 0 {
            return Err(SysErr {
                what: "io_uring write".into(),
                errno: -res,
                msg: std::io::Error::from_raw_os_error(-res).to_string(),
            });
        }
        Ok(res as i64)
    }

    /// (read end, write end), both O_CLOEXEC.
    pub fn pipe() -> SysResult<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as libc::c_int; 2];
        ret(
            unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), libc::O_CLOEXEC) },
            || "pipe2".to_string(),
        )?;
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }
}
