//! Running external programs. Every command that acts is printed before it runs, and a failure names it.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};

/// Prints `cmd` the way an operator would type it, then runs it with inherited stdio.
pub fn run(cmd: &mut Command) -> Result<()> {
    announce(cmd);
    let status = cmd.status().with_context(|| could_not_start(cmd))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Prints `cmd`, runs it and returns what it printed; the exit status is the caller's to judge.
pub fn output(cmd: &mut Command) -> Result<Output> {
    announce(cmd);
    cmd.output().with_context(|| could_not_start(cmd))
}

/// Runs a read-only check (a version or status query) without printing it, so that a step whose
/// check passes prints one line only.
pub fn query(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| could_not_start(cmd))
}

pub fn announce(cmd: &Command) {
    println!("xtask: $ {}", describe(cmd));
}

fn could_not_start(cmd: &Command) -> String {
    format!("could not start `{}`", cmd.get_program().to_string_lossy())
}

/// The command as a shell line: explicitly set variables, the program, its quoted arguments.
pub fn describe(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        line.push_str(&format!(
            "{}={} ",
            key.to_string_lossy(),
            env_value(key, value)
        ));
    }
    line.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    match cmd.get_current_dir() {
        Some(dir) if env::current_dir().ok().as_deref() != Some(dir) => {
            format!("(cd {} && {line})", quote(dir.as_os_str()))
        }
        _ => line,
    }
}

/// A PATH that only prepends to the inherited one is shown as `prefix:$PATH`.
fn env_value(key: &OsStr, value: &OsStr) -> String {
    if key == "PATH" {
        if let (Some(value), Some(inherited)) = (value.to_str(), env::var_os("PATH")) {
            if let Some(prefix) = value.strip_suffix(&*inherited.to_string_lossy()) {
                return format!("{}$PATH", quote(OsStr::new(prefix)));
            }
        }
    }
    quote(value)
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+%@".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The program `name` from PATH, or from the sbin directories that a non-root PATH often lacks
/// (Debian installs bpftool and fatrace in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails with a message naming `what` unless this process runs as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run this task as root (for example `sudo -E cargo xtask deps`)");
    }
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C reaches every process of the terminal's foreground group: our children stop on their own,
/// and xtask, instead of dying at once, notes it so that it can unmount its scratch file systems
/// first. A caught signal is reset to its default in a child at exec, so children are unaffected.
pub fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn bail_if_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted (Ctrl-C)");
    }
    Ok(())
}
