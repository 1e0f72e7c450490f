//! The peers imezzo is measured against: an rsync daemon on loopback that receives into the
//! replica, fed by a one-shot `rsync -a` (initial sync) or by lsyncd (live), with their config
//! files rendered here.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::process::Daemon;
use crate::exec;

/// The daemon's module, whose path is the replica.
pub const MODULE: &str = "replica";

/// How lsyncd batches events: its own default delay, or none at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LsyncdDelay {
    /// `default.rsync`'s own delay (15 s in lsyncd 2.2), and its other defaults.
    Default,
    /// `delay = 0`: an rsync starts as soon as an event arrives (one at a time).
    Zero,
}

impl LsyncdDelay {
    pub fn label(self) -> &'static str {
        match self {
            LsyncdDelay::Default => "lsyncd (default delay) + rsyncd",
            LsyncdDelay::Zero => "lsyncd (delay = 0) + rsyncd",
        }
    }
}

/// `rsync --daemon` receiving into `module_path` on 127.0.0.1.
pub struct RsyncDaemon {
    pub daemon: Daemon,
    port: u16,
}

impl RsyncDaemon {
    /// Writes its config into `scratch` and starts it; returns once it accepts connections.
    pub fn start(rsync: &Path, module_path: &Path, scratch: &Path) -> Result<RsyncDaemon> {
        let config = scratch.join("rsyncd.conf");
        fs::write(
            &config,
            rsyncd_conf(module_path, &scratch.join("rsyncd.log"))?,
        )
        .with_context(|| format!("could not write {}", config.display()))?;
        let port = free_port()?;
        let mut cmd = Command::new(rsync);
        cmd.args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", config.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1");
        let mut daemon = Daemon::spawn("rsync daemon", &mut cmd, libc::SIGTERM, true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            daemon.check_alive()?;
            exec::bail_if_interrupted()?;
            if Instant::now() > deadline {
                bail!(
                    "the rsync daemon did not accept connections on 127.0.0.1:{port} within 10 s"
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(RsyncDaemon { daemon, port })
    }

    /// The module's URL, as a destination of rsync.
    pub fn url(&self) -> String {
        module_url(self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

fn module_url(port: u16) -> String {
    format!("rsync://127.0.0.1:{port}/{MODULE}/")
}

/// A port that was free a moment ago. The daemon binds it by itself; a race with another
/// program is possible but would fail loudly (the daemon exits).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("could not find a free TCP port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The daemon's configuration: one writable module, written as root so that owners and
/// modes are kept as `rsync -a` sends them.
pub fn rsyncd_conf(module_path: &Path, log: &Path) -> Result<String> {
    let mut text = String::new();
    let _ = writeln!(text, "# written by cargo xtask bench replicate");
    let _ = writeln!(text, "use chroot = no");
    let _ = writeln!(text, "log file = {}", conf_value(log)?);
    let _ = writeln!(text, "[{MODULE}]");
    let _ = writeln!(text, "    path = {}", conf_value(module_path)?);
    let _ = writeln!(text, "    read only = false");
    let _ = writeln!(text, "    uid = root");
    let _ = writeln!(text, "    gid = root");
    Ok(text)
}

/// rsyncd.conf takes a value to the end of its line, unquoted.
fn conf_value(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if text.contains(['\n', '\r']) || text.trim() != text {
        bail!("{text:?} cannot be written in rsyncd.conf (a line break or edge spaces)");
    }
    Ok(text.to_string())
}

/// lsyncd's configuration: `default.rsync` from `source` to the daemon's module, with
/// `archive = true` (rsync -a's attributes), in the foreground. `--modify-window=-1` makes
/// rsync compare mtimes to the nanosecond: by default its quick check compares whole seconds,
/// so a rewrite of the same size within the second of the previous copy is skipped and
/// never arrives, and the lag rows would measure that loss rather than the lag. `extra`: more
/// options of its rsync, after that one.
pub fn lsyncd_conf(
    source: &Path,
    port: u16,
    delay: LsyncdDelay,
    extra: &[&str],
    log: &Path,
) -> Result<String> {
    let mut text = String::new();
    let _ = writeln!(text, "-- written by cargo xtask bench replicate");
    let _ = writeln!(text, "settings {{");
    let _ = writeln!(text, "    nodaemon = true,");
    let _ = writeln!(text, "    logfile = {},", lua_string(log)?);
    let _ = writeln!(text, "}}");
    let _ = writeln!(text, "sync {{");
    let _ = writeln!(text, "    default.rsync,");
    let _ = writeln!(text, "    source = {},", lua_string(source)?);
    let _ = writeln!(text, "    target = \"{}\",", module_url(port));
    if delay == LsyncdDelay::Zero {
        let _ = writeln!(text, "    delay = 0,");
    }
    let mut options = vec!["\"--modify-window=-1\"".to_string()];
    for option in extra {
        if option.contains(['"', '\\', '\n']) {
            bail!("{option:?} cannot be written as an rsync option in lsyncd's config");
        }
        options.push(format!("\"{option}\""));
    }
    let _ = writeln!(
        text,
        "    rsync = {{ archive = true, _extra = {{ {} }} }},",
        options.join(", ")
    );
    let _ = writeln!(text, "}}");
    Ok(text)
}

/// A Lua string literal of a path.
fn lua_string(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    let mut quoted = String::from('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\n' => quoted.push_str("\\n"),
            c if c.is_control() => bail!("{text:?} holds a control character"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Ok(quoted)
}

/// The line lsyncd prints once its start-up rsync of the whole source has finished.
const LSYNCD_STARTED: &str = "Startup of ";

/// Starts lsyncd from `source` to the daemon on `port` (its rsync with the `extra` options)
/// and waits until its start-up rsync has finished, so that it then only follows changes.
pub fn start_lsyncd(
    lsyncd: &Path,
    source: &Path,
    port: u16,
    delay: LsyncdDelay,
    extra: &[&str],
    scratch: &Path,
) -> Result<Daemon> {
    let config: PathBuf = scratch.join("lsyncd.lua");
    fs::write(
        &config,
        lsyncd_conf(source, port, delay, extra, &scratch.join("lsyncd.log"))?,
    )
    .with_context(|| format!("could not write {}", config.display()))?;
    let mut cmd = Command::new(lsyncd);
    cmd.arg(&config);
    let mut daemon = Daemon::spawn("lsyncd", &mut cmd, libc::SIGTERM, true)?;
    daemon.wait_line(
        0,
        "the end of its start-up rsync",
        Duration::from_secs(300),
        |line| line.contains(LSYNCD_STARTED) && line.contains("finished"),
    )?;
    Ok(daemon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsyncd_conf_has_one_writable_module_run_as_root() {
        let conf = rsyncd_conf(Path::new("/tmp/r x"), Path::new("/tmp/s/rsyncd.log")).unwrap();
        assert_eq!(
            conf,
            "# written by cargo xtask bench replicate\n\
             use chroot = no\n\
             log file = /tmp/s/rsyncd.log\n\
             [replica]\n\
             \x20   path = /tmp/r x\n\
             \x20   read only = false\n\
             \x20   uid = root\n\
             \x20   gid = root\n"
        );
    }

    #[test]
    fn rsyncd_conf_refuses_a_path_with_a_line_break() {
        assert!(rsyncd_conf(Path::new("/tmp/a\n[evil]"), Path::new("/tmp/l")).is_err());
    }

    #[test]
    fn lsyncd_conf_sets_delay_zero_only_when_asked() {
        let zero = lsyncd_conf(
            Path::new("/tmp/src"),
            8730,
            LsyncdDelay::Zero,
            &[],
            Path::new("/tmp/l.log"),
        )
        .unwrap();
        assert_eq!(
            zero,
            "-- written by cargo xtask bench replicate\n\
             settings {\n\
             \x20   nodaemon = true,\n\
             \x20   logfile = \"/tmp/l.log\",\n\
             }\n\
             sync {\n\
             \x20   default.rsync,\n\
             \x20   source = \"/tmp/src\",\n\
             \x20   target = \"rsync://127.0.0.1:8730/replica/\",\n\
             \x20   delay = 0,\n\
             \x20   rsync = { archive = true, _extra = { \"--modify-window=-1\" } },\n\
             }\n"
        );
        let default = lsyncd_conf(
            Path::new("/tmp/src"),
            8730,
            LsyncdDelay::Default,
            &[],
            Path::new("/tmp/l.log"),
        )
        .unwrap();
        assert!(!default.contains("delay"));
    }

    #[test]
    fn lsyncd_conf_appends_extra_rsync_options() {
        let conf = lsyncd_conf(
            Path::new("/tmp/src"),
            8730,
            LsyncdDelay::Zero,
            &["--inplace", "--no-whole-file"],
            Path::new("/tmp/l.log"),
        )
        .unwrap();
        assert!(conf.contains(
            "    rsync = { archive = true, _extra = { \"--modify-window=-1\", \"--inplace\", \"--no-whole-file\" } },\n"
        ));
        assert!(lsyncd_conf(
            Path::new("/tmp/src"),
            8730,
            LsyncdDelay::Zero,
            &["--x\" }"],
            Path::new("/tmp/l.log"),
        )
        .is_err());
    }

    #[test]
    fn lua_strings_escape_quotes_and_backslashes() {
        assert_eq!(
            lua_string(Path::new("/tmp/a\"b\\c")).unwrap(),
            "\"/tmp/a\\\"b\\\\c\""
        );
        assert!(lua_string(Path::new("/tmp/a\u{1}")).is_err());
    }
}
