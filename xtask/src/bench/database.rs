//! `cargo xtask bench database`: what replicating a live PostgreSQL database costs it, and how
//! soon after its shutdown the replica is identical (issue 10's pgbench target).
//!
//! Every run gets a fresh loop-mounted ext4 image holding a fresh cluster, initialised by
//! `pgbench -i`; then nothing, imezzo (the server on the image's mount, the client into a tmpfs)
//! or lsyncd with `delay = 0` and an rsync daemon follows it while `pgbench` runs; then the
//! cluster is shut down and the bench waits for the replica to be identical. Two more watchers
//! replicate nothing and split imezzo's cost: `imezzo capture --empty-probe` (the floor of any
//! eBPF capture: a program call at every syscall's exit) and `imezzo capture --json` (the
//! probes and the capture agent, no journal, no client). Every round runs
//! every watcher once, in an order rotated from round to round, and a ratio is taken against
//! the unwatched run of the same round, so that drift of the machine during the bench cancels
//! out. PostgreSQL refuses to run as root: its server programs run as the `postgres` user
//! (`runuser`), its clients as root over the cluster's unix socket.

use std::{
    fmt::Write as _,
    fs::{self, File},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{value_parser, Args};

use super::{
    median, watcher,
    replicate::{
        self, agents::Verdict, peers::LsyncdDelay, process, scratch::ScratchDir, trees::Snapshot,
        Cost, Follower, Programs, Tool,
    },
};
use crate::{
    exec,
    tmpfs::{self, TmpfsDir},
};

#[derive(Args)]
pub struct DatabaseArgs {
    /// Seconds of each pgbench run (`pgbench -T`).
    #[arg(long, default_value_t = 20, value_parser = value_parser!(u64).range(1..))]
    seconds: u64,
    /// pgbench's scale factor (`pgbench -i -s`): 100 000 accounts a unit, about 32 MB of the
    /// data directory.
    #[arg(long, default_value_t = 10, value_parser = value_parser!(u64).range(1..))]
    scale: u64,
    /// pgbench's clients (`-c`).
    #[arg(long, default_value_t = 4, value_parser = value_parser!(u64).range(1..))]
    clients: u64,
    /// pgbench's threads (`-j`).
    #[arg(long, default_value_t = 2, value_parser = value_parser!(u64).range(1..))]
    jobs: u64,
    /// Rounds; each runs pgbench unwatched, under the empty probe, under imezzo's capture alone,
    /// under imezzo and under lsyncd, in an order rotated from round to round (five take about
    /// 17 minutes on 2 cores).
    #[arg(long, default_value_t = 5, value_parser = value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds the replica may take to become identical after the shutdown before the run
    /// says "never".
    #[arg(long, default_value_t = 60, value_parser = value_parser!(u64).range(1..))]
    deadline: u64,
    /// Size of the sparse ext4 image holding the data directory, in GiB.
    #[arg(long, default_value_t = 2, value_parser = value_parser!(u64).range(1..))]
    image_gib: u64,
}

/// The issue-10 target: the share of its unwatched throughput pgbench keeps under imezzo...
const TARGET_RATIO: f64 = 0.95;
/// ...and how soon after the database's shutdown the replica must be identical.
const TARGET_IDENTICAL: Duration = Duration::from_secs(1);

/// The user PostgreSQL's server programs run as, which the Debian packages create.
const PG_USER: &str = "postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watcher {
    Nothing,
    /// Capture alone on the export, replicating nothing: what the probes and the capture
    /// agent cost the database, apart from the journal and the client.
    Capture(Probe),
    Follow(Tool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// `imezzo capture --empty-probe`: the floor of any eBPF capture.
    Empty,
    /// `imezzo capture --json`, its output thrown away.
    Imezzo,
}

impl Watcher {
    const ALL: [Watcher; 5] = [
        Watcher::Nothing,
        Watcher::Capture(Probe::Empty),
        Watcher::Capture(Probe::Imezzo),
        Watcher::Follow(Tool::Imezzo),
        Watcher::Follow(Tool::Lsyncd(LsyncdDelay::Zero)),
    ];

    fn label(self) -> &'static str {
        match self {
            Watcher::Nothing => "nothing watching",
            Watcher::Capture(Probe::Empty) => "empty probe on sys_exit (floor; replicates nothing)",
            Watcher::Capture(Probe::Imezzo) => "imezzo capture --json (probes and capture; replicates nothing)",
            Watcher::Follow(tool) => tool.label(),
        }
    }
}

/// One pgbench run under one watcher.
struct Run {
    round: u32,
    /// Its place in the round, from 1.
    order: usize,
    watcher: Watcher,
    result: Result<Sample, String>,
}

struct Sample {
    tps: f64,
    /// Seconds `pg_ctl stop -m fast` took.
    shutdown: f64,
    /// What the watcher did, when there was one that replicates.
    followed: Option<Followed>,
    /// CPU seconds of a capture watcher's process over the pgbench run (its probes run in
    /// PostgreSQL's processes and count there).
    capture_cpu: Option<f64>,
}

struct Followed {
    /// Ok((seconds from the shutdown's return to the poll at which every file matched, to
    /// `imezzo verify` confirming it, its verdict)), or Err(what verify said last) when the
    /// replica was not identical within the deadline.
    caught_up: Result<(f64, f64, Verdict), String>,
    /// CPU over the pgbench run; peak RSS over the watcher's life.
    source: Cost,
    replica: Cost,
    /// PostgreSQL started on a copy of the replica, when asked: what it found.
    replica_check: Option<Result<String, String>>,
    /// Lines of the watcher's output that mention an error or a warning.
    complaints: Vec<String>,
    /// The files the poll after the shutdown found missing or behind on the replica, in
    /// turn, each with the last time (seconds after the shutdown) it was.
    waited: Vec<(String, f64)>,
}

pub fn run(imezzo: &Path, args: &DatabaseArgs) -> Result<String> {
    let programs = Programs::find(imezzo)?;
    // The capture watchers run imezzo alone; the other two programs are the capture bench's.
    let capture = watcher::Programs {
        imezzo: imezzo.to_path_buf(),
        inotifywait: PathBuf::new(),
        fatrace: PathBuf::new(),
    };
    let pg = Postgres::find()?;
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for turn in 0..Watcher::ALL.len() {
            let watcher = Watcher::ALL[(turn + round as usize) % Watcher::ALL.len()];
            let check = watcher == Watcher::Follow(Tool::Imezzo) && round + 1 == args.rounds;
            let label = format!(
                "round {} of {}, {}",
                round + 1,
                args.rounds,
                watcher.label()
            );
            progress(&format!("{label}..."));
            let result =
                replicate::attempt(&label, || {
                    run_once(&programs, &capture, &pg, args, watcher, check)
                })?;
            if let Ok(sample) = &result {
                progress(&format!("{label}: {}", sample.summary()));
            }
            runs.push(Run {
                round,
                order: turn + 1,
                watcher,
                result,
            });
        }
    }
    Ok(render(args, &pg, &runs))
}

fn progress(text: &str) {
    println!("xtask: bench database: {text}");
}

impl Sample {
    fn summary(&self) -> String {
        let mut text = format!("{:.0} tps, shutdown {:.3} s", self.tps, self.shutdown);
        if let Some(followed) = &self.followed {
            match &followed.caught_up {
                Ok((matched, confirmed, verdict)) => {
                    let _ = write!(
                        text,
                        ", identical {matched:.3} s after the shutdown (verify done after {confirmed:.3} s, {})",
                        verdict.cell()
                    );
                    if !followed.waited.is_empty() {
                        let _ = write!(text, ", waited on {}", waited_text(&followed.waited));
                    }
                }
                Err(last) => {
                    let _ = write!(text, ", never identical: {last}");
                }
            }
            if let Some(check) = &followed.replica_check {
                let _ = write!(
                    text,
                    "; PostgreSQL on the replica: {}",
                    check.as_ref().unwrap_or_else(|err| err)
                );
            }
        }
        text
    }
}

/// One run: a fresh image and cluster, `pgbench -i`, the watcher, `pgbench -T`, the shutdown,
/// and the wait for the replica.
fn run_once(
    programs: &Programs,
    capture: &watcher::Programs,
    pg: &Postgres,
    args: &DatabaseArgs,
    watcher: Watcher,
    check_replica: bool,
) -> Result<Sample> {
    // Declared first, unmounted last, once every process using them has stopped.
    let image = Ext4Image::create(args.image_gib)?;
    let export = image.path();
    let replica = match watcher {
        Watcher::Nothing | Watcher::Capture(_) => None,
        Watcher::Follow(_) => Some(TmpfsDir::mount("imezzo-bench-replica")?),
    };
    let mut cluster = Cluster::init(pg, &export.join("pgdata"))?;
    cluster.start()?;
    let init = exec::output(cluster.client("pgbench").args([
        "-i",
        "-s",
        &args.scale.to_string(),
        "postgres",
    ]))?;
    check_output("pgbench -i", &init)?;
    // Every run starts from the same clean state: no dirty buffers left by the initialisation.
    cluster.sql("CHECKPOINT")?;

    let mut follower = match (watcher, &replica) {
        (Watcher::Follow(tool), Some(replica)) => {
            Some(Follower::start(programs, tool, &export, replica.path())?)
        }
        _ => None,
    };
    let mut capturing = match watcher {
        Watcher::Capture(probe) => {
            let kind = match probe {
                Probe::Empty => watcher::Watcher::EmptyProbe,
                Probe::Imezzo => watcher::Watcher::Imezzo,
            };
            watcher::start(kind, capture, &export)?
        }
        _ => None,
    };
    let capture_cpu_before = capturing
        .as_ref()
        .and_then(|c| process::proc_cpu_seconds(c.pid() as libc::pid_t));
    let cpu_before = follower.as_mut().map(Follower::cpu);
    let mut pgbench = cluster.client("pgbench");
    pgbench
        .args(["-c", &args.clients.to_string()])
        .args(["-j", &args.jobs.to_string()])
        .args(["-T", &args.seconds.to_string()])
        .arg("postgres");
    let bench = process::run_measured(&mut pgbench)?;
    let cpu_after = follower.as_mut().map(Follower::cpu);
    let capture_cpu = capturing.as_ref().and_then(|c| {
        Some((process::proc_cpu_seconds(c.pid() as libc::pid_t)? - capture_cpu_before?).max(0.0))
    });
    if let Some(running) = capturing.as_mut() {
        let seen = running.stop()?;
        if let Some(drops) = seen.drops.filter(|d| *d > 0) {
            bail!("imezzo capture lost {drops} events");
        }
    }
    if !bench.success {
        bail!(
            "pgbench failed ({}): {}",
            bench.status,
            last_lines(&bench.output, 5)
        );
    }
    let tps = parse_tps(&bench.output)
        .with_context(|| format!("no tps line in pgbench's output: {}", bench.output.trim()))?;
    if let Some(follower) = follower.as_mut() {
        follower.check_alive()?;
    }
    let stopping = Instant::now();
    cluster.stop()?;
    let stopped = Instant::now();
    let shutdown = stopped.duration_since(stopping).as_secs_f64();

    let (Some(mut follower), Some(replica), Some(before), Some(after)) =
        (follower, replica, cpu_before, cpu_after)
    else {
        return Ok(Sample {
            tps,
            shutdown,
            followed: None,
            capture_cpu,
        });
    };
    let snapshot = Snapshot::take(&export)?;
    let mut waited: Vec<(String, f64)> = Vec::new();
    let caught_up = replicate::wait_identical(
        &programs.imezzo,
        &export,
        replica.path(),
        &snapshot,
        Duration::from_secs(args.deadline),
        || follower.check_alive(),
        |path| {
            let at = stopped.elapsed().as_secs_f64();
            match waited.last_mut() {
                Some((last, until)) if Path::new(last.as_str()) == path => *until = at,
                _ => waited.push((path.display().to_string(), at)),
            }
        },
    )?;
    let confirmed = stopped.elapsed();
    let complaints = follower.complaints();
    for line in &complaints {
        progress(&format!("the watcher said: {line}"));
    }
    let (mut source, mut replica_cost) = follower.stop(before)?;
    let window = |before: Option<f64>, after: Option<f64>| Some((after? - before?).max(0.0));
    source.cpu = window(before.0, after.0);
    replica_cost.cpu = window(before.1, after.1);
    let caught_up = caught_up.map(|(matched, verdict)| {
        (
            matched.saturating_duration_since(stopped).as_secs_f64(),
            confirmed.as_secs_f64(),
            verdict,
        )
    });
    let replica_check = (check_replica && caught_up.is_ok()).then(|| {
        check_replica_copy(pg, &replica.path().join("pgdata"), args.scale)
            .map_err(|err| format!("{err:#}").lines().next().unwrap_or("").to_string())
    });
    Ok(Sample {
        tps,
        shutdown,
        followed: Some(Followed {
            caught_up,
            source,
            replica: replica_cost,
            replica_check,
            complaints,
            waited,
        }),
        capture_cpu: None,
    })
}

/// Starts PostgreSQL on a copy of the replica's data directory (in a fresh tmpfs, owned by
/// postgres, its own socket directory), checks every table and index with
/// `pg_amcheck --all --install-missing --heapallindexed` and counts pgbench_accounts.
fn check_replica_copy(pg: &Postgres, data: &Path, scale: u64) -> Result<String> {
    let copy = TmpfsDir::mount("imezzo-bench-pgcopy")?;
    let copied = copy.path().join("pgdata");
    exec::run(Command::new("cp").arg("-a").arg(data).arg(&copied))?;
    chown_postgres(&copied, true)?;
    let mut cluster = Cluster::new(pg, &copied)?;
    cluster.start()?;
    let log = fs::read_to_string(cluster.log()).unwrap_or_default();
    let recovered = log.contains("automatic recovery in progress");
    let amcheck = exec::output(cluster.client("pg_amcheck").args([
        "--all",
        "--install-missing",
        "--heapallindexed",
    ]))?;
    let accounts = cluster.sql("select count(*) from pgbench_accounts")?;
    cluster.stop()?;
    let amcheck = if amcheck.status.success() {
        "pg_amcheck --all --heapallindexed found nothing".to_string()
    } else {
        format!(
            "pg_amcheck failed ({}): {}",
            amcheck.status,
            last_lines(&String::from_utf8_lossy(&amcheck.stdout), 3)
        )
    };
    let expected = scale * 100_000;
    Ok(format!(
        "started {}; {amcheck}; pgbench_accounts holds {accounts} rows ({})",
        if recovered {
            "after crash recovery"
        } else {
            "without recovery (a clean shutdown's state)"
        },
        if accounts == expected.to_string() {
            format!("{expected} expected: yes")
        } else {
            format!("{expected} expected: NO")
        }
    ))
}

/// The number of `tps = N (without initial connection time)` (PostgreSQL 14 and later) or
/// `tps = N (excluding connections establishing)` (earlier).
fn parse_tps(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("tps = ")?;
        let (number, note) = rest.split_once(' ')?;
        (note.contains("without initial connection") || note.contains("excluding connections"))
            .then(|| number.parse().ok())?
    })
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join(" / ")
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            last_lines(
                &format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                5
            )
        );
    }
    Ok(())
}

/// `chown [-R] postgres:postgres PATH`.
fn chown_postgres(path: &Path, recursive: bool) -> Result<()> {
    let mut cmd = Command::new("chown");
    if recursive {
        cmd.arg("-R");
    }
    exec::run(cmd.arg(format!("{PG_USER}:{PG_USER}")).arg(path))
}

/// PostgreSQL's programs, from the newest /usr/lib/postgresql/VERSION/bin (Debian's layout).
struct Postgres {
    version: u32,
    bin: PathBuf,
    runuser: PathBuf,
}

impl Postgres {
    fn find() -> Result<Postgres> {
        let root = Path::new("/usr/lib/postgresql");
        let newest = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .max_by_key(|(version, _)| *version);
        let (version, bin) = newest.with_context(|| {
            format!(
                "no PostgreSQL under {}/*/bin: install the Debian packages postgresql and postgresql-contrib",
                root.display()
            )
        })?;
        let runuser =
            exec::find_program("runuser").context("runuser (util-linux) is not installed")?;
        Ok(Postgres {
            version,
            bin,
            runuser,
        })
    }

    /// `runuser -u postgres -- BIN/PROGRAM`: the server programs refuse to run as root.
    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new(&self.runuser);
        cmd.args(["-u", PG_USER, "--"]).arg(self.bin.join(program));
        cmd
    }
}

/// A data directory and its server, listening only on a unix socket in a directory of its
/// own (`listen_addresses = ''`: no TCP port to clash with another server), its log beside it.
struct Cluster<'a> {
    pg: &'a Postgres,
    data: PathBuf,
    /// The socket directory and the log, owned by postgres.
    run: ScratchDir,
    running: bool,
}

impl<'a> Cluster<'a> {
    /// A cluster on the existing data directory `data`.
    fn new(pg: &'a Postgres, data: &Path) -> Result<Cluster<'a>> {
        let run = ScratchDir::create("imezzo-bench-pg")?;
        chown_postgres(run.path(), false)?;
        Ok(Cluster {
            pg,
            data: data.to_path_buf(),
            run,
            running: false,
        })
    }

    /// `initdb` into a new directory `data` (trust authentication, no fsync of its files).
    fn init(pg: &'a Postgres, data: &Path) -> Result<Cluster<'a>> {
        fs::create_dir(data).with_context(|| format!("could not create {}", data.display()))?;
        chown_postgres(data, false)?;
        let cluster = Cluster::new(pg, data)?;
        let out = exec::output(
            pg.as_postgres("initdb")
                .arg("-D")
                .arg(data)
                .args(["-U", PG_USER, "-A", "trust", "-E", "UTF8", "--locale=C"])
                .arg("--no-sync"),
        )?;
        check_output("initdb", &out)?;
        Ok(cluster)
    }

    fn log(&self) -> PathBuf {
        self.run.path().join("postgres.log")
    }

    fn start(&mut self) -> Result<()> {
        let options = format!("-c listen_addresses='' -k {}", self.run.path().display());
        let out = exec::output(
            self.pg
                .as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.log())
                .args(["-w", "-o", &options, "start"]),
        )?;
        if !out.status.success() {
            let log = fs::read_to_string(self.log()).unwrap_or_default();
            bail!(
                "pg_ctl start failed ({}); the server's log: {}",
                out.status,
                last_lines(&log, 5)
            );
        }
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m fast`, which returns once the server has exited.
    fn stop(&mut self) -> Result<()> {
        let out = exec::output(
            self.pg
                .as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"]),
        )?;
        check_output("pg_ctl stop", &out)?;
        self.running = false;
        Ok(())
    }

    /// A client program of BIN, run as root, connected to this server's socket as postgres.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.pg.bin.join(program));
        cmd.arg("-h").arg(self.run.path()).args(["-U", PG_USER]);
        cmd
    }

    /// One SQL statement in the postgres database; its output, unaligned.
    fn sql(&self, statement: &str) -> Result<String> {
        let out = exec::output(self.client("psql").args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-c",
            statement,
        ]))?;
        check_output(&format!("psql -c {statement:?}"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Cluster<'_> {
    /// A server left running by an error or Ctrl-C must not keep the image busy.
    fn drop(&mut self) {
        if self.running {
            let _ = exec::query(
                self.pg
                    .as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-m", "immediate", "-w", "stop"]),
            );
        }
    }
}

/// A sparse file under /tmp holding a fresh ext4, loop-mounted: a disk-backed file system
/// such as a database lives on. Unmounted and removed when dropped.
struct Ext4Image {
    dir: PathBuf,
    mounted: bool,
}

impl Ext4Image {
    fn create(gib: u64) -> Result<Ext4Image> {
        let mut image = Ext4Image {
            dir: tmpfs::make_temp_dir("imezzo-bench-db")?,
            mounted: false,
        };
        // mkdtemp makes it 0700; the postgres user must reach the mount inside.
        fs::set_permissions(&image.dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("could not open up {}", image.dir.display()))?;
        let file = image.dir.join("ext4.img");
        File::create(&file)
            .and_then(|f| f.set_len(gib << 30))
            .with_context(|| format!("could not create {}", file.display()))?;
        let mnt = image.path();
        fs::create_dir(&mnt).with_context(|| format!("could not create {}", mnt.display()))?;
        let mkfs = exec::find_program("mkfs.ext4")
            .context("mkfs.ext4 is not installed: run `cargo xtask deps` (as root)")?;
        // Initialised whole now: lazily, ext4 would zero its inode tables and journal in the
        // background after the mount, under the first runs of pgbench and not the later ones.
        exec::run(
            Command::new(mkfs)
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&file),
        )?;
        exec::run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&file)
                .arg(&mnt),
        )?;
        image.mounted = true;
        Ok(image)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("mnt")
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        if self.mounted {
            // The loop device of `mount -o loop` is released with the unmount.
            if let Err(err) = exec::run(Command::new("umount").arg(self.path())) {
                eprintln!(
                    "xtask: warning: {err:#}; {} is left mounted, unmount it by hand",
                    self.path().display()
                );
                return;
            }
        }
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "xtask: warning: could not remove {}: {err}",
                self.dir.display()
            );
        }
    }
}

/// The section body.
fn render(args: &DatabaseArgs, pg: &Postgres, runs: &[Run]) -> String {
    let mut out = String::new();
    render_method(args, pg, &mut out);
    let ratios = ratios(runs);

    let _ = writeln!(
        out,
        "| watcher | tps (median, min–max) | vs unwatched (median, min–max) | identical after shutdown (median, max) | verify done after (median, max) | identical | source CPU s | source peak RSS | replica CPU s | replica peak RSS |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for watcher in Watcher::ALL {
        let samples: Vec<(usize, &Sample)> = runs
            .iter()
            .enumerate()
            .filter(|(_, run)| run.watcher == watcher)
            .filter_map(|(index, run)| Some((index, run.result.as_ref().ok()?)))
            .collect();
        if samples.is_empty() {
            continue;
        }
        let tps: Vec<f64> = samples.iter().map(|(_, s)| s.tps).collect();
        let vs: Vec<f64> = samples.iter().filter_map(|(i, _)| ratios[*i]).collect();
        let followed: Vec<&Followed> = samples
            .iter()
            .filter_map(|(_, s)| s.followed.as_ref())
            .collect();
        let (identical, confirmed, verdicts, source, replica) = if followed.is_empty() {
            let none = "-".to_string();
            let mut capture_cpu: Vec<f64> = samples.iter().filter_map(|(_, s)| s.capture_cpu).collect();
            let source = format!("{} | -", cpu_cell(median(&mut capture_cpu)));
            (none.clone(), none.clone(), none, source, "- | -".to_string())
        } else {
            let matched: Vec<f64> = followed
                .iter()
                .filter_map(|f| f.caught_up.as_ref().ok().map(|c| c.0))
                .collect();
            let done: Vec<f64> = followed
                .iter()
                .filter_map(|f| f.caught_up.as_ref().ok().map(|c| c.1))
                .collect();
            let never = followed.len() - matched.len();
            let yes = followed
                .iter()
                .filter(|f| matches!(f.caught_up, Ok((_, _, Verdict::Identical))))
                .count();
            let verdicts = if yes == followed.len() {
                format!("yes ({yes} of {})", followed.len())
            } else {
                let cells: Vec<String> = followed
                    .iter()
                    .map(|f| match &f.caught_up {
                        Ok((_, _, verdict)) => verdict.cell(),
                        Err(_) => "no".into(),
                    })
                    .collect();
                cells.join("; ")
            };
            (
                median_max(matched, never),
                median_max(done, never),
                verdicts,
                side_cells(followed.iter().map(|f| f.source)),
                side_cells(followed.iter().map(|f| f.replica)),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {identical} | {confirmed} | {verdicts} | {source} | {replica} |",
            watcher.label(),
            spread(tps, |v| format!("{v:.0}")),
            if watcher == Watcher::Nothing {
                "1.00".to_string()
            } else {
                spread(vs, |v| format!("{v:.2}"))
            },
        );
    }
    let _ = writeln!(
        out,
        "\n(CPU: median over the runs; peak RSS: the largest)\n"
    );

    let _ = writeln!(out, "Every run, in the order they ran:\n");
    let _ = writeln!(
        out,
        "| round | order | watcher | tps | vs unwatched | shutdown | identical after shutdown | verify done after | identical | source CPU s | replica CPU s | notes |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (index, run) in runs.iter().enumerate() {
        let cells = match &run.result {
            Err(err) => format!(
                "- | - | - | - | - | - | - | - | failed: {}",
                err.replace('|', "/")
            ),
            Ok(sample) => {
                let vs = ratios[index].map_or_else(|| "-".into(), |r| format!("{r:.2}"));
                let shutdown = seconds(sample.shutdown);
                match &sample.followed {
                    None => format!(
                        "{:.0} | {vs} | {shutdown} | - | - | - | {} | - | ",
                        sample.tps,
                        cpu_cell(sample.capture_cpu)
                    ),
                    Some(f) => {
                        let (matched, done, verdict) = match &f.caught_up {
                            Ok((m, d, verdict)) => (seconds(*m), seconds(*d), verdict.cell()),
                            Err(last) => (
                                "never".into(),
                                format!("not within {} s: {}", args.deadline, last),
                                "no".into(),
                            ),
                        };
                        let mut notes = Vec::new();
                        if !f.waited.is_empty() {
                            notes.push(format!("waited on {}", waited_text(&f.waited)));
                        }
                        if let Some(first) = f.complaints.first() {
                            notes.push(format!(
                                "{} error or warning lines in the watcher's output, the first: {first}",
                                f.complaints.len()
                            ));
                        }
                        if let Some(check) = &f.replica_check {
                            notes.push(format!(
                                "PostgreSQL on a copy of the replica: {}",
                                check.as_ref().unwrap_or_else(|err| err)
                            ));
                        }
                        format!(
                            "{:.0} | {vs} | {shutdown} | {matched} | {done} | {verdict} | {} | {} | {}",
                            sample.tps,
                            cpu_cell(f.source.cpu),
                            cpu_cell(f.replica.cpu),
                            notes.join("; ").replace('|', "/")
                        )
                    }
                }
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {cells} |",
            run.round + 1,
            run.order,
            run.watcher.label()
        );
    }
    let _ = writeln!(out);
    render_target(runs, &ratios, &mut out);
    out
}

fn render_method(args: &DatabaseArgs, pg: &Postgres, out: &mut String) {
    let lsyncd = replicate::lsyncd_version();
    let _ = writeln!(
        out,
        "PostgreSQL {version} (`{bin}`) under pgbench. Every run starts afresh: a sparse {gib} GiB file under /tmp \
         with a fresh ext4 (`mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0`, so that no background initialisation \
         runs under pgbench; `mount -o loop`); `initdb -U postgres -A trust -E UTF8 --locale=C --no-sync` \
         of a data directory on it, and the server started with `pg_ctl -w -o \"-c listen_addresses='' -k SOCKETDIR\" start` \
         (default settings otherwise: fsync on, 128 MB shared buffers), its server programs run as the `postgres` user \
         (`runuser -u postgres --`), the clients as root over its unix socket; `pgbench -i -s {scale}`, then `CHECKPOINT`. \
         Then the watcher starts, and once it follows the image's mount (imezzo: the client's `initial sync done` line; \
         lsyncd: the end of its start-up rsync) `pgbench -c {clients} -j {jobs} -T {seconds}` runs; tps is its \
         `tps = N (without initial connection time)`. Then `pg_ctl -m fast -w stop`, which returns once the server \
         has exited (its shutdown checkpoint written). \
         Watchers: none; two that replicate nothing and split imezzo's cost: `imezzo capture --root MOUNT --json --empty-probe` \
         (an empty program where imezzo's probes hook every syscall's exit: the floor of any eBPF capture) and \
         `imezzo capture --root MOUNT --json` (the probes and the capture agent, its output thrown away, no journal), \
         each started before pgbench once it says `capture ready` and stopped with SIGINT after it, its CPU the capture \
         process's own over the pgbench run (the probes' time counts in PostgreSQL's processes); imezzo: `imezzo server --export MOUNT --state S --listen 127.0.0.1:0 --allow CLIENT` (state on the disk under /tmp) \
         and `imezzo client --server 127.0.0.1:PORT --server-id SERVER --root REPLICA --state C --mode replicate` into a fresh tmpfs; \
         lsyncd{lsyncd_version} with `delay = 0` (`default.rsync`, `archive = true`, `--modify-window=-1`) to an rsync daemon on \
         127.0.0.1 whose module is a fresh tmpfs, as in the Replicate section's lag rows. \
         Identical after shutdown: the bench takes the size and nanosecond mtime of every file of the export once the \
         shutdown has returned, and polls the replica every 10 ms until every file has them; then `imezzo verify MOUNT REPLICA` \
         (which reads both trees whole, about twice the data directory's size, so it is not the poll itself) must confirm \
         the trees identical, else the poll goes on (a verify at most once a second). The time runs from the return of \
         `pg_ctl stop` to that poll; \"verify done after\" runs to verify's exit, an upper bound. \"never\": not identical \
         within {deadline} s. Identical: verify's verdict (exit 0: yes). Shutdown: how long `pg_ctl stop` took. \
         Waited on (notes): the files the poll found behind on the replica, in turn, each with the last time after the \
         shutdown it still was (the poll walks the files in one fixed order and stops at the first one behind). \
         CPU: user+system seconds of each side over the pgbench run only (`/proc/PID/stat` before and after it; lsyncd's and the daemon's forked rsyncs included once \
         reaped); source side: imezzo's server or lsyncd, replica side: imezzo's client or the rsync daemon. Peak RSS: \
         over the watcher's life (VmHWM; for lsyncd and rsyncd also the sum of VmRSS over the process tree, sampled). \
         {rounds} rounds, each runs every watcher once in an order rotated from round to round; vs unwatched: the ratio \
         to the unwatched run of the same round. After imezzo's run of the last round, the replica's data directory is \
         copied (`cp -a`) into a fresh tmpfs, chowned to postgres, and a server started on it checks every table and \
         index (`pg_amcheck --all --install-missing --heapallindexed`) and counts `pgbench_accounts`.\n",
        version = pg.version,
        bin = pg.bin.display(),
        gib = args.image_gib,
        scale = args.scale,
        clients = args.clients,
        jobs = args.jobs,
        seconds = args.seconds,
        lsyncd_version = if lsyncd.is_empty() {
            String::new()
        } else {
            format!(" {lsyncd}")
        },
        deadline = args.deadline,
        rounds = args.rounds,
    );
}

/// Each run's tps over the unwatched run's of its round.
fn ratios(runs: &[Run]) -> Vec<Option<f64>> {
    runs.iter()
        .map(|run| {
            let tps = run.result.as_ref().ok()?.tps;
            let unwatched = runs
                .iter()
                .find(|other| other.round == run.round && other.watcher == Watcher::Nothing)?
                .result
                .as_ref()
                .ok()?
                .tps;
            (unwatched > 0.0).then(|| tps / unwatched)
        })
        .collect()
}

fn render_target(runs: &[Run], ratios: &[Option<f64>], out: &mut String) {
    let imezzo = Watcher::Follow(Tool::Imezzo);
    let vs: Vec<f64> = runs
        .iter()
        .zip(ratios)
        .filter(|(run, _)| run.watcher == imezzo)
        .filter_map(|(_, ratio)| *ratio)
        .collect();
    let followed: Vec<&Followed> = runs
        .iter()
        .filter(|run| run.watcher == imezzo)
        .filter_map(|run| run.result.as_ref().ok()?.followed.as_ref())
        .collect();
    let matched: Vec<f64> = followed
        .iter()
        .filter_map(|f| f.caught_up.as_ref().ok().map(|c| c.0))
        .collect();
    let never = followed.len() - matched.len();
    let identical = followed
        .iter()
        .all(|f| matches!(f.caught_up, Ok((_, _, Verdict::Identical))));
    let ratio_median = median(&mut vs.clone());
    let ratio_met = ratio_median.is_some_and(|r| r >= TARGET_RATIO);
    let worst = matched.iter().copied().fold(None, |max: Option<f64>, m| {
        Some(max.map_or(m, |max| max.max(m)))
    });
    let time_met = !followed.is_empty()
        && never == 0
        && identical
        && worst.is_some_and(|w| w <= TARGET_IDENTICAL.as_secs_f64());
    let _ = writeln!(out, "### Target (issue 10)\n");
    let _ = writeln!(out, "| target | measured | met? |");
    let _ = writeln!(out, "| --- | --- | --- |");
    let _ = writeln!(
        out,
        "| a database under pgbench identical on the replica within {} s of its shutdown, pgbench keeping at least {TARGET_RATIO} of its unwatched throughput | imezzo: vs unwatched {} (median of {} rounds; met when the median is at least {TARGET_RATIO}); identical after shutdown {} (met when every round is identical within {} s) | {} |",
        TARGET_IDENTICAL.as_secs(),
        spread(vs.clone(), |v| format!("{v:.2}")),
        vs.len(),
        median_max(matched.clone(), never),
        TARGET_IDENTICAL.as_secs(),
        match (ratio_met, time_met) {
            (true, true) => "yes",
            (false, true) => "no (throughput)",
            (true, false) => "no (time to identical)",
            (false, false) => "no (throughput and time to identical)",
        }
    );
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|run| {
            let err = run.result.as_ref().err()?;
            Some(format!(
                "- round {}, {}: {}",
                run.round + 1,
                run.watcher.label(),
                err.replace('|', "/")
            ))
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nRuns that failed:\n\n{}", failed.join("\n"));
    }
}

/// "median (min–max)" of the values; "-" when there are none.
fn spread(mut values: Vec<f64>, show: impl Fn(f64) -> String) -> String {
    let Some(mid) = median(&mut values) else {
        return "-".into();
    };
    // median() sorted them.
    format!(
        "{} ({}–{})",
        show(mid),
        show(values[0]),
        show(values[values.len() - 1])
    )
}

/// "median, max" of times to identical; runs that never got there make the max "never".
fn median_max(mut seconds_each: Vec<f64>, never: usize) -> String {
    let Some(mid) = median(&mut seconds_each) else {
        return if never > 0 {
            "never".into()
        } else {
            "-".into()
        };
    };
    let max = if never > 0 {
        format!("never ({never} of {})", never + seconds_each.len())
    } else {
        seconds(seconds_each[seconds_each.len() - 1])
    };
    format!("{}, {max}", seconds(mid))
}

/// The last few files the poll waited on: "global/pg_control until 1.16 s, ...".
fn waited_text(waited: &[(String, f64)]) -> String {
    const SHOWN: usize = 4;
    let skipped = waited.len().saturating_sub(SHOWN);
    let shown: Vec<String> = waited[skipped..]
        .iter()
        .map(|(path, until)| format!("{path} until {}", seconds(*until)))
        .collect();
    if skipped > 0 {
        format!("{skipped} more, then {}", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn seconds(value: f64) -> String {
    replicate::ms(Some(Duration::from_secs_f64(value)))
}

fn cpu_cell(cpu: Option<f64>) -> String {
    cpu.map_or_else(|| "-".into(), |cpu| format!("{cpu:.2}"))
}

/// "CPU s | peak RSS" of one side over the runs: the median CPU, the largest peak.
fn side_cells(costs: impl Iterator<Item = Cost>) -> String {
    let costs: Vec<Cost> = costs.collect();
    let mut cpu: Vec<f64> = costs.iter().filter_map(|c| c.cpu).collect();
    let peak = costs.iter().filter_map(|c| c.peak_kib).max();
    format!("{} | {}", cpu_cell(median(&mut cpu)), replicate::mib(peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_line_is_found() {
        let out = "latency average = 11.264 ms\ninitial connection time = 17.109 ms\n\
                   tps = 355.129294 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(355.129294));
        let old = "tps = 120.5 (including connections establishing)\n\
                   tps = 121.0 (excluding connections establishing)\n";
        assert_eq!(parse_tps(old), Some(121.0));
        assert_eq!(parse_tps("pgbench: error: connection failed\n"), None);
    }

    #[test]
    fn spreads_and_never() {
        assert_eq!(
            spread(vec![0.9, 0.8, 1.0], |v| format!("{v:.2}")),
            "0.90 (0.80–1.00)"
        );
        assert_eq!(spread(vec![], |v| format!("{v:.2}")), "-");
        assert_eq!(median_max(vec![0.5, 0.25], 0), "375.0 ms, 500.0 ms");
        assert_eq!(median_max(vec![0.5], 1), "500.0 ms, never (1 of 2)");
        assert_eq!(median_max(vec![], 2), "never");
    }

    #[test]
    fn rotation_runs_every_watcher_once_a_round() {
        for round in 0..3 {
            let order: Vec<Watcher> = (0..Watcher::ALL.len())
                .map(|turn| Watcher::ALL[(turn + round) % Watcher::ALL.len()])
                .collect();
            for watcher in Watcher::ALL {
                assert_eq!(order.iter().filter(|w| **w == watcher).count(), 1);
            }
        }
    }
}
