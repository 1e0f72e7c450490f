//! `imezzo demo`: a server and a replication client on loopback, over two temporary tmpfs
//! mounts, a generated tree, then live changes with the lag of each replicated operation.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use imezzo_agent::{
    client::{self, ClientEvent},
    config::{ClientOptions, Mode, ServerOptions},
    identity::Identity,
    op::{JournalEntry, Op},
    server::Server,
    verify::{self, VerifyOptions},
};
use tokio::sync::{mpsc, oneshot};

/// Watch imezzo replicate: a server and a client on loopback, live changes, and the lag.
///
/// Mounts two tmpfs under /tmp (the export and the replica, removed at the end), generates a
/// tree of FILES files, starts a server and a replication client in this process, waits for
/// the initial sync, then has a separate process change the export every INTERVAL_MS
/// (writes, renames, chmods, mkdirs, unlinks...). Each operation the client replays is
/// printed with its lag: the time from the change on the server to its replay on the
/// client. Runs until Ctrl-C, or for --duration seconds; then prints a summary and the
/// result of `imezzo verify` on the two trees (exit status 1 if they differ).
///
/// Needs root: it mounts tmpfs and the server loads eBPF probes.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop after this many seconds of live changes (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Files in the generated tree.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub files: usize,
    /// Milliseconds between live changes.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub interval_ms: u64,
}

/// Directories of one demo run: two tmpfs mounts and two state dirs, removed on drop.
struct DemoDirs {
    base: PathBuf,
    export: PathBuf,
    replica: PathBuf,
    server_state: PathBuf,
    client_state: PathBuf,
    mounted: Vec<PathBuf>,
}

impl DemoDirs {
    fn create() -> anyhow::Result<DemoDirs> {
        let base = std::env::temp_dir().join(format!("imezzo-demo-{}", std::process::id()));
        fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        let mut dirs = DemoDirs {
            export: base.join("export"),
            replica: base.join("replica"),
            server_state: base.join("server-state"),
            client_state: base.join("client-state"),
            base,
            mounted: Vec::new(),
        };
        for d in [&dirs.export, &dirs.replica, &dirs.server_state, &dirs.client_state] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        for d in [dirs.export.clone(), dirs.replica.clone()] {
            mount_tmpfs(&d)?;
            dirs.mounted.push(d);
        }
        Ok(dirs)
    }
}

impl Drop for DemoDirs {
    fn drop(&mut self) {
        for d in &self.mounted {
            if let Ok(c) = CString::new(d.as_os_str().as_bytes()) {
                // SAFETY: a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn mount_tmpfs(dir: &Path) -> anyhow::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).context("a mount point with a NUL byte")?;
    // SAFETY: valid C strings.
    let r =
        unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, c"size=512m".as_ptr().cast()) };
    if r != 0 {
        bail!("cannot mount a tmpfs on {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tiny deterministic generator: the demo's tree and changes need variety, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = ["inter", "mezzo", "journal", "replica", "kernel", "probe", "quic", "rename"];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(WORDS.len())].as_bytes());
            out.push(if self.below(12) == 0 { b'\n' } else { b' ' });
        }
        out.truncate(len);
        out
    }
}

/// The generated tree: returns its files and directories (relative paths).
fn generate(root: &Path, files: usize, rng: &mut Rng) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut dirs = Vec::new();
    for d in 0..8 {
        dirs.push(format!("d{d}"));
        if d % 2 == 0 {
            dirs.push(format!("d{d}/sub"));
        }
    }
    for d in &dirs {
        fs::create_dir_all(root.join(d)).with_context(|| format!("cannot create {d} in the export"))?;
    }
    let mut names = Vec::new();
    for i in 0..files {
        let name = format!("{}/f{i:04}.txt", dirs[rng.below(dirs.len())]);
        let len = 64 + rng.below(8192);
        fs::write(root.join(&name), rng.text(len)).with_context(|| format!("cannot write {name} in the export"))?;
        names.push(name);
    }
    // A few of the kinds a plain copy gets wrong.
    if names.len() >= 2 {
        let _ = fs::hard_link(root.join(&names[0]), root.join("d0/hardlink-to-first"));
        let _ = std::os::unix::fs::symlink(format!("../{}", names[1]), root.join("d1/symlink-to-second"));
    }
    Ok((names, dirs))
}

// ---- the writer process -------------------------------------------------------------------

/// The process that changes the export. It must be another process: capture ignores the
/// agent's own changes (a replay must never come back as a change).
struct Writer {
    pid: libc::pid_t,
    commands: File,
    reports: File,
}

fn pipe() -> anyhow::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from the kernel.
    unsafe { Ok((File::from(OwnedFd::from_raw_fd(fds[0])), File::from(OwnedFd::from_raw_fd(fds[1])))) }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Writer {
    /// Forks the writer. Call it before any thread exists: the child carries on with a copy
    /// of this single-threaded process.
    fn fork(root: &Path, files: Vec<String>, dirs: Vec<String>, interval: Duration) -> anyhow::Result<Writer> {
        let (cmd_r, cmd_w) = pipe()?;
        let (rep_r, rep_w) = pipe()?;
        // SAFETY: the process is single-threaded here (no runtime, no capture yet).
        match unsafe { libc::fork() } {
            -1 => bail!("cannot fork the writer process: {}", std::io::Error::last_os_error()),
            0 => {
                drop(cmd_w);
                drop(rep_r);
                // The writer must not outlive the demo.
                // SAFETY: prctl with plain integer arguments.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                let root = root.to_path_buf();
                let code = std::panic::catch_unwind(move || writer_main(&root, files, dirs, interval, cmd_r, rep_w))
                    .map_or(2, |()| 0);
                // SAFETY: leaving the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            pid => Ok(Writer { pid, commands: cmd_w, reports: rep_r }),
        }
    }

    fn stop(mut self) {
        let _ = self.commands.write_all(b"q");
        drop(self.commands);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

fn writer_main(
    root: &Path,
    mut files: Vec<String>,
    mut dirs: Vec<String>,
    interval: Duration,
    mut cmd: File,
    mut rep: File,
) {
    let mut go = [0u8; 1];
    if cmd.read(&mut go).unwrap_or(0) == 0 || go[0] != b'g' {
        return;
    }
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&cmd), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut rng = Rng(0x1ce_b00c_5eed);
    let mut n = 0usize;
    loop {
        std::thread::sleep(interval);
        match cmd.read(&mut go) {
            Ok(_) => return, // 'q', or the demo went away
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        n += 1;
        let p = |rel: &str| root.join(rel);
        // Taken before the change: the lag runs from it. A time taken after could reach the
        // demo after the replayed operation did, which was then measured from the path's
        // previous change (a chmod "lagged" 22 s behind the file's create).
        let at = monotonic_ns();
        let pick = rng.below(100);
        let change: Option<String> = if files.len() < 20 || (pick < 12) {
            let name = format!("{}/new{n:05}.txt", dirs[rng.below(dirs.len())]);
            let len = 32 + rng.below(4096);
            fs::write(p(&name), rng.text(len)).ok().map(|()| {
                files.push(name.clone());
                format!("create {name}")
            })
        } else if pick < 40 {
            let name = files[rng.below(files.len())].clone();
            let len = 32 + rng.below(16384);
            fs::write(p(&name), rng.text(len)).ok().map(|()| format!("write {name}"))
        } else if pick < 52 {
            let name = files[rng.below(files.len())].clone();
            let line = rng.text(80);
            fs::OpenOptions::new()
                .append(true)
                .open(p(&name))
                .and_then(|mut f| f.write_all(&line))
                .ok()
                .map(|()| format!("append {name}"))
        } else if pick < 68 {
            let i = rng.below(files.len());
            let from = files[i].clone();
            let to = format!("{}/moved{n:05}.txt", dirs[rng.below(dirs.len())]);
            fs::rename(p(&from), p(&to)).ok().map(|()| {
                files[i] = to.clone();
                format!("rename {from} {to}")
            })
        } else if pick < 78 {
            let name = files[rng.below(files.len())].clone();
            let mode = [0o600, 0o640, 0o644, 0o664][rng.below(4)];
            fs::set_permissions(p(&name), fs::Permissions::from_mode(mode)).ok().map(|()| format!("chmod {name}"))
        } else if pick < 84 && dirs.len() < 40 {
            let name = format!("{}/dir{n:05}", dirs[rng.below(dirs.len())]);
            fs::create_dir(p(&name)).ok().map(|()| {
                dirs.push(name.clone());
                format!("mkdir {name}")
            })
        } else if pick < 96 {
            let name = files.swap_remove(rng.below(files.len()));
            fs::remove_file(p(&name)).ok().map(|()| format!("unlink {name}"))
        } else {
            let name = format!("{}/link{n:05}", dirs[rng.below(dirs.len())]);
            std::os::unix::fs::symlink("target-of-a-link", p(&name)).ok().map(|()| format!("symlink {name}"))
        };
        if let Some(change) = change {
            if writeln!(rep, "{at} {change}").is_err() {
                return;
            }
        }
    }
}

// ---- the demo -----------------------------------------------------------------------------

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo mounts two tmpfs and its server loads eBPF probes: run it as root (sudo imezzo demo)");
    }
    // The library's progress lines would drown the demo's own; RUST_LOG brings them back.
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let dirs = DemoDirs::create()?;
    let mut rng = Rng(0x5eed_1234_abcd);
    let started = Instant::now();
    let (files, subdirs) = generate(&dirs.export, args.files, &mut rng)?;
    println!(
        "imezzo demo: generated {} files in {} directories under {} (tmpfs) in {:.0?}",
        files.len(),
        subdirs.len(),
        dirs.export.display(),
        started.elapsed()
    );
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let writer = Writer::fork(&dirs.export, files, subdirs, interval)?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let outcome = rt.block_on(demo(&dirs, writer, &args));
    drop(rt);
    outcome
}

/// One line of the writer's report: when, and which paths it touched.
struct Change {
    at_ns: u64,
    paths: Vec<String>,
}

impl Change {
    /// Notes the change as the latest of each of its paths; counts one change.
    fn record(self, last_change: &mut HashMap<String, u64>) -> u64 {
        for p in self.paths {
            last_change.insert(p, self.at_ns);
        }
        1
    }
}

fn parse_report(line: &str) -> Option<Change> {
    let mut parts = line.split(' ');
    let at_ns = parts.next()?.parse().ok()?;
    let _kind = parts.next()?;
    Some(Change { at_ns, paths: parts.map(str::to_string).collect() })
}

fn op_paths(op: &Op) -> Vec<String> {
    let mut v = vec![op.path().display().into_owned()];
    if let Op::Rename { new_path, .. } | Op::Link { new_path, .. } = op {
        v.push(new_path.display().into_owned());
    }
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn demo(dirs: &DemoDirs, writer: Writer, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let server_id = Identity::create(&dirs.server_state)?;
    let client_id = Identity::create(&dirs.client_state)?;
    let server = Server::start(&ServerOptions {
        export: dirs.export.clone(),
        state: dirs.server_state.clone(),
        listen: "127.0.0.1:0".parse()?,
        allow: vec![client_id.id],
        retain_bytes: 64 << 20,
    })
    .await?;
    let addr = server.local_addr();
    let journal = server.journal().clone();
    println!("imezzo demo: server capturing {} and listening on {addr} as {}", dirs.export.display(), server_id.id);
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async {
        let _ = server_stopped.await;
    }));

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let sink: client::EventSink = Arc::new(move |e| {
        let _ = events_tx.send(e);
    });
    let client_opts = ClientOptions {
        server: addr,
        server_id: server_id.id,
        root: dirs.replica.clone(),
        state: dirs.client_state.clone(),
        mode: Mode::Replicate,
    };
    let (stop_client, client_stopped) = oneshot::channel::<()>();
    let client_task = tokio::spawn(async move {
        client::run(&client_opts, sink, async {
            let _ = client_stopped.await;
        })
        .await
    });
    println!("imezzo demo: client replicating into {} (tmpfs)", dirs.replica.display());

    let interrupted = crate::cli::server::terminated();
    tokio::pin!(interrupted);
    let sync_deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(sync_deadline);
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(ClientEvent::InitialSyncDone { seq, stats }) => {
                    println!(
                        "imezzo demo: initial sync done at seq {seq}: {} entries, {} files ({} bytes) in {:.0?}",
                        stats.entries,
                        stats.fetched_files + stats.inlined_files,
                        stats.fetched_bytes + stats.inlined_bytes,
                        stats.elapsed
                    );
                    break;
                }
                Some(_) => {}
                None => bail!("the client stopped before its initial sync: {}", client_error(client_task).await),
            },
            () = &mut sync_deadline => bail!("the initial sync did not finish within two minutes"),
            () = &mut interrupted => {
                let _ = stop_client.send(());
                let _ = stop_server.send(());
                writer.stop();
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    // The writer's reports, from a blocking reader thread.
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let report_pipe = writer.reports.try_clone().context("cannot read the writer's reports")?;
    std::thread::spawn(move || {
        for line in BufReader::new(report_pipe).lines().map_while(Result::ok) {
            if let Some(c) = parse_report(&line) {
                if reports_tx.send(c).is_err() {
                    break;
                }
            }
        }
    });
    let mut writer = Some(writer);
    if let Some(w) = writer.as_mut() {
        w.commands.write_all(b"g").context("cannot start the writer process")?;
    }
    match args.duration {
        Some(s) => println!(
            "imezzo demo: a change every {} ms for {s} s; each replayed operation and its lag:",
            args.interval_ms
        ),
        None => println!(
            "imezzo demo: a change every {} ms until Ctrl-C; each replayed operation and its lag:",
            args.interval_ms
        ),
    }
    let until = args.duration.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut last_change: HashMap<String, u64> = HashMap::new();
    let mut lags: Vec<f64> = Vec::new();
    let mut changes = 0u64;
    let mut applied = 0u64;
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut target: Option<u64> = None;
    // The client says "in sync" once per seq, at most once a second: the last one may have
    // come before the stop, and then none comes after it.
    let mut in_sync: Option<u64> = None;
    loop {
        let end = stopping.or(until).unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            c = reports.recv(), if stopping.is_none() => if let Some(c) = c {
                changes += c.record(&mut last_change);
            },
            e = events.recv() => match e {
                Some(ClientEvent::Applied { seq, op, at }) => {
                    applied += 1;
                    // The report of the change this op replays was sent before capture saw
                    // the change: take whatever has come, so the op is not measured from
                    // an earlier change of its path.
                    if stopping.is_none() {
                        while let Ok(c) = reports.try_recv() {
                            changes += c.record(&mut last_change);
                        }
                    }
                    let at_ns = monotonic_ns().saturating_sub(at.elapsed().as_nanos() as u64);
                    let changed = op_paths(&op).iter().filter_map(|p| last_change.get(p)).max().copied();
                    let line = JournalEntry { seq, op }.to_string();
                    match changed {
                        Some(t) if at_ns >= t => {
                            let lag = (at_ns - t) as f64 / 1e6;
                            lags.push(lag);
                            println!("{line:<72} lag {lag:>6.1} ms");
                        }
                        _ => println!("{line}"),
                    }
                }
                Some(ClientEvent::InSync { seq }) => {
                    in_sync = Some(seq);
                    if target.is_some_and(|t| seq >= t) {
                        break;
                    }
                }
                Some(ClientEvent::Disconnected { reason }) => println!("imezzo demo: client disconnected: {reason}"),
                Some(_) => {}
                None => bail!("the client stopped: {}", client_error(client_task).await),
            },
            () = tokio::time::sleep_until(end), if stopping.is_some() || until.is_some() => {
                if stopping.is_some() {
                    println!("imezzo demo: the client did not catch up within 15 s");
                    break;
                }
                stopping = Some(tokio::time::Instant::now() + Duration::from_secs(15));
            }
            () = &mut interrupted, if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + Duration::from_secs(15));
            }
        }
        if stopping.is_some() && target.is_none() {
            // Stop changing, let capture journal the last change, then wait for the client
            // to be in sync with the journal's end.
            if let Some(w) = writer.take() {
                tokio::task::spawn_blocking(move || w.stop()).await.ok();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = journal.last_seq();
            target = Some(t);
            println!("imezzo demo: changes stopped; waiting for the client to reach seq {t}");
            if in_sync.is_some_and(|s| s >= t) {
                break;
            }
        }
    }
    let _ = stop_client.send(());
    let client_result = client_task.await;
    let _ = stop_server.send(());
    let server_result = server_task.await;
    if let Ok(Err(e)) = client_result {
        println!("imezzo demo: the client ended with an error: {e}");
    }
    if let Ok(Err(e)) = server_result {
        println!("imezzo demo: the server ended with an error: {e}");
    }

    lags.sort_by(f64::total_cmp);
    println!(
        "imezzo demo: {changes} changes made, {applied} operations replayed; lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} measured)",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(0.0),
        lags.len()
    );
    let opts = VerifyOptions::default();
    let comparison = verify::compare_trees(&dirs.export, &dirs.replica, &opts)?;
    for d in comparison.differences.iter().take(20) {
        println!("{d}");
    }
    Ok(match comparison.differences.len() {
        0 => {
            println!("imezzo verify: identical ({} entries)", comparison.entries);
            ExitCode::SUCCESS
        }
        n => {
            println!("imezzo verify: {n} differences");
            ExitCode::FAILURE
        }
    })
}

async fn client_error(task: tokio::task::JoinHandle<Result<(), client::ClientError>>) -> String {
    match task.await {
        Ok(Ok(())) => "it stopped".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}
