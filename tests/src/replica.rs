//! Harness for the replication tests (`tests/replicate.rs`).
//!
//! * [`Node`]: a state directory with an identity made by `imezzo init`, and its node id.
//! * [`Agent`]: any running `imezzo` process, its stdout and stderr collected line by line;
//!   killed on drop (SIGINT first, then SIGKILL).
//! * [`Server`]: `imezzo server` on `127.0.0.1:0`, started once its ready line names the port;
//!   [`Server::kill9`] and [`Server::restart`] (same state dir, same port).
//! * [`Client`]: `imezzo client --mode replicate`, with the log of every earlier run kept so a
//!   test can tell a resume from a full resync.
//! * [`Replication`]: the usual set-up, an export and a replica on two fresh file systems, a
//!   server node and a client node, and [`Replication::assert_identical`], which polls
//!   `imezzo verify` and fails fast when an agent died.
//! * [`Tree`]: a deterministic tree of many files (sizes, modes, owners, times, symlinks, hard
//!   links, fifos, xattrs) packed into a tarball with GNU tar, for `tar -xf` into the export.
//! * [`wire`]: a hostile peer's tools: connect with a real identity, write raw frames, read
//!   messages, and wait for the other side to close the connection.
//!
//! As in the rest of this crate, nothing skips: a missing binary, a failed mount or an agent
//! that does not start fails the test with the agent's log.

use super::{agent_bin, init_process, spawn_reader, sys, Fs, FsKind, COUNTER};
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server may take to load its probes, bind, and print its ready line.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take for the initial sync of the trees these tests build.
pub const INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a replica may take to become identical after the last change of a scenario.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an agent may take to exit after SIGINT, or after a fatal error.
pub const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// The line the server prints once it is ready (contract).
pub const SERVER_READY: &str = "imezzo: server ready: listening on ";
/// The line the client prints after each initial sync (contract).
pub const INITIAL_SYNC_DONE: &str = "imezzo: client: initial sync done at seq ";
/// The line the client prints when connected and caught up (contract).
pub const IN_SYNC: &str = "imezzo: client: in sync at seq ";
/// The line the client prints while it cannot reach the server (contract).
pub const UNREACHABLE: &str = "imezzo: client: server unreachable";

/// A fresh directory `/tmp/imezzo-it-<tag>-<pid>-<n>`.
pub fn unique_dir(tag: &str) -> PathBuf {
    init_process();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = PathBuf::from(format!(
        "/tmp/imezzo-it-{}-{}-{}",
        tag,
        std::process::id(),
        n
    ));
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {d:?}: {e}"));
    d
}

/// The number after `prefix` on a line such as `imezzo: client: in sync at seq 42`.
pub fn seq_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Runs the agent binary to completion: (exit code, stdout, stderr).
pub fn run_agent(args: &[&OsStr]) -> (Option<i32>, String, String) {
    let bin = agent_bin();
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin:?}: {e} (build it with `cargo build --release -p imezzo-agent` or set IMEZZO_BIN)"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A node's state directory, initialised with `imezzo init`. Removed on drop.
pub struct Node {
    pub base: PathBuf,
    pub state: PathBuf,
    /// The node id `imezzo init` printed (64 hex digits).
    pub id: String,
}

impl Node {
    pub fn init(tag: &str) -> Node {
        let base = unique_dir(&format!("node-{tag}"));
        let state = base.join("state");
        let (code, out, err) =
            run_agent(&[OsStr::new("init"), OsStr::new("--state"), state.as_os_str()]);
        assert_eq!(
            code,
            Some(0),
            "imezzo init --state {state:?} failed:\nstdout: {out}\nstderr: {err}"
        );
        let id = out.trim().to_string();
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "imezzo init printed {out:?}, not a 64-hex-digit node id (stderr: {err})"
        );
        Node { base, state, id }
    }

    /// The node's identity as the agent library loads it, for test peers.
    pub fn identity(&self) -> imezzo_agent::identity::Identity {
        imezzo_agent::identity::Identity::load(&self.state)
            .unwrap_or_else(|e| panic!("cannot load the identity in {:?}: {e}", self.state))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

// ---------------------------------------------------------------------------
// Agent processes
// ---------------------------------------------------------------------------

/// A running `imezzo` process whose stdout and stderr are collected line by line.
pub struct Agent {
    pub name: String,
    pub args: Vec<OsString>,
    child: Child,
    pub pid: i32,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Agent {
    pub fn spawn(name: &str, args: Vec<OsString>) -> Agent {
        init_process();
        let bin = agent_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A driver that logs through env_logger should log what the contract names.
            .env_remove("RUST_LOG");
        // IMEZZO_AGENT_RUST_LOG=debug (by hand, never in CI) gives the agents replay's
        // per-entry lines.
        if let Some(level) = std::env::var_os("IMEZZO_AGENT_RUST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin:?}: {e} (build it with `cargo build --release -p imezzo-agent` or set IMEZZO_BIN)")
            });
        let pid = child.id() as i32;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (o, e) = (stdout.clone(), stderr.clone());
        let t1 = spawn_reader(child.stdout.take().unwrap(), move |l| {
            o.lock().unwrap().push(l)
        });
        let t2 = spawn_reader(child.stderr.take().unwrap(), move |l| {
            e.lock().unwrap().push(l)
        });
        Agent {
            name: name.to_string(),
            args,
            child,
            pid,
            stdout,
            stderr,
            threads: vec![t1, t2],
            status: None,
        }
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                // The pipes close with the process: drain them so no line is missed.
                for t in self.threads.drain(..) {
                    let _ = t.join();
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Stderr lines containing `needle`.
    pub fn stderr_matching(&self, needle: &str) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Whether the process reported a Rust panic.
    pub fn panicked(&self) -> bool {
        let has =
            |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().iter().any(|l| l.contains("panicked"));
        has(&self.stderr) || has(&self.stdout)
    }

    /// Waits for a stderr line satisfying `pred` (looking at every line so far) and returns
    /// it; None on timeout or when the process exited without printing one.
    pub fn wait_stderr(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.exited().is_some();
            if let Some(l) = self.stderr.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if done || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Agent::wait_stderr`], for lines after the first `skip` ones.
    pub fn wait_stderr_after(
        &mut self,
        skip: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.exited().is_some();
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find(|l| pred(l))
            {
                return Some(l.clone());
            }
            if done || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// Waits for the exit; None if it did not exit within `timeout` (the process is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (a crash, as far as the agent can tell) and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let st = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        self.status.get_or_insert(st);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// SIGINT, then the exit status; panics (after SIGKILL) if the agent does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGINT);
        match self.wait_exit(AGENT_EXIT_TIMEOUT) {
            Some(st) => st,
            None => {
                self.kill9();
                panic!(
                    "{} did not exit within {AGENT_EXIT_TIMEOUT:?} of SIGINT; killed it\n{}",
                    self.name,
                    self.context()
                );
            }
        }
    }

    /// The command line, status and last lines of output, for panic messages.
    pub fn context(&self) -> String {
        let mut s = format!(
            "--- {} (pid {}, {}): imezzo {}\n",
            self.name,
            self.pid,
            match self.status {
                Some(st) => format!("exited: {st}"),
                None => "running".into(),
            },
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (what, lines) in [("stderr", self.stderr()), ("stdout", self.stdout())] {
            if lines.is_empty() && what == "stdout" {
                continue;
            }
            s += &format!("    {what} ({} lines):\n", lines.len());
            let skip = lines.len().saturating_sub(80);
            if skip > 0 {
                s += &format!("      ... {skip} earlier lines ...\n");
            }
            for l in &lines[skip..] {
                s += &format!("      {l}\n");
            }
        }
        s
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // A clean stop first, so a server unpins its probes.
            self.signal(libc::SIGCONT);
            self.signal(libc::SIGINT);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                self.kill9();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Server and client
// ---------------------------------------------------------------------------

/// A running `imezzo server`.
pub struct Server {
    pub agent: Agent,
    /// Where it listens (the real port, from the ready line).
    pub addr: SocketAddr,
    /// The node id the ready line announced.
    pub id: String,
    /// Every argument but `--listen ADDR`, for restarts.
    base_args: Vec<OsString>,
    /// Context of earlier runs (before a restart).
    pub earlier: Vec<String>,
}

impl Server {
    /// The arguments of `imezzo server` without `--listen`.
    pub fn args(node: &Node, export: &Path, allow: &[&str], extra: &[&str]) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "server".into(),
            "--export".into(),
            export.as_os_str().into(),
            "--state".into(),
            node.state.as_os_str().into(),
        ];
        for id in allow {
            a.push("--allow".into());
            a.push((*id).into());
        }
        a.extend(extra.iter().map(OsString::from));
        a
    }

    /// Spawns a server without waiting for it.
    pub fn spawn(
        node: &Node,
        export: &Path,
        listen: &str,
        allow: &[&str],
        extra: &[&str],
    ) -> Agent {
        let mut a = Server::args(node, export, allow, extra);
        a.push("--listen".into());
        a.push(listen.into());
        Agent::spawn("server", a)
    }

    /// Starts a server on 127.0.0.1:0 that allows `allow`, and waits for its ready line.
    pub fn start(node: &Node, export: &Path, allow: &[&str], extra: &[&str]) -> Server {
        let base_args = Server::args(node, export, allow, extra);
        let mut agent = Server::spawn(node, export, "127.0.0.1:0", allow, extra);
        let (addr, id) = Server::wait_ready(&mut agent);
        assert_eq!(
            id,
            node.id,
            "the server announced another node id than `imezzo init` printed\n{}",
            agent.context()
        );
        Server {
            agent,
            addr,
            id,
            base_args,
            earlier: Vec::new(),
        }
    }

    /// Waits for `imezzo: server ready: listening on <ip>:<port> as <node id>`; returns both.
    pub fn wait_ready(agent: &mut Agent) -> (SocketAddr, String) {
        let Some(line) = agent.wait_stderr(|l| l.contains(SERVER_READY), SERVER_READY_TIMEOUT)
        else {
            let st = agent.exited();
            panic!(
                "the server did not print `{SERVER_READY}<ip>:<port> as <id>` within {SERVER_READY_TIMEOUT:?} \
                 (exit status: {st:?})\n{}",
                agent.context()
            );
        };
        let rest = &line[line.find(SERVER_READY).unwrap() + SERVER_READY.len()..];
        let mut words = rest.split_whitespace();
        let addr = words.next().and_then(|w| w.parse::<SocketAddr>().ok());
        let as_word = words.next();
        let id = words.next();
        match (addr, as_word, id) {
            (Some(addr), Some("as"), Some(id)) if addr.port() != 0 => (addr, id.to_string()),
            _ => panic!("cannot parse the server's ready line {line:?} (contract: `{SERVER_READY}<ip>:<port> as <node id>`, the real port)"),
        }
    }

    /// kill -9: the server gets no chance to flush or close anything.
    pub fn kill9(&mut self) {
        self.agent.kill9();
    }

    /// Starts the server again with the same arguments, state dir and port; waits for ready.
    pub fn restart(&mut self) {
        assert!(
            !self.agent.is_running(),
            "restart of a server that still runs\n{}",
            self.agent.context()
        );
        self.earlier.push(self.agent.context());
        let mut a = self.base_args.clone();
        a.push("--listen".into());
        a.push(self.addr.to_string().into());
        let mut agent = Agent::spawn("server (restarted)", a);
        let (addr, id) = Server::wait_ready(&mut agent);
        assert_eq!(
            addr,
            self.addr,
            "the restarted server listens elsewhere\n{}",
            agent.context()
        );
        assert_eq!(
            id,
            self.id,
            "the restarted server has another node id\n{}",
            agent.context()
        );
        self.agent = agent;
    }

    pub fn context(&self) -> String {
        let mut s = String::new();
        for (i, e) in self.earlier.iter().enumerate() {
            s += &format!("[server run {}]\n{e}", i + 1);
        }
        s + &self.agent.context()
    }
}

/// A running `imezzo client --mode replicate`.
pub struct Client {
    pub agent: Agent,
    args: Vec<OsString>,
    /// Context of earlier runs (before a restart).
    pub earlier: Vec<String>,
}

impl Client {
    pub fn args(node: &Node, server: SocketAddr, server_id: &str, root: &Path) -> Vec<OsString> {
        vec![
            "client".into(),
            "--server".into(),
            server.to_string().into(),
            "--server-id".into(),
            server_id.into(),
            "--root".into(),
            root.as_os_str().into(),
            "--state".into(),
            node.state.as_os_str().into(),
            "--mode".into(),
            "replicate".into(),
        ]
    }

    /// Spawns a client without waiting for anything.
    pub fn spawn(node: &Node, server: SocketAddr, server_id: &str, root: &Path) -> Client {
        let args = Client::args(node, server, server_id, root);
        Client {
            agent: Agent::spawn("client", args.clone()),
            args,
            earlier: Vec::new(),
        }
    }

    /// Spawns a client and waits for its initial sync.
    pub fn start(node: &Node, server: SocketAddr, server_id: &str, root: &Path) -> Client {
        let mut c = Client::spawn(node, server, server_id, root);
        c.wait_initial_sync(INITIAL_SYNC_TIMEOUT);
        c
    }

    /// Waits for `initial sync done at seq N` in this run; returns N.
    pub fn wait_initial_sync(&mut self, timeout: Duration) -> u64 {
        match self
            .agent
            .wait_stderr(|l| l.contains(INITIAL_SYNC_DONE), timeout)
        {
            Some(l) => seq_after(&l, INITIAL_SYNC_DONE)
                .unwrap_or_else(|| panic!("no seq in the client's line {l:?}\n{}", self.context())),
            None => panic!(
                "the client did not print `{INITIAL_SYNC_DONE}N` within {timeout:?}\n{}",
                self.context()
            ),
        }
    }

    /// Waits for an `in sync at seq N` line of this run beyond the first `skip` stderr lines.
    pub fn wait_in_sync_after(&mut self, skip: usize, timeout: Duration) -> Option<u64> {
        let l = self
            .agent
            .wait_stderr_after(skip, |l| l.contains(IN_SYNC), timeout)?;
        seq_after(&l, IN_SYNC)
    }

    /// `initial sync done` lines of the current run.
    pub fn initial_syncs(&self) -> Vec<String> {
        self.agent.stderr_matching(INITIAL_SYNC_DONE)
    }

    pub fn kill9(&mut self) {
        self.agent.kill9();
    }

    /// Starts the client again with the same arguments and state (no waiting).
    pub fn restart(&mut self) {
        assert!(
            !self.agent.is_running(),
            "restart of a client that still runs\n{}",
            self.agent.context()
        );
        self.earlier.push(self.agent.context());
        self.agent = Agent::spawn("client (restarted)", self.args.clone());
    }

    pub fn context(&self) -> String {
        let mut s = String::new();
        for (i, e) in self.earlier.iter().enumerate() {
            s += &format!("[client run {}]\n{e}", i + 1);
        }
        s + &self.agent.context()
    }
}

// ---------------------------------------------------------------------------
// Comparing trees
// ---------------------------------------------------------------------------

/// `imezzo verify A B`: (exit code, its output).
pub fn verify(a: &Path, b: &Path) -> (Option<i32>, String) {
    let (code, out, err) = run_agent(&[OsStr::new("verify"), a.as_os_str(), b.as_os_str()]);
    (code, format!("{out}{err}"))
}

/// The first `n` lines of `text`, and how many were left out.
pub fn head(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut s = lines
        .iter()
        .take(n)
        .map(|l| format!("    {l}\n"))
        .collect::<String>();
    if lines.len() > n {
        s += &format!("    ... {} more lines\n", lines.len() - n);
    }
    s
}

/// Polls `imezzo verify a b` until it exits 0; Ok(time taken), or Err(the last output).
/// `alive` is asked between polls and ends the wait early when it returns an error.
pub fn wait_identical_while(
    a: &Path,
    b: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let (code, out) = verify(a, b);
        if code == Some(0) {
            return Ok(start.elapsed());
        }
        let last = format!(
            "imezzo verify exit {code:?} after {:?}:\n{}",
            start.elapsed(),
            head(&out, 60)
        );
        if let Err(why) = alive() {
            return Err(format!("{why}\n{last}"));
        }
        if start.elapsed() >= timeout {
            return Err(format!("not identical within {timeout:?}; {last}"));
        }
        std::thread::sleep(pause);
        // Verify walks both trees: poll less often the longer it takes.
        pause = (pause * 2).min(Duration::from_millis(1000));
    }
}

/// Polls `imezzo verify a b` until it exits 0; Err(the last output) on timeout.
pub fn wait_identical(a: &Path, b: &Path, timeout: Duration) -> Result<Duration, String> {
    wait_identical_while(a, b, timeout, || Ok(()))
}

/// Every entry below `dir` (not counting `dir`), not following symlinks.
pub fn count_entries(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            n += 1;
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    n
}

// ---------------------------------------------------------------------------
// The usual set-up
// ---------------------------------------------------------------------------

/// An export and a replica on separate fresh file systems, a server node and a client node,
/// and the agents once started. Fields drop in order: agents first, then the nodes, then the
/// file systems (so nothing is busy when they are unmounted).
pub struct Replication {
    pub client: Option<Client>,
    pub server: Option<Server>,
    pub server_node: Node,
    pub client_node: Node,
    /// The server's file system; its `root` is exported.
    pub export: Fs,
    /// The client's file system; its `root` is the replica.
    pub replica: Fs,
}

impl Replication {
    /// tmpfs on both sides.
    pub fn new(tag: &str) -> Replication {
        Replication::on(tag, FsKind::Tmpfs)
    }

    /// Both sides on file systems of `kind`.
    pub fn on(tag: &str, kind: FsKind) -> Replication {
        Replication::between(tag, kind, kind)
    }

    /// The export on a file system of kind `export`, the replica on one of kind `replica`.
    pub fn between(tag: &str, export: FsKind, replica: FsKind) -> Replication {
        Replication {
            client: None,
            server: None,
            server_node: Node::init(&format!("{tag}-srv")),
            client_node: Node::init(&format!("{tag}-cli")),
            export: Fs::new(&format!("{tag}-export"), export),
            replica: Fs::new(&format!("{tag}-replica"), replica),
        }
    }

    /// tmpfs on both sides, server started allowing the client node, client synced.
    pub fn started(tag: &str) -> Replication {
        let mut r = Replication::new(tag);
        r.start_server(&[]);
        r.start_client();
        r
    }

    /// Starts the server on the export, allowing the client node.
    pub fn start_server(&mut self, extra: &[&str]) -> &mut Server {
        let s = Server::start(
            &self.server_node,
            &self.export.root,
            &[&self.client_node.id],
            extra,
        );
        self.server.insert(s)
    }

    /// Starts the client on the replica and waits for its initial sync.
    pub fn start_client(&mut self) -> &mut Client {
        let (addr, id) = {
            let s = self.server();
            (s.addr, s.id.clone())
        };
        let c = Client::spawn(&self.client_node, addr, &id, &self.replica.root);
        let c = self.client.insert(c);
        if c.agent
            .wait_stderr(|l| l.contains(INITIAL_SYNC_DONE), INITIAL_SYNC_TIMEOUT)
            .is_none()
        {
            let ctx = self.context();
            panic!("the client did not print `{INITIAL_SYNC_DONE}N` within {INITIAL_SYNC_TIMEOUT:?}\n{ctx}");
        }
        self.client.as_mut().unwrap()
    }

    pub fn server(&mut self) -> &mut Server {
        self.server.as_mut().expect("the server is not started")
    }

    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("the client is not started")
    }

    /// Path inside the export.
    pub fn e(&self, rel: &str) -> PathBuf {
        self.export.p(rel)
    }

    /// Path inside the replica.
    pub fn r(&self, rel: &str) -> PathBuf {
        self.replica.p(rel)
    }

    /// Both agents' logs.
    pub fn context(&self) -> String {
        let mut s = String::new();
        if let Some(sv) = &self.server {
            s += &sv.context();
        }
        if let Some(c) = &self.client {
            s += &c.context();
        }
        s
    }

    /// Panics with the logs when an agent has exited or panicked.
    fn check_alive(&mut self) -> Result<(), String> {
        let mut bad = Vec::new();
        if let Some(s) = self.server.as_mut() {
            if let Some(st) = s.agent.exited() {
                bad.push(format!("the server exited ({st})"));
            } else if s.agent.panicked() {
                bad.push("the server panicked".into());
            }
        }
        if let Some(c) = self.client.as_mut() {
            if let Some(st) = c.agent.exited() {
                bad.push(format!("the client exited ({st})"));
            } else if c.agent.panicked() {
                bad.push("the client panicked".into());
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }

    /// Waits until `imezzo verify export replica` exits 0; panics with the last verify
    /// output and both logs on timeout, or as soon as an agent dies.
    pub fn assert_identical(&mut self, timeout: Duration, what: &str) -> Duration {
        let (a, b) = (self.export.root.clone(), self.replica.root.clone());
        let r = wait_identical_while(&a, &b, timeout, || self.check_alive());
        match r {
            Ok(d) => {
                eprintln!("[{what}] identical after {d:?}");
                d
            }
            Err(e) => {
                let ctx = self.context();
                panic!("{what}: the replica is not identical to the export: {e}\n{ctx}");
            }
        }
    }

    /// Asserts that neither agent ever printed a panic.
    pub fn assert_no_panic(&self) {
        let ctx = || self.context();
        if let Some(s) = &self.server {
            assert!(
                !s.agent.panicked() && !s.earlier.iter().any(|e| e.contains("panicked")),
                "the server panicked\n{}",
                ctx()
            );
        }
        if let Some(c) = &self.client {
            assert!(
                !c.agent.panicked() && !c.earlier.iter().any(|e| e.contains("panicked")),
                "the client panicked\n{}",
                ctx()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Generated trees
// ---------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator, so every run builds the same tree.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// What [`Tree::generate`] made.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    pub dirs: usize,
    pub files: usize,
    pub bytes: u64,
    pub symlinks: usize,
    pub hard_links: usize,
    pub fifos: usize,
}

/// A deterministic tree: `dirs` directories (two levels) holding `files` regular files of
/// mixed sizes (mostly small, a few up to 1 MiB, some empty), modes and owners, old mtimes,
/// plus a relative symlink per directory, a hard link every 97 files, a fifo every 20
/// directories and a `user.` xattr every 13 files.
pub struct Tree;

impl Tree {
    pub fn generate(top: &Path, dirs: usize, files: usize, seed: u64) -> TreeStats {
        let mut rng = Rng(seed);
        let mut st = TreeStats::default();
        let dir_path = |d: usize| {
            top.join(format!("d{:02}", d % 10))
                .join(format!("sub{d:03}"))
        };
        for d in 0..dirs {
            let p = dir_path(d);
            std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir -p {p:?}: {e}"));
            st.dirs += 1;
        }
        let modes = [0o644, 0o600, 0o640, 0o755, 0o444, 0o700, 0o664];
        for i in 0..files {
            let d = i % dirs;
            let p = dir_path(d).join(format!("file-{i:05}.dat"));
            let size = match rng.below(100) {
                0 => 256 * 1024 + rng.below(768 * 1024),
                1..=4 => 0,
                5..=29 => 4096 + rng.below(28 * 1024),
                _ => rng.below(4096),
            } as usize;
            std::fs::write(&p, rng.bytes(size)).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
            st.files += 1;
            st.bytes += size as u64;
            if i % 13 == 0 {
                sys::setxattr(&p, "user.imezzo-test", format!("value {i}").as_bytes(), 0)
                    .unwrap_or_else(|e| panic!("{e:?}"));
            }
            if i % 97 == 0 {
                let other = dir_path((d + 1) % dirs).join(format!("link-{i:05}.dat"));
                sys::link(&p, &other).unwrap_or_else(|e| panic!("{e:?}"));
                st.hard_links += 1;
            }
            sys::chmod(&p, modes[i % modes.len()]).unwrap_or_else(|e| panic!("{e:?}"));
            if i % 3 == 0 {
                sys::chown(&p, 1000 + (i % 5) as u32, 100 + (i % 3) as u32)
                    .unwrap_or_else(|e| panic!("{e:?}"));
            }
            set_mtime(
                &p,
                1_600_000_000 + rng.below(100_000_000) as i64,
                rng.below(1_000_000_000) as i64,
            );
        }
        for d in 0..dirs {
            let p = dir_path(d);
            let target = format!("file-{:05}.dat", d);
            sys::symlink(&target, &p.join("latest")).unwrap_or_else(|e| panic!("{e:?}"));
            st.symlinks += 1;
            if d % 20 == 0 {
                let f = super::cstr(p.join("pipe"));
                assert_eq!(
                    unsafe { libc::mkfifo(f.as_ptr(), 0o640) },
                    0,
                    "mkfifo {p:?}/pipe"
                );
                st.fifos += 1;
            }
        }
        st
    }

    /// Packs `top`'s parent-relative name into a tarball with GNU tar (xattrs kept).
    pub fn tar(top: &Path, tarball: &Path) {
        let parent = top.parent().unwrap();
        let name = top.file_name().unwrap();
        let out = Command::new("tar")
            .args(["--xattrs", "--xattrs-include=user.*", "-cf"])
            .arg(tarball)
            .arg("-C")
            .arg(parent)
            .arg(name)
            .output()
            .unwrap_or_else(|e| panic!("cannot run tar (Debian package `tar`): {e}"));
        assert!(
            out.status.success(),
            "tar -cf {tarball:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `tar -xf TARBALL -C DEST` (as root: owners, modes, times and xattrs restored), spawned.
    pub fn untar(tarball: &Path, dest: &Path) -> Child {
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=user.*", "-xf"])
            .arg(tarball)
            .arg("-C")
            .arg(dest)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run tar (Debian package `tar`): {e}"))
    }

    /// Waits for a spawned `tar` and asserts it succeeded.
    pub fn wait_tar(child: Child) {
        let out = child.wait_with_output().expect("wait for tar");
        assert!(
            out.status.success(),
            "tar -xf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Builds a tree in `scratch/tree` (`dirs`, `files`) and its tarball `scratch/tree.tar`;
    /// returns the tarball's path and what it holds.
    pub fn tarball(scratch: &Path, dirs: usize, files: usize, seed: u64) -> (PathBuf, TreeStats) {
        let top = scratch.join("tree");
        let st = Tree::generate(&top, dirs, files, seed);
        let tarball = scratch.join("tree.tar");
        Tree::tar(&top, &tarball);
        std::fs::remove_dir_all(&top).unwrap_or_else(|e| panic!("rm -r {top:?}: {e}"));
        (tarball, st)
    }
}

/// Sets a path's mtime (and atime) without following a final symlink.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    sys::utimensat(
        libc::AT_FDCWD,
        Some(p),
        Some([t, t]),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
}

// ---------------------------------------------------------------------------
// Hostile peers
// ---------------------------------------------------------------------------

/// What a test peer needs to speak (or abuse) the protocol over the real transport.
pub mod wire {
    use imezzo_agent::identity::{Identity, NodeId};
    use imezzo_agent::protocol::{encode, FrameDecoder, Msg, MAX_DATA_BODY};
    use imezzo_agent::transport;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// A multi-threaded runtime for a test's async part.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    pub fn node_id(s: &str) -> NodeId {
        s.parse()
            .unwrap_or_else(|e| panic!("bad node id {s:?}: {e}"))
    }

    /// Connects to a server as `identity`, pinning `server_id`.
    pub async fn connect(
        identity: &Identity,
        addr: SocketAddr,
        server_id: &str,
    ) -> (transport::ClientEndpoint, quinn::Connection) {
        let ep =
            transport::client_endpoint(identity).unwrap_or_else(|e| panic!("client endpoint: {e}"));
        let conn = tokio::time::timeout(
            Duration::from_secs(15),
            transport::connect(&ep, addr, node_id(server_id)),
        )
        .await
        .unwrap_or_else(|_| panic!("no QUIC handshake with {addr} within 15 s"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        (ep, conn)
    }

    /// One frame of `msg`, as the protocol encodes it.
    pub fn frame(msg: &Msg) -> Vec<u8> {
        encode(msg).unwrap_or_else(|e| panic!("encode {}: {e}", msg.name()))
    }

    /// A raw frame header: `u32` body length, `u16` version, little-endian.
    pub fn header(len: u32, version: u16) -> Vec<u8> {
        let mut h = len.to_le_bytes().to_vec();
        h.extend_from_slice(&version.to_le_bytes());
        h
    }

    /// Writes bytes to a stream; an error (the peer already closed) is returned, not raised.
    pub async fn send(stream: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
        stream.write_all(bytes).await.map_err(|e| e.to_string())
    }

    /// The next message on a stream: Ok(None) when the stream ended, Err on a bad frame,
    /// a read error or the timeout.
    pub async fn read_msg(
        stream: &mut quinn::RecvStream,
        decoder: &mut FrameDecoder,
        timeout: Duration,
    ) -> Result<Option<Msg>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(m) = decoder
                .next_msg()
                .map_err(|e| format!("bad frame from the peer: {e}"))?
            {
                return Ok(Some(m));
            }
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return Err(format!("no complete message within {timeout:?}")),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(n))) => decoder.push(&buf[..n]),
            }
        }
    }

    /// A decoder for what a server sends (the larger, fetch-stream limit covers both).
    pub fn decoder() -> FrameDecoder {
        FrameDecoder::new(MAX_DATA_BODY)
    }

    /// How a connection ended, as seen from this side.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Ending {
        /// The peer closed it with an application code and reason.
        ClosedByPeer { code: u64, reason: String },
        /// Anything else (reset, timeout, local close), rendered.
        Other(String),
        /// Still open when the wait ended.
        StillOpen,
    }

    /// Waits for the connection to end.
    pub async fn ending(conn: &quinn::Connection, timeout: Duration) -> Ending {
        match tokio::time::timeout(timeout, conn.closed()).await {
            Err(_) => Ending::StillOpen,
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => Ending::ClosedByPeer {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            Ok(e) => Ending::Other(e.to_string()),
        }
    }
}
