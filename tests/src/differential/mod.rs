//! The random differential tester (issue 9): a seeded concurrent workload on the server's
//! export, faults injected at seeded points, and one oracle, `imezzo verify export replica`.
//!
//! * Generator ([`ops`]): from a u64 seed, `workers` separate processes (the
//!   `imezzo-differential worker` helper binary of this crate) each run their own seeded
//!   sequence of operations on a small shared namespace, concurrently. Each logs every
//!   operation, one replayable line, to `<log dir>/w<N>.log` before the next starts.
//! * Faults ([`Fault`]): kill -9 of the server, of the client, of both (each restarted), the
//!   link cut (the server or the client stopped with SIGSTOP for seconds), and the replica's
//!   file system full (a size-limited tmpfs, the master grown past it, then enlarged with
//!   `mount -o remount,size=`). The schedule is a function of the seed; the moments it hits
//!   the workload are not (they depend on timing), which is why it is printed.
//! * Check: once the workers are done and both agents run, `imezzo verify` is polled until
//!   it exits 0; on timeout the run fails with the seed, the fault schedule, the differences,
//!   the agents' last stderr lines and the last operations. Then the agents' stderr is
//!   counted against [`MAX_AGENT_LOG_LINES_PER_MINUTE`].
//! * Shrinking ([`shrink`]): the operations of a failing run, replayed by one worker without
//!   faults, cut down while the replica still diverges.
//!
//! Reproducing one seed: `IMEZZO_SEED=N [IMEZZO_FS=ext4] [IMEZZO_FAULTS=kill-server,cut]
//! [IMEZZO_OPS=300] [IMEZZO_WORKERS=3] [IMEZZO_SHRINK=1] cargo xtask test -- differential::seed_from_env`
//! (or `target/release/imezzo-differential run --seed N ...`).

pub mod ops;

use crate::replica::{
    head, wait_identical_while, Client, Node, Replication, Rng, INITIAL_SYNC_DONE,
    INITIAL_SYNC_TIMEOUT,
};
use crate::{Fs, FsKind};
use ops::{Env, Op};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the replica may take to become identical once the workload and the faults are over.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The same while shrinking: each candidate that still diverges costs this much.
pub const SHRINK_CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shrinking may go on.
pub const SHRINK_BUDGET: Duration = Duration::from_secs(15 * 60);
/// Most lines both agents together may print on stderr per started minute of a run. The
/// project requires one line per kind of problem per interval, so a run of a few seconds,
/// faults included, has no business printing more.
pub const MAX_AGENT_LOG_LINES_PER_MINUTE: usize = 200;
/// How long the workers may take (a stuck worker fails the run).
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(300);
/// Operations per worker unless IMEZZO_OPS says otherwise.
pub const DEFAULT_OPS: usize = 300;
/// Worker processes unless IMEZZO_WORKERS says otherwise.
pub const DEFAULT_WORKERS: usize = 3;
/// With faults, the workload is spread over about this long, so that the faults hit it.
pub const FAULT_WORKLOAD: Duration = Duration::from_secs(10);
/// The replica's tmpfs for the fs-full fault, and what the master grows by.
pub const FULL_REPLICA_BYTES: u64 = 24 << 20;
pub const FULL_FILL_MIB: u64 = 32;
/// The size the replica is remounted with at the end of the fs-full fault.
pub const FULL_ENLARGED: &str = "size=1g";
/// Loop images of the export and the replica (sparse; large enough for the fill).
pub const LOOP_IMAGE_BYTES: u64 = 512 << 20;
/// Operation lines printed in a failure message.
pub const OPS_IN_REPORT: usize = 50;
/// Difference lines printed in a failure message.
pub const VERIFY_LINES_IN_REPORT: usize = 40;
/// Agent stderr lines printed per agent in a failure message.
pub const STDERR_LINES_IN_REPORT: usize = 30;

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the server, restarted after the hold.
    KillServer,
    /// kill -9 of the client, restarted after the hold.
    KillClient,
    /// kill -9 of both, restarted (server first) after the hold.
    KillBoth,
    /// The link cut: the client (even schedule slots) or the server stopped for the hold.
    Cut,
    /// The replica's file system full: the master grows past it, enlarged after the hold.
    Full,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::KillServer,
        Fault::KillClient,
        Fault::KillBoth,
        Fault::Cut,
        Fault::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillServer => "kill-server",
            Fault::KillClient => "kill-client",
            Fault::KillBoth => "kill-both",
            Fault::Cut => "cut",
            Fault::Full => "full",
        }
    }

    /// `none` (or empty), `all`, or a comma-separated list of names.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(Vec::new());
        }
        if s == "all" {
            return Ok(Fault::ALL.to_vec());
        }
        s.split(',')
            .map(|w| {
                Fault::ALL
                    .into_iter()
                    .find(|f| f.name() == w.trim())
                    .ok_or_else(|| {
                        format!(
                            "unknown fault {w:?} (none, all, or a list of: {})",
                            Fault::ALL.map(|f| f.name()).join(", ")
                        )
                    })
            })
            .collect()
    }

    pub fn list_name(faults: &[Fault]) -> String {
        if faults.is_empty() {
            "none".into()
        } else {
            faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// One fault of a schedule.
#[derive(Clone, Debug)]
pub struct Planned {
    /// When, from the workers' start.
    pub at: Duration,
    pub fault: Fault,
    /// How long the agent stays down or stopped, or the replica full.
    pub hold: Duration,
    /// For [`Fault::Cut`]: the server is stopped rather than the client.
    pub server_side: bool,
}

impl std::fmt::Display for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.fault, self.server_side) {
            (Fault::Cut, true) => "cut(server stopped)".to_string(),
            (Fault::Cut, false) => "cut(client stopped)".to_string(),
            (k, _) => k.name().to_string(),
        };
        write!(
            f,
            "{what} at {:.2}s for {:.2}s",
            self.at.as_secs_f64(),
            self.hold.as_secs_f64()
        )
    }
}

/// The fault schedule of a seed: 2 or 3 faults among `kinds` (the fill at most once),
/// spread over the first 80 % of the workload.
pub fn schedule(seed: u64, kinds: &[Fault], workload: Duration) -> Vec<Planned> {
    if kinds.is_empty() {
        return Vec::new();
    }
    let mut r = Rng(seed ^ 0xfa17_5eed_0000_0000);
    let n = 2 + r.below(2) as usize;
    let span = (workload.as_millis() as u64 * 8 / 10).max(500);
    let mut times: Vec<u64> = (0..n).map(|_| 300 + r.below(span)).collect();
    times.sort();
    let mut used_full = false;
    let mut out = Vec::new();
    for at in times {
        let fault = kinds[r.below(kinds.len() as u64) as usize];
        if fault == Fault::Full {
            if used_full {
                continue;
            }
            used_full = true;
        }
        let hold = match fault {
            Fault::KillServer | Fault::KillClient | Fault::KillBoth => 100 + r.below(1400),
            Fault::Cut => 1000 + r.below(3000),
            Fault::Full => 1000 + r.below(2000),
        };
        out.push(Planned {
            at: Duration::from_millis(at),
            fault,
            hold: Duration::from_millis(hold),
            server_side: r.below(2) == 0,
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// One run of the tester.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub workers: usize,
    /// Operations per worker.
    pub ops: usize,
    /// The fault kinds the schedule draws from (empty: no faults).
    pub faults: Vec<Fault>,
    /// The export's file system (the replica's too, except for the fs-full fault: tmpfs).
    pub fs: FsKind,
    /// The `imezzo-differential` binary (its `worker` subcommand).
    pub worker_bin: PathBuf,
    pub converge: Duration,
    /// Replay these operations with one worker instead of generating (shrinking).
    pub replay: Option<Vec<Op>>,
    /// On a divergence, shrink the operations (IMEZZO_SHRINK=1).
    pub shrink: bool,
}

impl Config {
    pub fn new(seed: u64, fs: FsKind, faults: &[Fault], worker_bin: &Path) -> Config {
        Config {
            seed,
            workers: DEFAULT_WORKERS,
            ops: DEFAULT_OPS,
            faults: faults.to_vec(),
            fs,
            worker_bin: worker_bin.to_path_buf(),
            converge: CONVERGE_TIMEOUT,
            replay: None,
            shrink: false,
        }
    }

    /// IMEZZO_OPS, IMEZZO_WORKERS and IMEZZO_SHRINK applied to `self`; IMEZZO_SEED,
    /// IMEZZO_FS and IMEZZO_FAULTS too when `all` (the seed-from-env test and the soak).
    pub fn with_env(mut self, all: bool) -> Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var("IMEZZO_OPS") {
            self.ops = v
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("IMEZZO_OPS={v:?}: {e}"));
        }
        if let Some(v) = var("IMEZZO_WORKERS") {
            self.workers = v
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("IMEZZO_WORKERS={v:?}: {e}"));
        }
        if let Some(v) = var("IMEZZO_CONVERGE_SECS") {
            let secs: u64 = v
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("IMEZZO_CONVERGE_SECS={v:?}: {e}"));
            self.converge = Duration::from_secs(secs);
        }
        if let Some(v) = var("IMEZZO_SHRINK") {
            self.shrink = v.trim() != "0";
        }
        if all {
            if let Some(v) = var("IMEZZO_SEED") {
                self.seed = v
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("IMEZZO_SEED={v:?}: {e}"));
            }
            if let Some(v) = var("IMEZZO_FS") {
                self.fs = FsKind::parse(v.trim())
                    .unwrap_or_else(|| panic!("IMEZZO_FS={v:?}: tmpfs, ext4, xfs or btrfs"));
            }
            if let Some(v) = var("IMEZZO_FAULTS") {
                self.faults =
                    Fault::parse_list(&v).unwrap_or_else(|e| panic!("IMEZZO_FAULTS: {e}"));
            }
            if let Some(v) = var("IMEZZO_REPLAY") {
                let list = read_ops(Path::new(v.trim()))
                    .unwrap_or_else(|e| panic!("IMEZZO_REPLAY={v:?}: {e}"));
                self.replay = Some(list);
            }
        }
        self
    }

    /// The environment that reruns exactly this configuration.
    pub fn reproduce(&self) -> String {
        format!(
            "IMEZZO_SEED={} IMEZZO_FS={} IMEZZO_FAULTS={} IMEZZO_OPS={} IMEZZO_WORKERS={} \
             cargo xtask test -- differential::seed_from_env",
            self.seed,
            self.fs.name(),
            Fault::list_name(&self.faults),
            self.ops,
            self.workers
        )
    }

    fn workload(&self) -> Duration {
        if self.faults.is_empty() {
            Duration::ZERO
        } else {
            FAULT_WORKLOAD
        }
    }
}

// ---------------------------------------------------------------------------
// The worker process
// ---------------------------------------------------------------------------

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `imezzo-differential worker --root R --sibling S --id N --log FILE
/// (--seed N --ops N | --replay FILE) [--pace-us N]`: runs the operations and logs each one,
/// `<op>\t# w<id> #<index> t=<CLOCK_MONOTONIC ns> = ok|ERRNO`. Exit 0 once all ran.
/// A store through a shared mapping of a file another worker truncated meanwhile faults
/// with SIGBUS. The worker survives it: the handler maps an anonymous page over the faulting
/// one, the store lands there and is lost, as the truncate meant.
extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGBUS; mmap is async-signal-safe.
    unsafe {
        let addr = (*info).si_addr() as usize & !4095;
        let m = libc::mmap(
            addr as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        if m == libc::MAP_FAILED {
            libc::_exit(70);
        }
    }
}

fn survive_sigbus() {
    // SAFETY: a plain sigaction with a handler of the SA_SIGINFO shape.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

pub fn worker_main(args: &[String]) -> i32 {
    survive_sigbus();
    let get = |k: &str| -> Option<String> {
        let i = args.iter().position(|a| a == k)?;
        args.get(i + 1).cloned()
    };
    let need = |v: Option<String>, k: &str| v.unwrap_or_else(|| panic!("worker: {k} is required"));
    let root = PathBuf::from(need(get("--root"), "--root"));
    let sibling = PathBuf::from(need(get("--sibling"), "--sibling"));
    let id: u32 = need(get("--id"), "--id").parse().expect("--id");
    let log = PathBuf::from(need(get("--log"), "--log"));
    let pace = Duration::from_micros(
        get("--pace-us")
            .map(|v| v.parse().expect("--pace-us"))
            .unwrap_or(0),
    );
    let list = match get("--replay") {
        Some(f) => read_ops(Path::new(&f)).unwrap_or_else(|e| panic!("worker: {f}: {e}")),
        None => {
            let seed: u64 = need(get("--seed"), "--seed").parse().expect("--seed");
            let n: usize = need(get("--ops"), "--ops").parse().expect("--ops");
            ops::generate(seed, id, n)
        }
    };
    unsafe { libc::umask(0o022) };
    // Paths are given relative to the export root, as most programs do: the probes copy at
    // most 256 bytes of a path argument, so absolute paths under a long mount point would
    // turn every 255-byte name into a rescan.
    // The sibling directory stays absolute: a relative `../sibling` path makes the server
    // ask /proc about the worker, which fails (and rescans) once the worker has exited.
    std::env::set_current_dir(&root).unwrap_or_else(|e| panic!("worker: chdir {root:?}: {e}"));
    let env = Env {
        root: PathBuf::from("."),
        sibling,
        worker: id,
    };
    let logc = crate::cstr(&log);
    let fd = unsafe {
        libc::open(
            logc.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(
        fd >= 0,
        "worker: cannot open {log:?}: {}",
        std::io::Error::last_os_error()
    );
    for (i, op) in list.iter().enumerate() {
        let t = monotonic_ns();
        let r = op.run(&env);
        let line = format!(
            "{op}\t# w{id} #{i} t={t} = {}\n",
            match r {
                Ok(()) => "ok".to_string(),
                Err(e) => ops::errno_name(e),
            }
        );
        unsafe { libc::write(fd, line.as_ptr() as *const libc::c_void, line.len()) };
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    unsafe { libc::close(fd) };
    0
}

/// Operations from a file of op lines (log lines too: what follows a tab is ignored; blank
/// lines and lines starting with `#` are skipped).
pub fn read_ops(path: &Path) -> Result<Vec<Op>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(Op::parse)
        .collect()
}

/// One logged operation.
#[derive(Clone, Debug)]
pub struct Logged {
    pub t: u64,
    pub worker: u32,
    pub op: Op,
    pub ok: bool,
    pub line: String,
}

/// Every worker's log in `dir`, merged in the order the operations started.
pub fn merged_log(dir: &Path) -> Vec<Logged> {
    let mut all = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return all;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('w') && name.ends_with(".log")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            let Ok(op) = Op::parse(line) else {
                continue;
            };
            let comment = line.split_once('\t').map(|x| x.1).unwrap_or("");
            let t = comment
                .split_whitespace()
                .find_map(|w| w.strip_prefix("t="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let worker = comment
                .split_whitespace()
                .find_map(|w| w.strip_prefix('w'))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            all.push(Logged {
                t,
                worker,
                op,
                ok: line.ends_with("= ok"),
                line: line.to_string(),
            });
        }
    }
    all.sort_by_key(|l| (l.t, l.worker));
    all
}

// ---------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------

/// What a run found.
#[derive(Debug)]
pub struct Failure {
    /// The replica did not converge (as opposed to: too many log lines, an agent died...).
    pub diverged: bool,
    pub report: String,
    pub log_dir: PathBuf,
}

/// A passing run.
#[derive(Debug)]
pub struct Passed {
    pub converged_after: Duration,
    pub wall: Duration,
    pub agent_log_lines: usize,
    pub ops_ok: usize,
    pub ops_total: usize,
}

static RUNS: AtomicU32 = AtomicU32::new(0);

fn log_dir(seed: u64) -> PathBuf {
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let d = PathBuf::from(format!(
        "/tmp/imezzo-differential-{seed}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {d:?}: {e}"));
    d
}

fn tail(lines: &[String], n: usize) -> String {
    let skip = lines.len().saturating_sub(n);
    let mut s = String::new();
    if skip > 0 {
        let _ = writeln!(s, "    ... {skip} earlier lines ...");
    }
    for l in &lines[skip..] {
        let _ = writeln!(s, "    {l}");
    }
    s
}

/// The running set-up of one run: replication, workers, counters.
struct Run<'a> {
    cfg: &'a Config,
    rep: Replication,
    logs: PathBuf,
    /// Stderr lines of agent runs that ended (restarts), per side.
    earlier_server_lines: usize,
    earlier_client_lines: usize,
    /// Events worth printing: faults applied, restarts.
    events: Vec<String>,
    start: Instant,
}

impl Run<'_> {
    fn note(&mut self, what: String) {
        self.events.push(format!(
            "{:7.2}s {what}",
            self.start.elapsed().as_secs_f64()
        ));
    }

    fn agent_lines(&self) -> usize {
        self.earlier_server_lines
            + self.earlier_client_lines
            + self
                .rep
                .server
                .as_ref()
                .map_or(0, |s| s.agent.stderr().len())
            + self
                .rep
                .client
                .as_ref()
                .map_or(0, |c| c.agent.stderr().len())
    }

    fn kill_server(&mut self) {
        let s = self.rep.server.as_mut().unwrap();
        s.kill9();
        self.earlier_server_lines += s.agent.stderr().len();
    }

    fn kill_client(&mut self) {
        let c = self.rep.client.as_mut().unwrap();
        c.kill9();
        self.earlier_client_lines += c.agent.stderr().len();
    }

    fn restart_server(&mut self) {
        self.rep.server.as_mut().unwrap().restart();
    }

    fn restart_client(&mut self) {
        self.rep.client.as_mut().unwrap().restart();
    }

    fn apply(&mut self, p: &Planned, fills: &mut u32) {
        self.note(format!("fault: {p}"));
        match p.fault {
            Fault::KillServer => {
                self.kill_server();
                std::thread::sleep(p.hold);
                self.restart_server();
            }
            Fault::KillClient => {
                self.kill_client();
                std::thread::sleep(p.hold);
                self.restart_client();
            }
            Fault::KillBoth => {
                self.kill_server();
                self.kill_client();
                std::thread::sleep(p.hold);
                self.restart_server();
                self.restart_client();
            }
            Fault::Cut => {
                let pid = if p.server_side {
                    self.rep.server.as_ref().unwrap().agent.pid
                } else {
                    self.rep.client.as_ref().unwrap().agent.pid
                };
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(p.hold);
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            Fault::Full => {
                let name = format!("{}{fills}", ops::FILL_PREFIX);
                *fills += 1;
                let env = Env {
                    root: self.rep.export.root.clone(),
                    sibling: self.rep.export.sibling.clone(),
                    worker: 99,
                };
                let fill = Op::Fill {
                    p: name,
                    mb: FULL_FILL_MIB,
                };
                if let Err(e) = fill.run(&env) {
                    self.note(format!("{fill}: {}", ops::errno_name(e)));
                }
                std::thread::sleep(p.hold);
                let out = Command::new("mount")
                    .args(["-o", &format!("remount,{FULL_ENLARGED}")])
                    .arg(&self.rep.replica.mnt)
                    .output()
                    .expect("run mount");
                assert!(
                    out.status.success(),
                    "remount of the replica with {FULL_ENLARGED} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        self.note(format!("fault over: {}", p.fault.name()));
    }

    fn spawn_workers(&self) -> Vec<Child> {
        let pace_us = if self.cfg.workload().is_zero() {
            0
        } else {
            self.cfg.workload().as_micros() as u64 / self.cfg.ops.max(1) as u64
        };
        let n = if self.cfg.replay.is_some() {
            1
        } else {
            self.cfg.workers
        };
        (0..n)
            .map(|w| {
                let mut cmd = Command::new(&self.cfg.worker_bin);
                cmd.arg("worker")
                    .arg("--root")
                    .arg(&self.rep.export.root)
                    .arg("--sibling")
                    .arg(&self.rep.export.sibling)
                    .arg("--id")
                    .arg(w.to_string())
                    .arg("--log")
                    .arg(self.logs.join(format!("w{w}.log")))
                    .arg("--pace-us")
                    .arg(pace_us.to_string());
                match &self.cfg.replay {
                    Some(list) => {
                        let f = self.logs.join("replay.ops");
                        let text: String = list.iter().map(|o| format!("{o}\n")).collect();
                        std::fs::write(&f, text).expect("write replay.ops");
                        cmd.arg("--replay").arg(f);
                    }
                    None => {
                        cmd.arg("--seed")
                            .arg(self.cfg.seed.to_string())
                            .arg("--ops")
                            .arg(self.cfg.ops.to_string());
                    }
                }
                let err = std::fs::File::create(self.logs.join(format!("w{w}.stderr"))).unwrap();
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
                cmd.spawn().unwrap_or_else(|e| {
                    panic!("cannot start the worker {:?}: {e}", self.cfg.worker_bin)
                })
            })
            .collect()
    }

    fn report(&self, headline: &str, schedule: &[Planned], verify_out: &str) -> String {
        if let Some(sv) = &self.rep.server {
            let _ = std::fs::write(self.logs.join("server.log"), sv.context());
        }
        if let Some(c) = &self.rep.client {
            let _ = std::fs::write(self.logs.join("client.log"), c.context());
        }
        let _ = std::fs::write(self.logs.join("verify.txt"), verify_out);
        let mut s = String::new();
        let cfg = self.cfg;
        let _ =
            writeln!(
            s,
            "DIFFERENTIAL FAILURE: {headline}\n  seed {} on {} ({} workers x {} ops{}), faults {}",
            cfg.seed,
            cfg.fs.name(),
            if cfg.replay.is_some() { 1 } else { cfg.workers },
            cfg.replay.as_ref().map_or(cfg.ops, |r| r.len()),
            if cfg.replay.is_some() { ", replayed list" } else { "" },
            Fault::list_name(&cfg.faults)
        );
        let _ = writeln!(s, "  reproduce: {}", cfg.reproduce());
        let _ = writeln!(
            s,
            "  fault schedule: {}",
            if schedule.is_empty() {
                "none".to_string()
            } else {
                schedule
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        );
        let _ = writeln!(s, "  events:");
        for e in &self.events {
            let _ = writeln!(s, "    {e}");
        }
        if !verify_out.is_empty() {
            let _ = writeln!(
                s,
                "  imezzo verify export replica (first {VERIFY_LINES_IN_REPORT} lines):"
            );
            s += &head(verify_out, VERIFY_LINES_IN_REPORT);
        }
        if let Some(sv) = &self.rep.server {
            let _ = writeln!(
                s,
                "  server stderr ({} lines in earlier runs, last {STDERR_LINES_IN_REPORT} of this run):",
                self.earlier_server_lines
            );
            s += &tail(&sv.agent.stderr(), STDERR_LINES_IN_REPORT);
        }
        if let Some(c) = &self.rep.client {
            let _ = writeln!(
                s,
                "  client stderr ({} lines in earlier runs, last {STDERR_LINES_IN_REPORT} of this run):",
                self.earlier_client_lines
            );
            s += &tail(&c.agent.stderr(), STDERR_LINES_IN_REPORT);
        }
        // With IMEZZO_AGENT_LOGS=<dir>, both agents' whole stderr of this run is kept there
        // (with IMEZZO_AGENT_RUST_LOG=debug too, replay's per-entry lines).
        if let Some(dir) = std::env::var_os("IMEZZO_AGENT_LOGS") {
            let dir = std::path::PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            if let Some(sv) = &self.rep.server {
                let _ = std::fs::write(dir.join("server.log"), sv.agent.stderr().join("\n"));
            }
            if let Some(c) = &self.rep.client {
                let _ = std::fs::write(dir.join("client.log"), c.agent.stderr().join("\n"));
            }
            let _ = writeln!(s, "  both agents' stderr: {}/{{server,client}}.log", dir.display());
        }
        let log = merged_log(&self.logs);
        let ok = log.iter().filter(|l| l.ok).count();
        let _ = writeln!(
            s,
            "  operation logs: {}/w*.log ({} operations, {ok} succeeded); the last {OPS_IN_REPORT}:",
            self.logs.display(),
            log.len()
        );
        let lines: Vec<String> = log.iter().map(|l| l.line.clone()).collect();
        s += &tail(&lines, OPS_IN_REPORT);
        s
    }
}

/// Runs one configuration end to end. Err carries the full failure report.
pub fn run(cfg: &Config) -> Result<Passed, Failure> {
    let wall = Instant::now();
    let logs = log_dir(cfg.seed);
    let tag = format!("diff{}", cfg.seed % 100_000);
    let loop_size = (cfg.fs != FsKind::Tmpfs).then_some(LOOP_IMAGE_BYTES);
    let full = cfg.faults.contains(&Fault::Full);
    let replica = if full {
        Fs::new_sized(
            &format!("{tag}-replica"),
            FsKind::Tmpfs,
            Some(FULL_REPLICA_BYTES),
        )
    } else {
        Fs::new_sized(&format!("{tag}-replica"), cfg.fs, loop_size)
    };
    let rep = Replication {
        client: None,
        server: None,
        server_node: Node::init(&format!("{tag}-srv")),
        client_node: Node::init(&format!("{tag}-cli")),
        export: Fs::new_sized(&format!("{tag}-export"), cfg.fs, loop_size),
        replica,
    };
    let mut run = Run {
        cfg,
        rep,
        logs: logs.clone(),
        earlier_server_lines: 0,
        earlier_client_lines: 0,
        events: Vec::new(),
        start: Instant::now(),
    };
    run.rep.start_server(&[]);
    {
        let (addr, id) = {
            let s = run.rep.server();
            (s.addr, s.id.clone())
        };
        let c = Client::spawn(&run.rep.client_node, addr, &id, &run.rep.replica.root);
        let c = run.rep.client.insert(c);
        if c.agent
            .wait_stderr(|l| l.contains(INITIAL_SYNC_DONE), INITIAL_SYNC_TIMEOUT)
            .is_none()
        {
            let r = run.report(
                "the client's initial sync of an empty export did not finish",
                &[],
                "",
            );
            return Err(Failure {
                diverged: false,
                report: r,
                log_dir: logs,
            });
        }
    }
    let plan = schedule(cfg.seed, &cfg.faults, cfg.workload());
    run.start = Instant::now();
    run.note("workers start".into());
    let mut workers = run.spawn_workers();
    let mut fills = 0;
    for p in &plan {
        let now = run.start.elapsed();
        if p.at > now {
            std::thread::sleep(p.at - now);
        }
        run.apply(p, &mut fills);
    }
    let deadline = Instant::now() + WORKER_TIMEOUT;
    for (i, w) in workers.iter_mut().enumerate() {
        loop {
            match w.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => {
                    let err = std::fs::read_to_string(logs.join(format!("w{i}.stderr")))
                        .unwrap_or_default();
                    let r = run.report(&format!("worker {i} failed ({st}): {err}"), &plan, "");
                    return Err(Failure {
                        diverged: false,
                        report: r,
                        log_dir: logs,
                    });
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    for w in workers.iter_mut() {
                        let _ = w.kill();
                        let _ = w.wait();
                    }
                    let r = run.report(
                        &format!("worker {i} still runs after {WORKER_TIMEOUT:?}"),
                        &plan,
                        "",
                    );
                    return Err(Failure {
                        diverged: false,
                        report: r,
                        log_dir: logs,
                    });
                }
            }
        }
    }
    run.note("workers done".into());
    // Nothing touches the export from here on: verify compares mtimes to the nanosecond.
    let (a, b) = (run.rep.export.root.clone(), run.rep.replica.root.clone());
    let converged = {
        let rep = &mut run.rep;
        wait_identical_while(&a, &b, cfg.converge, || {
            let mut bad = Vec::new();
            if let Some(st) = rep.server.as_mut().and_then(|s| s.agent.exited()) {
                bad.push(format!("the server exited ({st})"));
            }
            if let Some(st) = rep.client.as_mut().and_then(|c| c.agent.exited()) {
                bad.push(format!("the client exited ({st})"));
            }
            if bad.is_empty() {
                Ok(())
            } else {
                Err(bad.join("; "))
            }
        })
    };
    let log = merged_log(&logs);
    let ops_ok = log.iter().filter(|l| l.ok).count();
    match converged {
        Err(out) => {
            run.note("no convergence".into());
            let report = run.report(
                &format!("the replica did not converge within {:?}", cfg.converge),
                &plan,
                &out,
            );
            let mut f = Failure {
                diverged: true,
                report,
                log_dir: logs,
            };
            if cfg.shrink && cfg.replay.is_none() {
                f.report += &shrink_report(cfg, &f.log_dir);
            }
            Err(f)
        }
        Ok(after) => {
            let lines = run.agent_lines();
            let minutes = (wall.elapsed().as_secs() / 60 + 1) as usize;
            let bound = MAX_AGENT_LOG_LINES_PER_MINUTE * minutes;
            // IMEZZO_AGENT_RUST_LOG (by hand) asks for replay's per-entry lines: not a flood.
            let verbose = std::env::var_os("IMEZZO_AGENT_RUST_LOG").is_some();
            if lines > bound && !verbose {
                let r = run.report(
                    &format!(
                        "the agents printed {lines} stderr lines in {:.0?}, more than {bound} \
                         ({MAX_AGENT_LOG_LINES_PER_MINUTE} per started minute)",
                        wall.elapsed()
                    ),
                    &plan,
                    "",
                );
                return Err(Failure {
                    diverged: false,
                    report: r,
                    log_dir: logs,
                });
            }
            drop(run);
            if std::env::var_os("IMEZZO_KEEP_LOGS").is_none() {
                let _ = std::fs::remove_dir_all(&logs);
            }
            Ok(Passed {
                converged_after: after,
                wall: wall.elapsed(),
                agent_log_lines: lines,
                ops_ok,
                ops_total: log.len(),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Shrinking
// ---------------------------------------------------------------------------

/// Replays `list` with one worker and no faults; true when the replica diverges.
fn diverges(base: &Config, list: &[Op]) -> bool {
    let mut cfg = base.clone();
    cfg.faults.clear();
    cfg.replay = Some(list.to_vec());
    cfg.converge = SHRINK_CONVERGE_TIMEOUT;
    cfg.shrink = false;
    match run(&cfg) {
        Ok(_) => false,
        Err(f) => {
            let _ = std::fs::remove_dir_all(&f.log_dir);
            f.diverged
        }
    }
}

/// Cuts `list` down (delta debugging: chunks, then single operations) while `still_fails`.
pub fn minimize(
    list: Vec<Op>,
    budget: Duration,
    mut still_fails: impl FnMut(&[Op]) -> bool,
) -> Vec<Op> {
    let deadline = Instant::now() + budget;
    let mut cur = list;
    let mut chunks = 2usize;
    while cur.len() > 1 && Instant::now() < deadline {
        let size = cur.len().div_ceil(chunks);
        let mut reduced = false;
        let mut start = 0;
        while start < cur.len() && Instant::now() < deadline {
            let end = (start + size).min(cur.len());
            let cand: Vec<Op> = cur[..start].iter().chain(&cur[end..]).cloned().collect();
            if !cand.is_empty() && still_fails(&cand) {
                cur = cand;
                reduced = true;
                chunks = chunks.saturating_sub(1).max(2);
            } else {
                start = end;
            }
        }
        if !reduced {
            if size == 1 {
                break;
            }
            chunks = (chunks * 2).min(cur.len());
        }
    }
    cur
}

/// Shrinks a failing run's operations: first the succeeded operations in start order with
/// one worker, then that list cut down. Returns a report section (and writes `shrunk.ops`).
pub fn shrink_report(cfg: &Config, logs: &Path) -> String {
    let log = merged_log(logs);
    let ok: Vec<Op> = log.iter().filter(|l| l.ok).map(|l| l.op.clone()).collect();
    let all: Vec<Op> = log.iter().map(|l| l.op.clone()).collect();
    let start = if diverges(cfg, &ok) {
        ok
    } else if diverges(cfg, &all) {
        all
    } else {
        return "  shrink: replaying the operations with one worker and no faults converges \
                (the failure needs concurrency or the faults)\n"
            .into();
    };
    let n0 = start.len();
    let min = minimize(start, SHRINK_BUDGET, |c| diverges(cfg, c));
    let file = logs.join("shrunk.ops");
    let text: String = min.iter().map(|o| format!("{o}\n")).collect();
    let _ = std::fs::write(&file, &text);
    let mut s = format!(
        "  shrink: {n0} -> {} operations reproduce it with one worker and no faults \
         ({}; rerun: IMEZZO_REPLAY={} cargo xtask test -- differential::seed_from_env):\n",
        min.len(),
        file.display(),
        file.display()
    );
    for o in &min {
        let _ = writeln!(s, "    {o}");
    }
    s
}
