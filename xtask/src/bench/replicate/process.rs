//! The child processes of the replication bench and what they cost: CPU seconds and peak
//! memory, for long-running agents and daemons ([`Daemon`]) and for one-shot commands
//! ([`run_measured`]).
//!
//! Children are reaped with `wait4`, whose resource usage covers the child *and* every
//! descendant it reaped: rsync's daemon forks a receiver per connection and lsyncd forks an
//! rsync per batch, and their CPU time is part of that side's cost. Memory of such forking
//! programs is the sum of resident sets over the process tree, sampled; for a single process
//! it is the kernel's own peak (VmHWM). `wait4`'s `ru_maxrss` is not used: the kernel carries
//! into it the parent's footprint from between fork and exec, so every child would weigh at
//! least what the bench itself does.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::exec;

/// What a process cost, once reaped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User plus system CPU seconds of the process and of the descendants it reaped.
    pub cpu: f64,
    /// Peak memory in KiB: VmHWM, or the largest sampled sum over the process tree, whichever
    /// is larger.
    pub peak_kib: Option<u64>,
}

/// One line a child printed, and when the bench read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// How long a child gets to exit after its stop signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// Lines of a child's output shown in an error message.
const TAIL_LINES: usize = 30;

/// A long-running child (an agent, a daemon): its output collected line by line with the time
/// each line was read, stopped with its own signal, and killed if the bench ends early.
pub struct Daemon {
    label: String,
    /// Kept for its pipes only: the process is reaped by pid with `wait4`.
    _child: Child,
    pid: libc::pid_t,
    stop_signal: libc::c_int,
    lines: Arc<Mutex<Vec<Line>>>,
    sampler: Option<TreeSampler>,
    reaped: Option<Reaped>,
}

#[derive(Clone, Copy)]
struct Reaped {
    status: libc::c_int,
    /// User plus system seconds, reaped descendants included.
    cpu: f64,
}

impl Daemon {
    /// Starts `cmd` with its stdout and stderr collected; `stop_signal` is what stops it
    /// cleanly (imezzo: SIGINT, which unpins the server's probes; rsync and lsyncd: SIGTERM).
    /// With `sample_tree`, the memory of the whole process tree is sampled every 50 ms.
    pub fn spawn(
        label: &str,
        cmd: &mut Command,
        stop_signal: libc::c_int,
        sample_tree: bool,
    ) -> Result<Daemon> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        exec::announce(cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {label} (`cargo xtask deps` installs it)"))?;
        let pid = libc::pid_t::try_from(child.id()).context("a child's pid does not fit pid_t")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        // Readers are detached: a grandchild (lsyncd's rsync) may hold the pipes open past
        // the child's exit, and nothing must wait for it.
        if let Some(out) = child.stdout.take() {
            collect_lines(out, Arc::clone(&lines));
        }
        if let Some(err) = child.stderr.take() {
            collect_lines(err, Arc::clone(&lines));
        }
        Ok(Daemon {
            label: label.to_string(),
            _child: child,
            pid,
            stop_signal,
            lines,
            sampler: sample_tree.then(|| TreeSampler::start(pid, DAEMON_SAMPLE_EVERY)),
            reaped: None,
        })
    }

    /// Waits for a line after the first `skip` ones that satisfies `matches`; fails with the
    /// tail of the output when the process exits first, when `timeout` passes, or on Ctrl-C.
    pub fn wait_line(
        &mut self,
        skip: usize,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.poll_exit();
            if let Some(line) = lock(&self.lines)
                .iter()
                .skip(skip)
                .find(|line| matches(&line.text))
            {
                return Ok(line.clone());
            }
            if exited {
                bail!(
                    "{} exited ({}) before {what}; its last lines:\n{}",
                    self.label,
                    self.exit_description(),
                    self.tail()
                );
            }
            exec::bail_if_interrupted()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not report {what} within {} s; its last lines:\n{}",
                    self.label,
                    timeout.as_secs(),
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Fails with the tail of the output if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.poll_exit() {
            bail!(
                "{} exited ({}) during the run; its last lines:\n{}",
                self.label,
                self.exit_description(),
                self.tail()
            );
        }
        Ok(())
    }

    /// CPU seconds so far: the process's own and those of the children it reaped.
    pub fn cpu_seconds(&self) -> Option<f64> {
        if let Some(reaped) = self.reaped {
            return Some(reaped.cpu);
        }
        proc_cpu_seconds(self.pid)
    }

    /// How long each of its live threads has run so far, to the nanosecond: for phases too
    /// short for the clock ticks of [`Daemon::cpu_seconds`].
    pub fn thread_times(&self) -> Option<ThreadTimes> {
        if self.reaped.is_some() {
            return None;
        }
        thread_times(self.pid)
    }

    /// A counter of /proc/PID/io, e.g. `rchar` (bytes its read-family calls returned).
    pub fn io_counter(&self, field: &str) -> Option<u64> {
        if self.reaped.is_some() {
            return None;
        }
        let io = fs::read_to_string(format!("/proc/{}/io", self.pid)).ok()?;
        io.lines().find_map(|line| {
            line.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// VmHWM now, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        if self.reaped.is_some() {
            return None;
        }
        status_kib(self.pid, "VmHWM")
    }

    /// Stops the process with its stop signal (SIGKILL after [`STOP_GRACE`]) and returns
    /// what it cost over its whole life.
    pub fn stop(&mut self) -> Result<Usage> {
        let hwm = self.peak_rss_kib();
        if self.reaped.is_none() {
            signal(self.pid, self.stop_signal);
            let deadline = Instant::now() + STOP_GRACE;
            while !self.poll_exit() {
                if Instant::now() > deadline {
                    eprintln!(
                        "xtask: warning: {} did not exit within {} s of its stop signal: killing it",
                        self.label,
                        STOP_GRACE.as_secs()
                    );
                    signal(self.pid, libc::SIGKILL);
                    self.reap_blocking();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let sampled = self.sampler.take().and_then(TreeSampler::finish);
        let reaped = self
            .reaped
            .with_context(|| format!("{} could not be reaped", self.label))?;
        let peak = [hwm, sampled].into_iter().flatten().max();
        Ok(Usage {
            cpu: reaped.cpu,
            peak_kib: peak,
        })
    }

    /// Its output lines that mention an error or a warning (case-insensitive).
    pub fn complaints(&self) -> Vec<String> {
        lock(&self.lines)
            .iter()
            .filter(|line| {
                let text = line.text.to_ascii_lowercase();
                text.contains("error") || text.contains("warn")
            })
            .map(|line| line.text.clone())
            .collect()
    }

    /// The last lines of output, for error messages.
    pub fn tail(&self) -> String {
        let lines = lock(&self.lines);
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines[skip..]
            .iter()
            .map(|line| format!("    {}", line.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn exit_description(&self) -> String {
        self.reaped
            .map_or_else(|| "still running".into(), |r| describe_status(r.status))
    }

    /// Reaps the process if it has exited; true once it is reaped.
    fn poll_exit(&mut self) -> bool {
        if self.reaped.is_some() {
            return true;
        }
        if let Some(reaped) = wait4(self.pid, libc::WNOHANG) {
            self.reaped = Some(reaped);
        }
        self.reaped.is_some()
    }

    fn reap_blocking(&mut self) {
        if self.reaped.is_none() {
            self.reaped = wait4(self.pid, 0);
        }
    }
}

impl Drop for Daemon {
    /// A child left over by an error or Ctrl-C must not outlive the bench, nor keep its
    /// tmpfs busy: the stop signal first (so that the server unpins its probes), then SIGKILL.
    fn drop(&mut self) {
        if self.poll_exit() {
            return;
        }
        signal(self.pid, self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.poll_exit() {
            if Instant::now() > deadline {
                signal(self.pid, libc::SIGKILL);
                self.reap_blocking();
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What a one-shot command did and cost.
pub struct Measured {
    pub success: bool,
    pub status: String,
    pub wall: Duration,
    pub usage: Usage,
    pub output: String,
}

/// Runs `cmd` to its end and measures it: wall time from spawn to reaping, its CPU time
/// (`wait4`'s usage, which covers its reaped children) and its peak memory (sampled).
pub fn run_measured(cmd: &mut Command) -> Result<Measured> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    exec::announce(cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", cmd.get_program().to_string_lossy()))?;
    let pid = libc::pid_t::try_from(child.id()).context("a child's pid does not fit pid_t")?;
    let sampler = TreeSampler::start(pid, COMMAND_SAMPLE_EVERY);
    let readers: Vec<JoinHandle<String>> = [
        child.stdout.take().map(read_all),
        child.stderr.take().map(read_all),
    ]
    .into_iter()
    .flatten()
    .collect();
    let reaped = wait4(pid, 0).with_context(|| format!("could not wait for pid {pid}"))?;
    let wall = start.elapsed();
    let peak_kib = sampler.finish();
    let output = readers
        .into_iter()
        .filter_map(|reader| reader.join().ok())
        .collect::<Vec<_>>()
        .join("");
    Ok(Measured {
        success: libc::WIFEXITED(reaped.status) && libc::WEXITSTATUS(reaped.status) == 0,
        status: describe_status(reaped.status),
        wall,
        usage: Usage {
            cpu: reaped.cpu,
            peak_kib,
        },
        output,
    })
}

fn read_all(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn collect_lines(stream: impl Read + Send + 'static, lines: Arc<Mutex<Vec<Line>>>) {
    thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { return };
            let line = Line {
                at: Instant::now(),
                text: String::from_utf8_lossy(&line).into_owned(),
            };
            lock(&lines).push(line);
        }
    });
}

/// A poisoned lock only means a reader thread panicked; the lines it holds are still good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn signal(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped (callers
    // check), so it cannot name a recycled process.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// `wait4(pid, options)`: the exit status and usage once the child is reaped, None while it
/// runs (WNOHANG) or on an error.
fn wait4(pid: libc::pid_t, options: libc::c_int) -> Option<Reaped> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and usage are valid for writes for the duration of the call.
        let got = unsafe { libc::wait4(pid, &mut status, options, &mut usage) };
        if got == pid {
            let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            return Some(Reaped {
                status,
                cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            });
        }
        if got == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status}")
    }
}

/// utime + stime + cutime + cstime of `pid`, in seconds, from /proc/PID/stat.
pub fn proc_cpu_seconds(pid: libc::pid_t) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks: u64 = stat_fields(&stat)?
        .get(11..15)?
        .iter()
        .map(|field| field.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// The fields of /proc/PID/stat after the command name, which may itself hold spaces and
/// parentheses: index 0 is the state (field 3 of proc(5)).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Run time in nanoseconds of each thread of a process, by thread id, from
/// /proc/PID/task/TID/schedstat (its first field).
#[derive(Clone, Debug, Default)]
pub struct ThreadTimes(HashMap<libc::pid_t, u64>);

impl ThreadTimes {
    /// CPU seconds the threads ran since `earlier`: a thread started in between counts from
    /// zero; one that exited in between is missed (imezzo's agents keep their threads).
    pub fn seconds_since(&self, earlier: &ThreadTimes) -> f64 {
        let nanos: u64 = self
            .0
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        nanos as f64 / 1e9
    }
}

fn thread_times(pid: libc::pid_t) -> Option<ThreadTimes> {
    let mut times = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // A thread may exit between the listing and the read: it is then left out.
        let Ok(schedstat) = fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse().ok())
        {
            times.insert(tid, ns);
        }
    }
    (!times.is_empty()).then_some(ThreadTimes(times))
}

/// A `kB` field of /proc/PID/status (VmHWM, VmRSS).
pub fn status_kib(pid: libc::pid_t, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Samples the summed resident set of a process and all its descendants every 50 ms and
/// keeps the largest sum: the memory of a side that forks.
struct TreeSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// How often a daemon's tree is sampled: it runs for seconds to minutes.
const DAEMON_SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How often a one-shot command's tree is sampled: it may last a fraction of a second.
const COMMAND_SAMPLE_EVERY: Duration = Duration::from_millis(10);

impl TreeSampler {
    fn start(root: libc::pid_t, every: Duration) -> TreeSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak_kib) = (Arc::clone(&stop), Arc::clone(&peak_kib));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // The root's own peak counts too: it catches what falls between samples.
                    let sampled = [tree_rss_kib(root), status_kib(root, "VmHWM")];
                    for kib in sampled.into_iter().flatten() {
                        peak_kib.fetch_max(kib, Ordering::Relaxed);
                    }
                    thread::sleep(every);
                }
            })
        };
        TreeSampler {
            stop,
            peak_kib,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Some(self.peak_kib.load(Ordering::Relaxed)).filter(|&kib| kib > 0)
    }
}

impl Drop for TreeSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The summed VmRSS of `root` and its descendants, from one pass over /proc.
fn tree_rss_kib(root: libc::pid_t) -> Option<u64> {
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ppid) =
            stat_fields(&stat).and_then(|fields| fields.get(1).and_then(|ppid| ppid.parse().ok()))
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        total += status_kib(pid, "VmRSS").unwrap_or(0);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (rsync (x) y) S 7 42 42 0 -1 4194560 100 0 0 0 12 34 56 78 20 0 1";
        let fields = stat_fields(stat).expect("fields");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "7");
        assert_eq!(&fields[11..15], ["12", "34", "56", "78"]);
    }

    #[test]
    fn measured_command_reports_failure_and_output() {
        let measured =
            run_measured(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
                .expect("sh runs");
        assert!(!measured.success);
        assert_eq!(measured.status, "exit status 3");
        assert!(measured.output.contains("out") && measured.output.contains("err"));
    }

    #[test]
    fn thread_times_count_new_threads_from_zero() {
        let earlier = ThreadTimes(HashMap::from([(1, 1_000), (2, 5_000)]));
        let later = ThreadTimes(HashMap::from([(1, 3_000), (2, 5_000), (3, 500_000_000)]));
        assert!((later.seconds_since(&earlier) - 0.500_002).abs() < 1e-12);
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        assert!(thread_times(pid).is_some_and(|times| !times.0.is_empty()));
    }

    #[test]
    fn own_cpu_seconds_are_readable() {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        assert!(proc_cpu_seconds(pid).is_some_and(|cpu| cpu >= 0.0));
        assert!(status_kib(pid, "VmHWM").is_some_and(|kib| kib > 0));
    }
}
