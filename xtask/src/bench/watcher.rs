//! The watchers compared by `bench capture`, run as child processes: started, waited for until
//! they are ready, and stopped with SIGINT, reporting what they saw.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::numeric_fields;
use crate::exec;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Watcher {
    None,
    /// `imezzo capture --empty-probe`: an empty program where imezzo's probes hook every
    /// syscall's exit, the floor of any eBPF capture.
    EmptyProbe,
    Imezzo,
    Inotify,
    Fanotify,
}

impl Watcher {
    pub const ALL: [Watcher; 5] = [
        Watcher::None,
        Watcher::EmptyProbe,
        Watcher::Imezzo,
        Watcher::Inotify,
        Watcher::Fanotify,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Watcher::None => "none",
            Watcher::EmptyProbe => "empty probe on sys_exit (floor)",
            Watcher::Imezzo => "imezzo capture --json",
            Watcher::Inotify => "inotifywait -m -r",
            Watcher::Fanotify => "fatrace -c (fanotify)",
        }
    }
}

/// The programs the watchers run.
pub struct Programs {
    pub imezzo: PathBuf,
    pub inotifywait: PathBuf,
    pub fatrace: PathBuf,
}

/// What a watcher reported once stopped.
pub struct Seen {
    /// Events it saw: imezzo's own count from its exit summary (its journal lines go to the notes),
    /// one output line an event for the others.
    pub events: Option<u64>,
    /// Events it lost: imezzo's `drops=`, inotify's queue overflows; unknown for fatrace.
    pub drops: Option<u64>,
    /// VmHWM just before it was stopped.
    pub peak_rss_kib: Option<u64>,
    /// Other fields of imezzo's summary, and anything odd about the run.
    pub notes: Vec<String>,
}

/// How long a watcher gets to say it is ready, and how it says it.
enum Ready {
    Line {
        marker: &'static str,
        within: Duration,
    },
    After(Duration),
}

pub struct Running {
    watcher: Watcher,
    child: Child,
    lines: Arc<AtomicU64>,
    stdout: Option<JoinHandle<StdoutTally>>,
    stderr: Option<JoinHandle<StderrLog>>,
    ready: mpsc::Receiver<()>,
}

#[derive(Default)]
struct StdoutTally {
    lines: u64,
    /// Lines naming an event queue overflow (inotifywait prints `Q_OVERFLOW`).
    overflows: u64,
}

#[derive(Default)]
struct StderrLog {
    tail: VecDeque<String>,
    /// The last line with an `events=` field: imezzo's exit summary.
    summary: Option<String>,
}

const STDERR_TAIL: usize = 40;

/// Starts `watcher` on `dir` and returns once it is ready; `None` for [`Watcher::None`].
pub fn start(watcher: Watcher, programs: &Programs, dir: &Path) -> Result<Option<Running>> {
    let (mut cmd, ready) = match watcher {
        Watcher::None => return Ok(None),
        Watcher::Imezzo | Watcher::EmptyProbe => {
            let mut cmd = Command::new(&programs.imezzo);
            cmd.arg("capture").arg("--root").arg(dir).arg("--json");
            if watcher == Watcher::EmptyProbe {
                cmd.arg("--empty-probe");
            }
            // Loading and attaching the probes and walking the tree may take a few seconds.
            (
                cmd,
                Ready::Line {
                    marker: "capture ready",
                    within: Duration::from_secs(60),
                },
            )
        }
        Watcher::Inotify => {
            // Without -q it says on stderr when every watch is set.
            let mut cmd = Command::new(&programs.inotifywait);
            cmd.args(["-m", "-r"]).arg(dir);
            (
                cmd,
                Ready::Line {
                    marker: "Watches established",
                    within: Duration::from_secs(30),
                },
            )
        }
        Watcher::Fanotify => {
            // fatrace -c marks the mount of its working directory; it prints nothing when ready.
            let mut cmd = Command::new(&programs.fatrace);
            cmd.arg("-c").current_dir(dir);
            (cmd, Ready::After(Duration::from_millis(500)))
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    exec::announce(&cmd);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "could not start {} (`cargo xtask deps` installs it)",
            watcher.label()
        )
    })?;
    let stdout = child
        .stdout
        .take()
        .context("the watcher's stdout was not piped")?;
    let stderr = child
        .stderr
        .take()
        .context("the watcher's stderr was not piped")?;

    let lines = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&lines);
    let stdout = thread::spawn(move || tally_stdout(stdout, &counter));
    let marker = match ready {
        Ready::Line { marker, .. } => Some(marker),
        Ready::After(_) => None,
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let stderr = thread::spawn(move || log_stderr(stderr, marker, ready_tx));

    let mut running = Running {
        watcher,
        child,
        lines,
        stdout: Some(stdout),
        stderr: Some(stderr),
        ready: ready_rx,
    };
    running.wait_ready(ready)?;
    Ok(Some(running))
}

fn tally_stdout(stdout: impl Read, lines: &AtomicU64) -> StdoutTally {
    let mut reader = BufReader::with_capacity(1 << 16, stdout);
    let mut tally = StdoutTally::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return tally,
            Ok(_) => {
                tally.lines += 1;
                lines.fetch_add(1, Ordering::Relaxed);
                if line.windows(10).any(|w| w == b"Q_OVERFLOW") {
                    tally.overflows += 1;
                }
            }
        }
    }
}

fn log_stderr(stderr: impl Read, marker: Option<&str>, ready: mpsc::Sender<()>) -> StderrLog {
    let mut log = StderrLog::default();
    let mut ready = Some(ready);
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).into_owned();
        if marker.is_some_and(|marker| line.contains(marker)) {
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
        }
        if line.contains("events=") {
            log.summary = Some(line.clone());
        }
        if log.tail.len() == STDERR_TAIL {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
    log
}

impl Running {
    fn wait_ready(&mut self, ready: Ready) -> Result<()> {
        let (marker, within) = match ready {
            Ready::Line { marker, within } => (marker, within),
            Ready::After(delay) => {
                thread::sleep(delay);
                if let Some(status) = self.child.try_wait()? {
                    let tail = self.abort();
                    bail!(
                        "{} exited ({status}) as it started; its stderr:\n{tail}",
                        self.watcher.label()
                    );
                }
                return Ok(());
            }
        };
        let deadline = Instant::now() + within;
        loop {
            match self.ready.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let tail = self.abort();
                    bail!(
                        "{} closed its stderr (exited?) before printing {marker:?}; its stderr:\n{tail}",
                        self.watcher.label()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if exec::interrupted() || Instant::now() > deadline {
                        let tail = self.abort();
                        exec::bail_if_interrupted()?;
                        bail!(
                            "{} did not print {marker:?} on stderr within {} s; its stderr:\n{tail}",
                            self.watcher.label(),
                            within.as_secs()
                        );
                    }
                }
            }
        }
    }

    /// Kills the watcher and returns the tail of its stderr, for an error message.
    fn abort(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self
            .stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        if let Some(handle) = self.stdout.take() {
            let _ = handle.join();
        }
        Vec::from(log.tail).join("\n")
    }

    /// Waits for the watcher's output to settle, samples its peak RSS, stops it with SIGINT (as an
    /// operator's Ctrl-C would) and collects what it reported.
    /// The watcher's process id (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) -> Result<Seen> {
        self.settle();
        let pid = self.child.id();
        let peak_rss_kib = peak_rss_kib(pid);
        let mut notes = Vec::new();
        // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGINT);
        }
        let grace = Duration::from_secs(30);
        let status = match wait_timeout(&mut self.child, grace)? {
            Some(status) => status,
            None => {
                notes.push(format!(
                    "did not exit within {} s of SIGINT: killed",
                    grace.as_secs()
                ));
                self.child.kill().context("could not kill the watcher")?;
                self.child.wait()?
            }
        };
        let tally = self
            .stdout
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        let log = self
            .stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        let interrupted =
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGINT);
        if !status.success() && !interrupted && notes.is_empty() {
            notes.push(format!("exited with {status}"));
        }

        let mut seen = Seen {
            events: Some(tally.lines),
            drops: None,
            peak_rss_kib,
            notes,
        };
        match self.watcher {
            Watcher::Imezzo => {
                seen.events = None;
                seen.notes.push(format!("journal lines={}", tally.lines));
                match &log.summary {
                    Some(summary) => {
                        for (key, value) in numeric_fields(summary) {
                            match key.as_str() {
                                "events" => seen.events = Some(value as u64),
                                "drops" => seen.drops = Some(value as u64),
                                _ => seen.notes.push(format!("{key}={value}")),
                            }
                        }
                    }
                    None => seen.notes.push(format!(
                        "no `events=` summary on stderr; last lines: {}",
                        Vec::from(log.tail).join(" | ")
                    )),
                }
            }
            Watcher::Inotify => seen.drops = Some(tally.overflows),
            Watcher::EmptyProbe => seen.events = None,
            Watcher::Fanotify | Watcher::None => {}
        }
        Ok(seen)
    }

    /// Events reach a watcher after the writes that caused them: wait until its output stops
    /// growing (300 ms without a new line, 20 s at most) so that the counts are complete.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.lines.load(Ordering::Relaxed);
        while Instant::now() < deadline && !exec::interrupted() {
            thread::sleep(Duration::from_millis(300));
            let now = self.lines.load(Ordering::Relaxed);
            if now == last {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Running {
    /// A watcher left over by an error must not outlive the bench (nor keep its tmpfs busy).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("could not wait for the watcher")? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// VmHWM, the peak resident set size, from /proc/<pid>/status.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
