//! imezzo's two sides as the bench runs them: `imezzo server` on the export and
//! `imezzo client --mode replicate` on the replica, over QUIC on loopback, each with a fresh
//! identity and state directory, and the lines of their contract the bench waits for.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{process::Daemon, scratch::ScratchDir};
use crate::exec;

/// The line the server prints once it is ready: `... listening on IP:PORT as NODE_ID`.
pub const SERVER_READY: &str = "imezzo: server ready: listening on ";
/// The line the client prints after its initial sync: `... at seq N`.
pub const INITIAL_SYNC_DONE: &str = "imezzo: client: initial sync done at seq ";

/// How long a server may take to attach its probes, walk the export and bind.
const SERVER_READY_WITHIN: Duration = Duration::from_secs(300);

/// A server and the client node allowed in: state directories under one scratch directory.
pub struct Nodes {
    imezzo: PathBuf,
    server_state: PathBuf,
    client_state: PathBuf,
    client_id: String,
    /// Last: removed after the agents using it have stopped.
    _scratch: ScratchDir,
}

impl Nodes {
    /// Two fresh identities (`imezzo init`), on the disk under /tmp like a real state dir.
    pub fn init(imezzo: &Path) -> Result<Nodes> {
        let scratch = ScratchDir::create("imezzo-bench-state")?;
        let server_state = scratch.path().join("server");
        let client_state = scratch.path().join("client");
        init(imezzo, &server_state)?;
        let client_id = init(imezzo, &client_state)?;
        Ok(Nodes {
            imezzo: imezzo.to_path_buf(),
            server_state,
            client_state,
            client_id,
            _scratch: scratch,
        })
    }

    /// Starts `imezzo server` on `export` and waits for its ready line.
    pub fn start_server(&self, export: &Path) -> Result<Server> {
        let mut cmd = Command::new(&self.imezzo);
        cmd.arg("server")
            .arg("--export")
            .arg(export)
            .arg("--state")
            .arg(&self.server_state)
            .args(["--listen", "127.0.0.1:0", "--allow", &self.client_id])
            .env_remove("RUST_LOG");
        let mut daemon = Daemon::spawn("imezzo server", &mut cmd, libc::SIGINT, false)?;
        let ready = daemon.wait_line(0, "its ready line", SERVER_READY_WITHIN, |line| {
            line.contains(SERVER_READY)
        })?;
        let (addr, id) = parse_ready(&ready.text)
            .with_context(|| format!("could not parse the server's ready line {:?}", ready.text))?;
        Ok(Server { daemon, addr, id })
    }

    /// Starts `imezzo client --mode replicate` on `root`, without waiting.
    pub fn start_client(&self, server: &Server, root: &Path) -> Result<Daemon> {
        let mut cmd = Command::new(&self.imezzo);
        cmd.arg("client")
            .args(["--server", &server.addr, "--server-id", &server.id])
            .arg("--root")
            .arg(root)
            .arg("--state")
            .arg(&self.client_state)
            .args(["--mode", "replicate"])
            .env_remove("RUST_LOG");
        Daemon::spawn("imezzo client", &mut cmd, libc::SIGINT, false)
    }
}

pub struct Server {
    pub daemon: Daemon,
    pub addr: String,
    pub id: String,
}

/// Waits for the client's first `initial sync done` line.
pub fn wait_initial_sync(client: &mut Daemon, within: Duration) -> Result<super::process::Line> {
    client.wait_line(0, "its initial sync", within, |line| {
        line.contains(INITIAL_SYNC_DONE)
    })
}

/// `imezzo init --state DIR`; the node id is the last line it prints.
fn init(imezzo: &Path, state: &Path) -> Result<String> {
    let out = exec::output(Command::new(imezzo).arg("init").arg("--state").arg(state))?;
    if !out.status.success() {
        bail!(
            "imezzo init --state {} failed ({}): {}",
            state.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
        .with_context(|| format!("imezzo init printed no node id on stdout: {stdout:?}"))
}

/// The address and node id of a ready line.
fn parse_ready(line: &str) -> Option<(String, String)> {
    let rest = &line[line.find(SERVER_READY)? + SERVER_READY.len()..];
    let mut words = rest.split_whitespace();
    let addr = words.next()?;
    let id = match (words.next(), words.next()) {
        (Some("as"), Some(id)) => id,
        _ => return None,
    };
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .filter(|addr| addr.port() != 0)?;
    Some((addr.to_string(), id.to_string()))
}

/// What `imezzo verify` said of two trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Identical,
    /// Every file identical; only these many directories' mtimes differ (rsync sets a
    /// directory's mtime when it copies the directory, and its later temporary files and
    /// renames in it change it again).
    DirectoryTimes(usize),
    /// Anything else: its first lines.
    Differs(String),
}

impl Verdict {
    /// Whether every file is identical.
    pub fn files_identical(&self) -> bool {
        !matches!(self, Verdict::Differs(_))
    }

    pub fn cell(&self) -> String {
        match self {
            Verdict::Identical => "yes".into(),
            Verdict::DirectoryTimes(n) => format!("files yes, {n} directory mtimes differ"),
            Verdict::Differs(_) => "no".into(),
        }
    }
}

/// `imezzo verify A B`, quietly.
pub fn verify(imezzo: &Path, a: &Path, b: &Path) -> Result<Verdict> {
    let out = exec::query(Command::new(imezzo).arg("verify").arg(a).arg(b))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(judge(out.status.success(), &text, |path| {
        a.join(path).is_dir()
    }))
}

/// The verdict of verify's exit and output (`differs: PATH: WHAT`, `only in ...`, `type: ...`
/// lines, then a summary); `is_dir` tells whether a path of the first tree is a directory.
fn judge(success: bool, output: &str, is_dir: impl Fn(&str) -> bool) -> Verdict {
    if success {
        return Verdict::Identical;
    }
    let mut directory_times = 0;
    for line in output.lines() {
        let difference = line.starts_with("differs: ")
            || line.starts_with("only in ")
            || line.starts_with("type: ");
        if !difference {
            continue;
        }
        let directory_time = line
            .strip_prefix("differs: ")
            .and_then(|rest| rest.rsplit_once(": mtime "))
            .is_some_and(|(path, _)| is_dir(path));
        if !directory_time {
            return Verdict::Differs(head(output));
        }
        directory_times += 1;
    }
    if directory_times == 0 {
        // A failure that names no difference: an error of verify itself.
        return Verdict::Differs(head(output));
    }
    Verdict::DirectoryTimes(directory_times)
}

fn head(output: &str) -> String {
    output.lines().take(5).collect::<Vec<_>>().join(" / ")
}

#[cfg(test)]
mod tests {
    use super::{judge, Verdict};

    #[test]
    fn ready_line_gives_address_and_id() {
        let line = "imezzo: server ready: listening on 127.0.0.1:40123 as ab12";
        assert_eq!(
            super::parse_ready(line),
            Some(("127.0.0.1:40123".into(), "ab12".into()))
        );
        assert_eq!(
            super::parse_ready("imezzo: server ready: listening on 127.0.0.1:0 as ab12"),
            None
        );
        assert_eq!(
            super::parse_ready("imezzo: server ready: listening on x"),
            None
        );
    }

    #[test]
    fn only_directory_mtimes_differing_leaves_the_files_identical() {
        let out = "differs: .: mtime 1.000000001 != 1.000000002\n\
                   differs: s9: mtime 1.000000001 != 1.000000002\n\
                   imezzo verify: 2 differences\n";
        let verdict = judge(false, out, |path| path == "." || path == "s9");
        assert_eq!(verdict, Verdict::DirectoryTimes(2));
        assert!(verdict.files_identical());
    }

    #[test]
    fn a_file_mtime_or_content_difference_is_a_difference() {
        let out = "differs: s9/f9: mtime 1.000000001 != 1.000000002\nimezzo verify: 1 difference\n";
        assert!(matches!(
            judge(false, out, |path| path == "s9"),
            Verdict::Differs(_)
        ));
        let out = "differs: .: mtime 1.1 != 1.2\ndiffers: s9/f9: content from byte 0\n";
        assert!(matches!(
            judge(false, out, |path| path == "."),
            Verdict::Differs(_)
        ));
        let out = "only in b: s9/x\n";
        assert!(matches!(judge(false, out, |_| true), Verdict::Differs(_)));
    }

    #[test]
    fn a_failing_verify_that_names_no_difference_is_not_identical() {
        let verdict = judge(false, "imezzo: error: cannot open /x\n", |_| true);
        assert_eq!(
            verdict,
            Verdict::Differs("imezzo: error: cannot open /x".into())
        );
        assert_eq!(
            judge(true, "imezzo verify: identical\n", |_| false),
            Verdict::Identical
        );
    }
}
