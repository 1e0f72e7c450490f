//! `cargo xtask bench replicate`: imezzo's replication against rsync (a daemon on loopback)
//! and lsyncd, in one run. Every row starts its tools afresh on fresh tmpfs mounts (one for
//! the server's tree, one for the replica); state directories, config files and logs are on
//! the disk under /tmp.
//!
//! * Lag: a paced writer on the server's tree, an inotify observer on the replica ([`lag`],
//!   [`observe`]); imezzo, then lsyncd with `delay = 0` and with its default delay.
//! * Initial sync: the export already holds the data; imezzo's client from start to its
//!   `initial sync done` line, against `rsync -a` into an empty daemon module.
//! * Live: the tools already follow an empty tree; the bench writes the data and waits until
//!   the replica is identical.
//! * Pages: both sides hold one big file; the bench pwrites 256 random 4 KiB pages into it
//!   ([`pages`]); imezzo until the replica holds them, against rsync's delta transfer of it.
//! * A million files exported: the server's memory, and the client's initial sync.

pub(super) mod agents;
mod lag;
mod observe;
mod pages;
pub(super) mod peers;
pub(super) mod process;
pub(super) mod scratch;
pub(super) mod trees;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{value_parser, Args, ValueEnum};

use self::{
    agents::{Nodes, Verdict},
    lag::LagStats,
    observe::Observer,
    pages::{Arrival, Change, Stamp},
    peers::{LsyncdDelay, RsyncDaemon},
    process::{Daemon, Usage},
    scratch::ScratchDir,
    trees::{Catchup, Pool, Snapshot},
};
use super::si;
use crate::{exec, tmpfs::TmpfsDir};

#[derive(Args)]
pub struct ReplicateArgs {
    /// Seconds of writing at each lag rate.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Operations a second of the lag rows, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 10_000],
          value_parser = value_parser!(u32).range(1..))]
    rates: Vec<u32>,
    /// Size of the one big file of the throughput rows, in MiB.
    #[arg(long, default_value_t = 2048, value_parser = value_parser!(u64).range(1..))]
    big_mib: u64,
    /// Number of small files (1 to 8 KiB, in 100 directories) of the throughput rows.
    #[arg(long, default_value_t = 50_000, value_parser = value_parser!(u64).range(1..))]
    small_files: u64,
    /// Size of the file the pages rows write 256 random 4 KiB pages into, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = value_parser!(u64).range(1..))]
    pages_mib: u64,
    /// Number of empty files exported for the server-memory row.
    #[arg(long, default_value_t = 1_000_000, value_parser = value_parser!(u64).range(1..))]
    million: u64,
    /// Seconds an operation may take to arrive after the writing ends before it counts as
    /// lost; also bounds the wait for a live copy to complete (ten times this).
    #[arg(long, default_value_t = 60, value_parser = value_parser!(u64).range(1..))]
    deadline: u64,
    /// Parts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = Part::ALL)]
    parts: Vec<Part>,
    /// Small sizes for trying the bench out (3 s at 100 and 1000 ops/s, 64 MiB, 2000 small
    /// files, 256 pages into 64 MiB, 20 000 files exported, 20 s deadline); replaces the sizes
    /// above.
    #[arg(long)]
    quick: bool,
}

fn positive_seconds(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Lag,
    Initial,
    Live,
    Pages,
    Million,
}

impl Part {
    const ALL: [Part; 5] = [
        Part::Lag,
        Part::Initial,
        Part::Live,
        Part::Pages,
        Part::Million,
    ];
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Part::Lag => "lag",
            Part::Initial => "initial",
            Part::Live => "live",
            Part::Pages => "pages",
            Part::Million => "million",
        };
        f.write_str(name)
    }
}

/// The sizes in force, once `--quick` is applied.
struct Settings {
    seconds: Duration,
    rates: Vec<u32>,
    big_mib: u64,
    small_files: u64,
    pages_mib: u64,
    million: u64,
    deadline: Duration,
    parts: Vec<Part>,
}

impl Settings {
    fn from(args: &ReplicateArgs) -> Settings {
        if args.quick {
            Settings {
                seconds: Duration::from_secs(3),
                rates: vec![100, 1000],
                big_mib: 64,
                small_files: 2000,
                pages_mib: 64,
                million: 20_000,
                deadline: Duration::from_secs(20),
                parts: args.parts.clone(),
            }
        } else {
            Settings {
                seconds: Duration::from_secs_f64(args.seconds),
                rates: args.rates.clone(),
                big_mib: args.big_mib,
                small_files: args.small_files,
                pages_mib: args.pages_mib,
                million: args.million,
                deadline: Duration::from_secs(args.deadline),
                parts: args.parts.clone(),
            }
        }
    }

    fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }
}

pub(super) struct Programs {
    pub(super) imezzo: PathBuf,
    rsync: PathBuf,
    lsyncd: PathBuf,
}

impl Programs {
    /// imezzo's agent and the peers, found on PATH.
    pub(super) fn find(imezzo: &Path) -> Result<Programs> {
        let find = |name: &str| {
            exec::find_program(name).with_context(|| {
                format!("{name} is not installed: run `cargo xtask deps` (as root)")
            })
        };
        Ok(Programs {
            imezzo: imezzo.to_path_buf(),
            rsync: find("rsync")?,
            lsyncd: find("lsyncd")?,
        })
    }
}

/// How long an initial sync may take before the row is given up.
const SYNC_WITHIN: Duration = Duration::from_secs(1800);

pub fn run(imezzo: &Path, args: &ReplicateArgs) -> Result<String> {
    let settings = Settings::from(args);
    check_memory(&settings)?;
    let programs = Programs::find(imezzo)?;
    let pool = Pool::new();
    let mut report = Report::default();

    if settings.runs(Part::Lag) {
        for &rate in &settings.rates {
            for tool in [
                Tool::Imezzo,
                Tool::Lsyncd(LsyncdDelay::Zero),
                Tool::Lsyncd(LsyncdDelay::Default),
            ] {
                let label = format!("lag at {rate} ops/s, {}", tool.label());
                progress(&format!("{label}..."));
                let row = attempt(&label, || lag_row(&programs, &settings, tool, rate))?;
                if let Ok(row) = &row {
                    progress(&format!(
                        "{label}: {} ops at {} ops/s, p50 {}, p99 {}, {} lost",
                        row.stats.ops,
                        si(row.achieved),
                        ms(row.stats.p50),
                        ms(row.stats.p99),
                        row.stats.lost
                    ));
                }
                report.lag.push((rate, tool, row));
            }
        }
    }
    let data = [
        Data::Big {
            mib: settings.big_mib,
        },
        Data::Small {
            files: settings.small_files,
        },
    ];
    if settings.runs(Part::Initial) {
        for data in data {
            let label = format!("initial sync of {}", data.label());
            progress(&format!("{label}..."));
            match attempt(&label, || initial_rows(&programs, data, &pool))? {
                Ok(rows) => report.throughput.extend(rows),
                Err(err) => report.failures.push(format!("{label}: {err}")),
            }
        }
    }
    if settings.runs(Part::Live) {
        for data in data {
            for tool in [Tool::Imezzo, Tool::Lsyncd(LsyncdDelay::Zero)] {
                let label = format!("live copy of {}, {}", data.label(), tool.label());
                progress(&format!("{label}..."));
                match attempt(&label, || live_row(&programs, &settings, tool, data, &pool))? {
                    Ok(row) => {
                        progress(&format!("{label}: {}", row.summary()));
                        report.throughput.push(row);
                    }
                    Err(err) => report.failures.push(format!("{label}: {err}")),
                }
            }
        }
    }
    if settings.runs(Part::Pages) {
        let label = pages_heading(settings.pages_mib);
        progress(&format!("{label}..."));
        match attempt(&label, || pages_rows(&programs, &settings, &pool))? {
            Ok(pages) => report.pages = Some(pages),
            Err(err) => report.failures.push(format!("{label}: {err}")),
        }
    }
    if settings.runs(Part::Million) {
        let label = format!("{} files exported", settings.million);
        progress(&format!("{label}..."));
        match attempt(&label, || million(&programs, settings.million))? {
            Ok(million) => report.million = Some(million),
            Err(err) => report.failures.push(format!("{label}: {err}")),
        }
    }
    Ok(report.render(&settings))
}

fn progress(text: &str) {
    println!("xtask: bench replicate: {text}");
}

/// Runs one row. Ctrl-C ends the bench; any other failure is the row's result, reported in
/// the section, and the bench goes on with the next row.
pub(super) fn attempt<T>(
    label: &str,
    row: impl FnOnce() -> Result<T>,
) -> Result<Result<T, String>> {
    match row() {
        Ok(value) => Ok(Ok(value)),
        Err(err) => {
            exec::bail_if_interrupted()?;
            println!("xtask: bench: {label} failed: {err:#}");
            let first = format!("{err:#}");
            let first = first.lines().next().unwrap_or("").to_string();
            Ok(Err(first))
        }
    }
}

/// The export and the replica each hold the largest data set once, in RAM.
fn check_memory(settings: &Settings) -> Result<()> {
    let (option, file_mib) = if settings.runs(Part::Pages) && settings.pages_mib > settings.big_mib
    {
        ("--pages-mib", settings.pages_mib)
    } else {
        ("--big-mib", settings.big_mib)
    };
    let needed_kib = file_mib * 1024 * 2 + 1024 * 1024;
    if let Some(available_kib) = super::meminfo_kib("MemAvailable") {
        if needed_kib > available_kib {
            anyhow::bail!(
                "{option} {file_mib} needs about {} MiB of tmpfs (the file on both sides) and {} MiB are available: \
                 choose a smaller {option}",
                needed_kib / 1024,
                available_kib / 1024
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tool {
    Imezzo,
    Lsyncd(LsyncdDelay),
}

impl Tool {
    pub(super) fn label(self) -> &'static str {
        match self {
            Tool::Imezzo => "imezzo server + client",
            Tool::Lsyncd(delay) => delay.label(),
        }
    }
}

/// A replicator following `export` into `replica`, with what each side cost from a start
/// point.
pub(super) enum Follower {
    Imezzo {
        server: agents::Server,
        client: Daemon,
        _nodes: Nodes,
    },
    Lsyncd {
        lsyncd: Daemon,
        rsyncd: RsyncDaemon,
        _scratch: ScratchDir,
    },
}

impl Follower {
    /// Starts `tool` and returns once the replica is a copy of the export as it is now.
    pub(super) fn start(
        programs: &Programs,
        tool: Tool,
        export: &Path,
        replica: &Path,
    ) -> Result<Follower> {
        match tool {
            Tool::Imezzo => {
                let nodes = Nodes::init(&programs.imezzo)?;
                let server = nodes.start_server(export)?;
                let mut client = nodes.start_client(&server, replica)?;
                agents::wait_initial_sync(&mut client, SYNC_WITHIN)?;
                Ok(Follower::Imezzo {
                    server,
                    client,
                    _nodes: nodes,
                })
            }
            Tool::Lsyncd(delay) => {
                let scratch = ScratchDir::create("imezzo-bench-peers")?;
                let rsyncd = RsyncDaemon::start(&programs.rsync, replica, scratch.path())?;
                let lsyncd = peers::start_lsyncd(
                    &programs.lsyncd,
                    export,
                    rsyncd.port(),
                    delay,
                    &[],
                    scratch.path(),
                )?;
                Ok(Follower::Lsyncd {
                    lsyncd,
                    rsyncd,
                    _scratch: scratch,
                })
            }
        }
    }

    /// (source side, replica side).
    fn sides_mut(&mut self) -> (&mut Daemon, &mut Daemon) {
        match self {
            Follower::Imezzo { server, client, .. } => (&mut server.daemon, client),
            Follower::Lsyncd { lsyncd, rsyncd, .. } => (lsyncd, &mut rsyncd.daemon),
        }
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        let (source, replica) = self.sides_mut();
        source.check_alive()?;
        replica.check_alive()
    }

    /// What each side printed about errors or warnings so far, each line prefixed by the side.
    pub(super) fn complaints(&mut self) -> Vec<String> {
        let (source, replica) = self.sides_mut();
        let prefix = |side: &str, lines: Vec<String>| {
            lines
                .into_iter()
                .map(|line| format!("{side}: {line}"))
                .collect::<Vec<_>>()
        };
        let mut lines = prefix("source", source.complaints());
        lines.extend(prefix("replica", replica.complaints()));
        lines
    }

    /// CPU seconds of (source side, replica side) so far.
    pub(super) fn cpu(&mut self) -> (Option<f64>, Option<f64>) {
        let (source, replica) = self.sides_mut();
        (source.cpu_seconds(), replica.cpu_seconds())
    }

    /// Stops both sides (the replica's first) and returns their cost since `from` (CPU
    /// seconds as [`Follower::cpu`] gave them) and their peak memory over their whole life.
    pub(super) fn stop(&mut self, from: (Option<f64>, Option<f64>)) -> Result<(Cost, Cost)> {
        let (source, replica) = self.sides_mut();
        let replica_usage = replica.stop()?;
        let source_usage = source.stop()?;
        Ok((
            Cost::since(source_usage, from.0),
            Cost::since(replica_usage, from.1),
        ))
    }
}

/// CPU seconds and peak memory of one side of a row.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Cost {
    pub(super) cpu: Option<f64>,
    pub(super) peak_kib: Option<u64>,
}

impl Cost {
    fn since(usage: Usage, start_cpu: Option<f64>) -> Cost {
        Cost {
            cpu: Some((usage.cpu - start_cpu.unwrap_or(0.0)).max(0.0)),
            peak_kib: usage.peak_kib,
        }
    }

    fn cells(self) -> String {
        format!(
            "{} | {}",
            self.cpu
                .map_or_else(|| "-".into(), |cpu| format!("{cpu:.2}")),
            mib(self.peak_kib)
        )
    }
}

struct LagRow {
    achieved: f64,
    stats: LagStats,
    overflows: u64,
    source: Cost,
    replica: Cost,
}

fn lag_row(programs: &Programs, settings: &Settings, tool: Tool, rate: u32) -> Result<LagRow> {
    // Declared first, dropped (unmounted) last, after every process using them has stopped.
    let export = TmpfsDir::mount("imezzo-bench-export")?;
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    lag::prepare(export.path())?;
    let mut follower = Follower::start(programs, tool, export.path(), replica.path())?;
    let observer = Observer::start(replica.path())?;
    let start_cpu = follower.cpu();
    let written = lag::write_paced(export.path(), rate, settings.seconds)?;
    let last = written.last_op_per_target();
    let written_end = written.closes.last().copied().unwrap_or(written.started);
    loop {
        if observer.behind(&last) == 0 || written_end.elapsed() > settings.deadline {
            break;
        }
        follower.check_alive()?;
        exec::bail_if_interrupted()?;
        thread::sleep(Duration::from_millis(10));
    }
    let observed = observer.finish()?;
    let (source, replica_cost) = follower.stop(start_cpu)?;
    let lags = lag::lags(&written.closes, &observed.observations);
    Ok(LagRow {
        achieved: written.achieved_rate(),
        stats: lag::stats(&lags),
        overflows: observed.overflows,
        source,
        replica: replica_cost,
    })
}

#[derive(Clone, Copy, Debug)]
enum Data {
    Big { mib: u64 },
    Small { files: u64 },
}

impl Data {
    fn label(self) -> String {
        match self {
            Data::Big { mib } if mib % 1024 == 0 => format!("one {} GiB file", mib / 1024),
            Data::Big { mib } => format!("one {mib} MiB file"),
            Data::Small { files } => format!("{files} small files"),
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Data::Big { mib } => mib << 20,
            Data::Small { files } => trees::small_bytes(files),
        }
    }

    fn write(self, dir: &Path, pool: &Pool) -> Result<trees::WriteTimes> {
        match self {
            Data::Big { mib } => trees::write_big(dir, mib, pool),
            Data::Small { files } => trees::write_small(dir, files, pool),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Initial,
    Live,
}

struct ThroughputRow {
    data: Data,
    phase: Phase,
    tool: &'static str,
    /// Seconds the copy took (see the section's text for each phase); None if it never
    /// completed.
    seconds: Option<f64>,
    /// Live rows: seconds from the last close() on the server to the replica identical.
    tail: Option<f64>,
    /// What `imezzo verify` said at the end.
    verdict: Verdict,
    source: Cost,
    replica: Cost,
    note: String,
}

impl ThroughputRow {
    fn rate(&self) -> Option<f64> {
        let seconds = self.seconds?;
        (seconds > 0.0).then(|| match self.data {
            Data::Big { .. } => self.data.bytes() as f64 / seconds / (1 << 20) as f64,
            Data::Small { files } => files as f64 / seconds,
        })
    }

    fn rate_text(&self) -> String {
        match (self.rate(), self.data) {
            (Some(rate), Data::Big { .. }) => format!("{} MiB/s", si(rate)),
            (Some(rate), Data::Small { .. }) => format!(
                "{} files/s ({} MiB/s)",
                si(rate),
                si(self.data.bytes() as f64 / self.seconds.unwrap_or(1.0) / (1 << 20) as f64)
            ),
            (None, _) => "-".into(),
        }
    }

    fn summary(&self) -> String {
        match self.seconds {
            Some(seconds) => format!(
                "{seconds:.2} s, {}{}",
                self.rate_text(),
                match &self.verdict {
                    Verdict::Identical => String::new(),
                    verdict => format!(", identical: {}", verdict.cell()),
                }
            ),
            None => format!("did not complete: {}", self.note),
        }
    }
}

/// The initial-sync rows of one data set: imezzo's client, then `rsync -a` into an empty
/// module, each into a fresh replica of the same export.
fn initial_rows(programs: &Programs, data: Data, pool: &Pool) -> Result<Vec<ThroughputRow>> {
    let export = TmpfsDir::mount("imezzo-bench-export")?;
    data.write(export.path(), pool)?;
    let mut rows = Vec::new();

    {
        let replica = TmpfsDir::mount("imezzo-bench-replica")?;
        let nodes = Nodes::init(&programs.imezzo)?;
        let mut server = nodes.start_server(export.path())?;
        let server_cpu = server.daemon.cpu_seconds();
        let started = Instant::now();
        let mut client = nodes.start_client(&server, replica.path())?;
        let done = agents::wait_initial_sync(&mut client, SYNC_WITHIN)?;
        let seconds = done.at.duration_since(started).as_secs_f64();
        let client_usage = client.stop()?;
        let server_usage = server.daemon.stop()?;
        let verdict = agents::verify(&programs.imezzo, export.path(), replica.path())?;
        let row = ThroughputRow {
            data,
            phase: Phase::Initial,
            tool: "imezzo client (initial sync)",
            seconds: Some(seconds),
            tail: None,
            note: verdict_note(&verdict),
            verdict,
            source: Cost::since(server_usage, server_cpu),
            replica: Cost::since(client_usage, None),
        };
        progress(&format!(
            "initial sync of {}, imezzo: {}",
            data.label(),
            row.summary()
        ));
        rows.push(row);
    }
    {
        let replica = TmpfsDir::mount("imezzo-bench-replica")?;
        let scratch = ScratchDir::create("imezzo-bench-peers")?;
        let mut rsyncd = RsyncDaemon::start(&programs.rsync, replica.path(), scratch.path())?;
        let mut cmd = Command::new(&programs.rsync);
        cmd.arg("-a")
            .arg(format!("{}/", export.path().display()))
            .arg(rsyncd.url());
        let sent = process::run_measured(&mut cmd)?;
        let daemon_usage = rsyncd.daemon.stop()?;
        let verdict = agents::verify(&programs.imezzo, export.path(), replica.path())?;
        let row = ThroughputRow {
            data,
            phase: Phase::Initial,
            tool: "rsync -a to rsyncd",
            seconds: sent.success.then_some(sent.wall.as_secs_f64()),
            tail: None,
            note: if sent.success {
                verdict_note(&verdict)
            } else {
                format!("rsync failed ({}): {}", sent.status, sent.output.trim())
            },
            verdict,
            source: Cost::since(sent.usage, None),
            replica: Cost::since(daemon_usage, None),
        };
        progress(&format!(
            "initial sync of {}, rsync: {}",
            data.label(),
            row.summary()
        ));
        rows.push(row);
    }
    Ok(rows)
}

/// One live row: `tool` follows an empty tree, the bench writes the data set, and the copy
/// is done when every file's size and mtime match on the replica and `imezzo verify` agrees.
fn live_row(
    programs: &Programs,
    settings: &Settings,
    tool: Tool,
    data: Data,
    pool: &Pool,
) -> Result<ThroughputRow> {
    let export = TmpfsDir::mount("imezzo-bench-export")?;
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    let mut follower = Follower::start(programs, tool, export.path(), replica.path())?;
    let start_cpu = follower.cpu();
    let times = data.write(export.path(), pool)?;
    let snapshot = Snapshot::take(export.path())?;
    let timeout = settings.deadline * 5;
    let caught_up = wait_identical(
        &programs.imezzo,
        export.path(),
        replica.path(),
        &snapshot,
        timeout,
        || follower.check_alive(),
        |_| {},
    )?;
    let (source, replica_cost) = follower.stop(start_cpu)?;
    let (seconds, tail, verdict, note) = match caught_up {
        Ok((at, verdict)) => (
            Some(at.duration_since(times.first_write).as_secs_f64()),
            Some(at.saturating_duration_since(times.last_close).as_secs_f64()),
            verdict,
            String::new(),
        ),
        Err(last) => (
            None,
            None,
            Verdict::Differs(last.clone()),
            format!("not identical within {} s: {last}", timeout.as_secs()),
        ),
    };
    Ok(ThroughputRow {
        data,
        phase: Phase::Live,
        tool: tool.label(),
        seconds,
        tail,
        verdict,
        source,
        replica: replica_cost,
        note,
    })
}

/// Polls the replica against the snapshot of the export; once every file's size and mtime
/// match, confirms with `imezzo verify` that every file is identical. Ok(when the files
/// matched, verify's verdict), or Err(what verify said last) after `timeout`. `waiting` is
/// told, at each poll that found the replica behind, the first file it lacks.
pub(super) fn wait_identical(
    imezzo: &Path,
    export: &Path,
    replica: &Path,
    snapshot: &Snapshot,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
    mut waiting: impl FnMut(&Path),
) -> Result<Result<(Instant, Verdict), String>> {
    let start = Instant::now();
    let mut catchup = Catchup::new();
    let mut last = format!("{} files expected, none compared yet", snapshot.len());
    let mut next_verify = Instant::now();
    loop {
        let matched = catchup.advance(snapshot, replica);
        if !matched {
            if let Some(path) = catchup.waiting_on(snapshot) {
                waiting(path);
            }
        }
        if matched && Instant::now() >= next_verify {
            let matched = Instant::now();
            let verdict = agents::verify(imezzo, export, replica)?;
            if verdict.files_identical() {
                return Ok(Ok((matched, verdict)));
            }
            last = verdict_note(&verdict);
            println!(
                "xtask: bench: {:.3} s: every file's size and mtime matched, but verify: {last}",
                start.elapsed().as_secs_f64()
            );
            catchup.restart();
            // Verify reads both trees whole: not more than once a second.
            next_verify = Instant::now() + Duration::from_secs(1);
        }
        alive()?;
        exec::bail_if_interrupted()?;
        if start.elapsed() > timeout {
            return Ok(Err(last));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Rounds of the pages rows: each tool once a round, alternating.
const PAGES_ROUNDS: u64 = 3;
/// How often the replica's file is polled for a change's pages.
const PAGES_POLL: Duration = Duration::from_millis(1);
/// Issue 10's first target: the replica identical within this long...
const PAGES_WITHIN: Duration = Duration::from_millis(50);
/// ... and at least this many times faster than rsync's delta transfer.
const PAGES_FASTER: f64 = 20.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PagesTool {
    Imezzo,
    /// `rsync --inplace --no-whole-file --modify-window=-1 -a FILE rsync://...`, run once the
    /// change is written.
    RsyncDelta,
    /// lsyncd with `delay = 0` following the export, its rsync with `--inplace --no-whole-file`.
    Lsyncd,
}

impl PagesTool {
    const ALL: [PagesTool; 3] = [PagesTool::Imezzo, PagesTool::RsyncDelta, PagesTool::Lsyncd];

    fn label(self) -> &'static str {
        match self {
            PagesTool::Imezzo => Tool::Imezzo.label(),
            PagesTool::RsyncDelta => {
                "rsync --inplace --no-whole-file --modify-window=-1 -a to rsyncd"
            }
            PagesTool::Lsyncd => "lsyncd (delay = 0, --inplace --no-whole-file) + rsyncd",
        }
    }
}

/// One round of one tool of the pages rows.
struct PagesRound {
    /// From the first pwrite to the replica holding the change (imezzo) or to rsync's exit.
    seconds: f64,
    source: Cost,
    replica: Cost,
    /// What `imezzo verify` said afterwards.
    verdict: Verdict,
    /// imezzo: bytes the server's read-family calls returned over the phase (`rchar`).
    server_read: Option<u64>,
    /// imezzo: seconds from the first pwrite to the first poll that found a page arrived.
    first_page: Option<f64>,
}

struct PagesRow {
    tool: PagesTool,
    rounds: Vec<Result<PagesRound, String>>,
}

impl PagesRow {
    fn done(&self) -> impl Iterator<Item = &PagesRound> {
        self.rounds.iter().filter_map(|round| round.as_ref().ok())
    }

    /// Median, least and largest seconds over the rounds that completed.
    fn seconds(&self) -> Option<Spread> {
        Spread::of(self.done().map(|round| round.seconds))
    }
}

struct Pages {
    mib: u64,
    rows: Vec<PagesRow>,
}

impl Pages {
    /// The row of `tool` (one a tool).
    fn row(&self, tool: PagesTool) -> Option<&PagesRow> {
        self.rows.iter().find(|row| row.tool == tool)
    }

    fn median(&self, tool: PagesTool) -> Option<f64> {
        Some(self.row(tool)?.seconds()?.median)
    }

    /// rsync's median time over imezzo's.
    fn imezzo_faster(&self) -> Option<f64> {
        ratio(
            self.median(PagesTool::RsyncDelta)?,
            self.median(PagesTool::Imezzo)?,
        )
    }
}

/// `slower / faster`, when both are positive.
fn ratio(slower: f64, faster: f64) -> Option<f64> {
    (slower > 0.0 && faster > 0.0).then(|| slower / faster)
}

/// The median and range of some values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.collect();
        let median = super::median(&mut values)?;
        Some(Spread {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }
}

/// "256 random 4 KiB writes into a 1 GiB file".
fn pages_heading(mib: u64) -> String {
    format!(
        "{} random {} KiB writes into a {} file",
        pages::WRITES,
        pages::PAGE / 1024,
        size_text(mib)
    )
}

/// 1024 -> "1 GiB", 64 -> "64 MiB".
fn size_text(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The pages rows: one export holding one big file; each round, each tool in turn brings a
/// fresh replica to a copy of it, then the bench writes a change of its own into the export's
/// file and times the tool until the replica holds it.
fn pages_rows(programs: &Programs, settings: &Settings, pool: &Pool) -> Result<Pages> {
    let export = TmpfsDir::mount("imezzo-bench-export")?;
    let data = Data::Big {
        mib: settings.pages_mib,
    };
    data.write(export.path(), pool)?;
    let mut rows: Vec<PagesRow> = PagesTool::ALL
        .iter()
        .map(|&tool| PagesRow {
            tool,
            rounds: Vec::new(),
        })
        .collect();
    let mut seed = 0;
    for round in 1..=PAGES_ROUNDS {
        for row in &mut rows {
            // A seed of its own: the change always brings bytes the replica does not hold.
            let change = Change::new(data.bytes(), seed)?;
            seed += 1;
            let label = format!(
                "{}, {}, round {round} of {PAGES_ROUNDS}",
                pages_heading(settings.pages_mib),
                row.tool.label()
            );
            progress(&format!("{label}..."));
            let result = attempt(&label, || match row.tool {
                PagesTool::Imezzo => pages_imezzo(programs, settings, export.path(), &change),
                PagesTool::RsyncDelta => pages_rsync(programs, export.path(), &change),
                PagesTool::Lsyncd => pages_lsyncd(programs, settings, export.path(), &change),
            })?;
            if let Ok(done) = &result {
                progress(&format!(
                    "{label}: {}, identical: {}{}",
                    ms(Some(Duration::from_secs_f64(done.seconds))),
                    done.verdict.cell(),
                    done.server_read.map_or_else(String::new, |bytes| format!(
                        ", server read {}",
                        bytes_text(bytes)
                    ))
                ));
            }
            row.rounds.push(result);
        }
    }
    Ok(Pages {
        mib: settings.pages_mib,
        rows,
    })
}

/// One imezzo round: a fresh server and client follow the export; once `imezzo verify` finds
/// the replica identical, the change is written and the replica's file polled for it.
fn pages_imezzo(
    programs: &Programs,
    settings: &Settings,
    export: &Path,
    change: &Change,
) -> Result<PagesRound> {
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    let mut follower = Follower::start(programs, Tool::Imezzo, export, replica.path())?;
    wait_verified(
        &programs.imezzo,
        export,
        replica.path(),
        settings.deadline,
        || follower.check_alive(),
    )?;
    let source_file = export.join(trees::BIG_FILE);
    let replica_file = replica.path().join(trees::BIG_FILE);
    let (server, client) = follower.sides_mut();
    let start = (server.thread_times(), client.thread_times());
    let read_before = server.io_counter("rchar");

    let first_write = change.apply(&source_file)?;
    let (arrived, first_page) = wait_pages(
        change,
        &source_file,
        &replica_file,
        first_write,
        settings.deadline,
        || follower.check_alive(),
    )?;

    let (server, client) = follower.sides_mut();
    let end = (server.thread_times(), client.thread_times());
    let server_read = read_before
        .zip(server.io_counter("rchar"))
        .map(|(before, after)| after.saturating_sub(before));
    let verdict = agents::verify(&programs.imezzo, export, replica.path())?;
    let (source, replica_cost) = follower.stop((None, None))?;
    let cpu = |start: Option<process::ThreadTimes>, end: Option<process::ThreadTimes>| {
        Some(end?.seconds_since(&start?))
    };
    Ok(PagesRound {
        seconds: arrived.duration_since(first_write).as_secs_f64(),
        source: Cost {
            cpu: cpu(start.0, end.0),
            peak_kib: source.peak_kib,
        },
        replica: Cost {
            cpu: cpu(start.1, end.1),
            peak_kib: replica_cost.peak_kib,
        },
        verdict,
        server_read,
        first_page: first_page.map(|at| at.duration_since(first_write).as_secs_f64()),
    })
}

/// Polls `replica_file` about every [`PAGES_POLL`] until it holds every page of `change` and
/// the size and mtime `source_file` has now (the change written and closed). Returns when it
/// did and when a poll first found one of the pages; fails after `within` from `first_write`.
fn wait_pages(
    change: &Change,
    source_file: &Path,
    replica_file: &Path,
    first_write: Instant,
    within: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<(Instant, Option<Instant>)> {
    let expected = Stamp::of(source_file)?;
    let mut arrival = Arrival::new(change);
    let mut first_page = None;
    loop {
        let done = arrival.advance(replica_file, expected);
        let now = Instant::now();
        if first_page.is_none() && arrival.pending() < change.pages().len() {
            first_page = Some(now);
        }
        if done {
            return Ok((now, first_page));
        }
        alive()?;
        exec::bail_if_interrupted()?;
        if first_write.elapsed() > within {
            bail!(
                "the replica did not hold the change within {} s: {} of {} pages not there{}",
                within.as_secs(),
                arrival.pending(),
                change.pages().len(),
                if arrival.pending() == 0 {
                    " (only the size or mtime differs)"
                } else {
                    ""
                }
            );
        }
        thread::sleep(PAGES_POLL);
    }
}

/// Runs `imezzo verify` about once a second until it finds the trees identical (exit 0);
/// fails after `within`.
fn wait_verified(
    imezzo: &Path,
    export: &Path,
    replica: &Path,
    within: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let verdict = agents::verify(imezzo, export, replica)?;
        if verdict == Verdict::Identical {
            return Ok(());
        }
        alive()?;
        exec::bail_if_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "imezzo verify did not find the replica identical within {} s of the initial sync: {}",
                within.as_secs(),
                match &verdict {
                    Verdict::Differs(head) => head.clone(),
                    verdict => verdict.cell(),
                }
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// One rsync round: the module holds a copy of the export's file (and the export root's
/// mtime); the change is written, then `rsync --inplace --no-whole-file --modify-window=-1 -a`
/// sends the file with the delta-transfer algorithm. `--modify-window=-1` as for lsyncd: rsync's
/// quick check compares whole seconds, and a change made within the second of the copy (rounds
/// of a small file follow each other closely) would be skipped as already there.
fn pages_rsync(programs: &Programs, export: &Path, change: &Change) -> Result<PagesRound> {
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    let source_file = export.join(trees::BIG_FILE);
    copy_into_module(&programs.imezzo, export, replica.path())?;
    let scratch = ScratchDir::create("imezzo-bench-peers")?;
    let mut rsyncd = RsyncDaemon::start(&programs.rsync, replica.path(), scratch.path())?;
    let daemon_cpu = rsyncd.daemon.cpu_seconds();

    let first_write = change.apply(&source_file)?;
    let mut cmd = Command::new(&programs.rsync);
    cmd.args(["--inplace", "--no-whole-file", "--modify-window=-1", "-a"])
        .arg(&source_file)
        .arg(rsyncd.url());
    let writing = first_write.elapsed();
    let sent = process::run_measured(&mut cmd)?;
    let daemon_usage = rsyncd.daemon.stop()?;
    if !sent.success {
        bail!("rsync failed ({}): {}", sent.status, sent.output.trim());
    }
    let verdict = agents::verify(&programs.imezzo, export, replica.path())?;
    Ok(PagesRound {
        seconds: (writing + sent.wall).as_secs_f64(),
        source: Cost::since(sent.usage, None),
        replica: Cost::since(daemon_usage, daemon_cpu),
        verdict,
        server_read: None,
        first_page: None,
    })
}

/// Copies the export's big file into an empty module, with its mtime and the export root's,
/// and checks with `imezzo verify` that the two trees are identical.
fn copy_into_module(imezzo: &Path, export: &Path, module: &Path) -> Result<()> {
    let source_file = export.join(trees::BIG_FILE);
    let copy = module.join(trees::BIG_FILE);
    fs::copy(&source_file, &copy).with_context(|| {
        format!(
            "could not copy {} to {}",
            source_file.display(),
            copy.display()
        )
    })?;
    copy_mtime(&source_file, &copy)?;
    copy_mtime(export, module)?;
    let before = agents::verify(imezzo, export, module)?;
    if before != Verdict::Identical {
        bail!(
            "the module's copy was not identical to the export before the change: {}",
            verdict_note(&before)
        );
    }
    Ok(())
}

/// One lsyncd round: the module holds a copy of the export's file, lsyncd (`delay = 0`, its
/// rsync with `--inplace --no-whole-file`) follows the export; the change is written and the
/// module's file polled for it, like imezzo's replica.
fn pages_lsyncd(
    programs: &Programs,
    settings: &Settings,
    export: &Path,
    change: &Change,
) -> Result<PagesRound> {
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    copy_into_module(&programs.imezzo, export, replica.path())?;
    let scratch = ScratchDir::create("imezzo-bench-peers")?;
    let mut rsyncd = RsyncDaemon::start(&programs.rsync, replica.path(), scratch.path())?;
    let mut lsyncd = peers::start_lsyncd(
        &programs.lsyncd,
        export,
        rsyncd.port(),
        LsyncdDelay::Zero,
        &PAGES_LSYNCD_RSYNC,
        scratch.path(),
    )?;
    // Its start-up rsync found the module up to date; the trees must still be identical.
    wait_verified(
        &programs.imezzo,
        export,
        replica.path(),
        settings.deadline,
        || {
            lsyncd.check_alive()?;
            rsyncd.daemon.check_alive()
        },
    )?;
    let start_cpu = (lsyncd.cpu_seconds(), rsyncd.daemon.cpu_seconds());
    let source_file = export.join(trees::BIG_FILE);
    let first_write = change.apply(&source_file)?;
    let (arrived, _) = wait_pages(
        change,
        &source_file,
        &replica.path().join(trees::BIG_FILE),
        first_write,
        settings.deadline,
        || {
            lsyncd.check_alive()?;
            rsyncd.daemon.check_alive()
        },
    )?;
    // Untimed; it also leaves lsyncd the time to reap its rsync before it is stopped.
    let verdict = agents::verify(&programs.imezzo, export, replica.path())?;
    let replica_usage = rsyncd.daemon.stop()?;
    let source_usage = lsyncd.stop()?;
    Ok(PagesRound {
        seconds: arrived.duration_since(first_write).as_secs_f64(),
        source: Cost::since(source_usage, start_cpu.0),
        replica: Cost::since(replica_usage, start_cpu.1),
        verdict,
        server_read: None,
        first_page: None,
    })
}

/// The options lsyncd's rsync gets in the pages rows, as the rsync row's command has them.
const PAGES_LSYNCD_RSYNC: [&str; 2] = ["--inplace", "--no-whole-file"];

/// Gives `to` the modification time of `from` (files or directories).
fn copy_mtime(from: &Path, to: &Path) -> Result<()> {
    let modified = fs::metadata(from)
        .and_then(|meta| meta.modified())
        .with_context(|| format!("could not stat {}", from.display()))?;
    fs::File::open(to)
        .and_then(|file| file.set_modified(modified))
        .with_context(|| format!("could not set the mtime of {}", to.display()))
}

/// 1048576 -> "1.00 MiB".
fn bytes_text(bytes: u64) -> String {
    let mib = bytes as f64 / (1 << 20) as f64;
    if mib >= 1.0 {
        format!("{} MiB", si(mib))
    } else {
        format!("{} KiB", si(bytes as f64 / 1024.0))
    }
}

struct Million {
    files: u64,
    create_seconds: f64,
    server_start_seconds: f64,
    server_hwm_ready: Option<u64>,
    server_hwm_synced: Option<u64>,
    client_peak: Option<u64>,
    sync_seconds: f64,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    verdict: Verdict,
    rsync: Option<RsyncMillion>,
}

struct RsyncMillion {
    seconds: Option<f64>,
    sender: Cost,
    daemon: Cost,
    verdict: Verdict,
}

/// `files` empty files exported: the server's memory once ready and after a client's
/// initial sync, then `rsync -a` of the same tree for comparison.
fn million(programs: &Programs, files: u64) -> Result<Million> {
    let export = TmpfsDir::mount("imezzo-bench-export")?;
    let created = Instant::now();
    trees::write_empty(export.path(), files)?;
    let create_seconds = created.elapsed().as_secs_f64();
    progress(&format!(
        "{files} empty files created in {create_seconds:.1} s"
    ));

    let mut report = {
        let replica = TmpfsDir::mount("imezzo-bench-replica")?;
        let nodes = Nodes::init(&programs.imezzo)?;
        let spawned = Instant::now();
        let mut server = nodes.start_server(export.path())?;
        let server_start_seconds = spawned.elapsed().as_secs_f64();
        let server_hwm_ready = server.daemon.peak_rss_kib();
        progress(&format!(
            "server ready in {server_start_seconds:.1} s, peak RSS {}",
            mib(server_hwm_ready)
        ));
        let started = Instant::now();
        let mut client = nodes.start_client(&server, replica.path())?;
        let done = agents::wait_initial_sync(&mut client, SYNC_WITHIN)?;
        let sync_seconds = done.at.duration_since(started).as_secs_f64();
        let server_hwm_synced = server.daemon.peak_rss_kib();
        progress(&format!(
            "initial sync of {files} files in {sync_seconds:.1} s; server peak RSS {}",
            mib(server_hwm_synced)
        ));
        let client_usage = client.stop()?;
        let server_usage = server.daemon.stop()?;
        let verdict = agents::verify(&programs.imezzo, export.path(), replica.path())?;
        Million {
            files,
            create_seconds,
            server_start_seconds,
            server_hwm_ready,
            server_hwm_synced,
            client_peak: client_usage.peak_kib,
            sync_seconds,
            server_cpu: Some(server_usage.cpu),
            client_cpu: Some(client_usage.cpu),
            verdict,
            rsync: None,
        }
    };
    let replica = TmpfsDir::mount("imezzo-bench-replica")?;
    let scratch = ScratchDir::create("imezzo-bench-peers")?;
    let mut rsyncd = RsyncDaemon::start(&programs.rsync, replica.path(), scratch.path())?;
    let mut cmd = Command::new(&programs.rsync);
    cmd.arg("-a")
        .arg(format!("{}/", export.path().display()))
        .arg(rsyncd.url());
    let sent = process::run_measured(&mut cmd)?;
    let daemon = rsyncd.daemon.stop()?;
    let verdict = agents::verify(&programs.imezzo, export.path(), replica.path())?;
    progress(&format!(
        "rsync -a of {files} files: {:.1} s",
        sent.wall.as_secs_f64()
    ));
    report.rsync = Some(RsyncMillion {
        seconds: sent.success.then_some(sent.wall.as_secs_f64()),
        sender: Cost::since(sent.usage, None),
        daemon: Cost::since(daemon, None),
        verdict,
    });
    Ok(report)
}

#[derive(Default)]
struct Report {
    lag: Vec<(u32, Tool, Result<LagRow, String>)>,
    throughput: Vec<ThroughputRow>,
    pages: Option<Pages>,
    million: Option<Million>,
    failures: Vec<String>,
}

/// What a row's notes say of a verdict: verify's first lines when files differ.
pub(super) fn verdict_note(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Differs(head) => head.clone(),
        _ => String::new(),
    }
}

pub(super) fn ms(duration: Option<Duration>) -> String {
    match duration {
        None => "lost".into(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

pub(super) fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "-".into(),
        |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
    )
}

pub(super) fn yes_no(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "no"
    }
}

impl Report {
    fn render(&self, settings: &Settings) -> String {
        let mut out = String::new();
        self.render_method(settings, &mut out);
        if !self.lag.is_empty() {
            self.render_lag(settings, &mut out);
        }
        if !self.throughput.is_empty() {
            self.render_throughput(&mut out);
        }
        if let Some(pages) = &self.pages {
            render_pages(pages, &mut out);
        }
        if let Some(million) = &self.million {
            render_million(million, &mut out);
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "Rows that failed:\n");
            for failure in &self.failures {
                let _ = writeln!(out, "- {}", failure.replace('|', "/"));
            }
            let _ = writeln!(out);
        }
        self.render_targets(settings, &mut out);
        out
    }

    fn render_method(&self, settings: &Settings, out: &mut String) {
        let _ = writeln!(
            out,
            "Every row starts its tools afresh, with the server's tree and the replica on two fresh tmpfs \
             mounts and state directories, configs and logs on the disk (ext4 here) under /tmp. imezzo: \
             `imezzo server --export EXPORT --state S --listen 127.0.0.1:0 --allow CLIENT` and \
             `imezzo client --server 127.0.0.1:PORT --server-id SERVER --root REPLICA --state C --mode replicate` \
             (QUIC on loopback). rsync: `rsync --daemon --no-detach --config=F --port=P --address=127.0.0.1` \
             with one module on the replica (`read only = false`, `uid = root`, `gid = root`, `use chroot = no`). \
             lsyncd {}: `default.rsync` from the export to that module with \
             `rsync = {{ archive = true, _extra = {{ \"--modify-window=-1\" }} }}`, run with `delay = 0` (an rsync as \
             soon as an event arrives, one at a time) and with its default delay. The extra option makes \
             rsync compare mtimes to the nanosecond: its default quick check compares whole seconds and \
             skips a same-size rewrite made within the second of the previous copy, which then never \
             arrives. Source side: imezzo's server, or lsyncd with the rsync processes it forks, or \
             the `rsync -a` command. Replica side: imezzo's client, or the rsync daemon with the receivers \
             it forks. CPU: user+system seconds over the measured phase (from `/proc/PID/stat` at its start \
             to `wait4`'s usage at exit, reaped children included). Peak RSS: the largest of VmHWM, \
             `ru_maxrss` and, for rsync and lsyncd, the sum of VmRSS over the process tree sampled every 50 ms.\n",
            lsyncd_version()
        );
        let _ = writeln!(
            out,
            "**Lag.** The bench writes {} s at each rate: op k opens one file with `O_CREAT|O_TRUNC`, \
             writes 1 KiB naming k, closes it, and notes the time after close() returns. One op in four \
             creates a new file, the others overwrite one of 1000 files (10 directories) that both sides \
             hold before the run. An inotify observer on the replica's directories (`IN_CLOSE_WRITE`, \
             `IN_MOVED_TO`, `IN_MODIFY`, `IN_CREATE`) reads a file whole on each event; when it holds op k's \
             bytes, op k and every earlier op on that file have arrived (a superseded write is delivered by \
             the later one). Lag = arrival − close. Percentiles are nearest-rank over every op, a lost op \
             counting as infinitely late; lost = not arrived {} s after the last write. Achieved: ops \
             over the writing time, below the asked rate when the writer fell behind (the writer and the \
             observer are threads of the bench's own process and share the CPUs with the tools).\n",
            fmt_secs(settings.seconds),
            settings.deadline.as_secs()
        );
        let _ = writeln!(
            out,
            "**Throughput.** Data: one file of incompressible bytes, or files of 1 to 8 KiB in 100 \
             directories (no two 4 KiB blocks equal). Initial sync: the export already holds the data; \
             imezzo's time runs from starting the client (the server already ready) to its \
             `initial sync done` line, which it prints once the replica is durable; rsync's is the wall \
             time of `rsync -a EXPORT/ rsync://127.0.0.1:P/replica/` into the empty module. Live: the tool \
             already follows the empty export; the bench writes the data, and the time runs from its first \
             write to the moment every file on the replica has the export's size and mtime (polled every \
             10 ms); `imezzo verify EXPORT REPLICA` then confirms the trees identical (or the poll goes on). \
             Tail: from the last close() to that moment. Identical: `imezzo verify` exit 0 at the end.\n"
        );
    }

    fn render_lag(&self, settings: &Settings, out: &mut String) {
        let _ = writeln!(
            out,
            "### Lag from close() on the server to the file on the replica\n"
        );
        let _ = writeln!(
            out,
            "| rate asked | tool | achieved | ops | p50 | p99 | max | lost | source CPU s | source peak RSS | replica CPU s | replica peak RSS |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (rate, tool, row) in &self.lag {
            match row {
                Ok(row) => {
                    let _ = writeln!(
                        out,
                        "| {} ops/s | {} | {} ops/s | {} | {} | {} | {} | {}{} | {} | {} |",
                        si(f64::from(*rate)),
                        tool.label(),
                        si(row.achieved),
                        row.stats.ops,
                        ms(row.stats.p50),
                        ms(row.stats.p99),
                        ms(row.stats.max),
                        row.stats.lost,
                        if row.overflows > 0 {
                            format!(" ({} observer overflows)", row.overflows)
                        } else {
                            String::new()
                        },
                        row.source.cells(),
                        row.replica.cells()
                    );
                }
                Err(err) => {
                    let _ = writeln!(
                        out,
                        "| {} ops/s | {} | failed: {} | | | | | | | | | |",
                        si(f64::from(*rate)),
                        tool.label(),
                        err.replace('|', "/")
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "\n(writing {} s a rate; CPU is over the writing and the wait for the last arrival)\n",
            fmt_secs(settings.seconds)
        );
    }

    fn render_throughput(&self, out: &mut String) {
        let _ = writeln!(out, "### Throughput\n");
        let _ = writeln!(
            out,
            "| data | phase | tool | time | rate | vs rsync | tail | identical | source CPU s | source peak RSS | replica CPU s | replica peak RSS | notes |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for row in &self.throughput {
            let ratio = match (row.tool.starts_with("imezzo"), self.baseline(row)) {
                (true, Some(base)) => match (row.rate(), base.rate()) {
                    (Some(rate), Some(base)) if base > 0.0 => format!("{:.2}x", rate / base),
                    _ => "-".into(),
                },
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.data.label(),
                match row.phase {
                    Phase::Initial => "initial",
                    Phase::Live => "live",
                },
                row.tool,
                row.seconds
                    .map_or_else(|| "-".into(), |s| format!("{s:.2} s")),
                row.rate_text(),
                ratio,
                row.tail.map_or_else(|| "-".into(), |s| format!("{s:.2} s")),
                row.verdict.cell(),
                row.source.cells(),
                row.replica.cells(),
                row.note.replace('|', "/")
            );
        }
        let _ = writeln!(
            out,
            "\n(vs rsync: imezzo's rate over `rsync -a`'s for the initial sync, over lsyncd's with delay = 0 \
             for the live copy)\n"
        );
    }

    /// The peer row a row is compared with: rsync for an initial sync, lsyncd for a live copy.
    fn baseline(&self, row: &ThroughputRow) -> Option<&ThroughputRow> {
        self.throughput.iter().find(|other| {
            other.phase == row.phase
                && std::mem::discriminant(&other.data) == std::mem::discriminant(&row.data)
                && !other.tool.starts_with("imezzo")
        })
    }

    fn imezzo_ratio(&self, data_is_big: bool, phase: Phase) -> Option<f64> {
        let row = self.throughput.iter().find(|row| {
            row.phase == phase
                && matches!(row.data, Data::Big { .. }) == data_is_big
                && row.tool.starts_with("imezzo")
        })?;
        let base = self.baseline(row)?;
        Some(row.rate()? / base.rate()?)
    }

    fn render_targets(&self, settings: &Settings, out: &mut String) {
        let _ = writeln!(out, "### Targets (issues 4 and 10)\n");
        let _ = writeln!(out, "| target | measured | met? |");
        let _ = writeln!(out, "| --- | --- | --- |");
        let lag = self.lag.iter().find_map(|(rate, tool, row)| match row {
            Ok(row) if *rate == 1000 && *tool == Tool::Imezzo => Some(row),
            _ => None,
        });
        match lag {
            Some(row) => {
                let met = row.stats.lost == 0
                    && row
                        .stats
                        .p99
                        .is_some_and(|p99| p99 <= Duration::from_millis(10));
                let _ = writeln!(
                    out,
                    "| lag p99 at most 10 ms at 1 000 ops/s on loopback | p99 {} (p50 {}, {} lost, {} ops/s achieved) | {} |",
                    ms(row.stats.p99),
                    ms(row.stats.p50),
                    row.stats.lost,
                    si(row.achieved),
                    yes_no(met)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "| lag p99 at most 10 ms at 1 000 ops/s on loopback | not measured in this run | - |"
                );
            }
        }
        let big = Data::Big {
            mib: settings.big_mib,
        };
        let small = Data::Small {
            files: settings.small_files,
        };
        for (big, wanted, what) in [
            (
                true,
                1.5,
                format!("{}: at least 1.5x rsync's rate", big.label()),
            ),
            (
                false,
                2.0,
                format!("{}: at least 2x rsync's rate", small.label()),
            ),
        ] {
            let initial = self.imezzo_ratio(big, Phase::Initial);
            let live = self.imezzo_ratio(big, Phase::Live);
            let measured = match (initial, live) {
                (None, None) => "not measured in this run".to_string(),
                _ => format!(
                    "initial sync {} rsync -a; live {} lsyncd (delay = 0)",
                    initial.map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                    live.map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                ),
            };
            let met = initial.map_or("-", |r| yes_no(r >= wanted));
            let _ = writeln!(out, "| {what} | {measured} | {met} (initial sync) |");
        }
        match &self.million {
            Some(million) => {
                let bytes = million.server_hwm_synced.map(|kib| kib * 1024);
                let met = bytes.map_or("-", |b| yes_no(b <= 150_000_000));
                let scale = if million.files >= 1_000_000 {
                    String::new()
                } else {
                    format!(" (only {} files in this run)", million.files)
                };
                let _ = writeln!(
                    out,
                    "| server agent memory at most 150 MB with 1 M files exported | peak RSS {} MB after a client's initial sync{scale} | {met} |",
                    bytes.map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / 1e6)),
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "| server agent memory at most 150 MB with 1 M files exported | not measured in this run | - |"
                );
            }
        }
        let _ = writeln!(out, "{}", pages_target(self.pages.as_ref()));
    }
}

fn render_pages(pages: &Pages, out: &mut String) {
    let _ = writeln!(out, "### {}\n", pages_heading(pages.mib));
    let _ = writeln!(
        out,
        "The export holds one {size} file of incompressible bytes (the throughput rows' data). Each \
         round starts each tool afresh on a fresh replica tmpfs that holds a copy of the file: imezzo's \
         client brings it by its initial sync, and the bench waits until `imezzo verify EXPORT REPLICA` \
         exits 0; for rsync and lsyncd the bench copies it into the daemon's module (content, mode, \
         nanosecond mtime, and the root's mtime) and `imezzo verify` exits 0. Then the bench opens the \
         export's file without truncating it, pwrites {writes} pages of 4 KiB of new random bytes at \
         distinct page offsets drawn from a seed (one of its own per round and tool), and closes it. \
         imezzo's and lsyncd's time runs from the first pwrite to the moment the replica's file holds \
         every written page's new bytes and the export's size and mtime (the bench preads just those \
         pages, about every {poll} ms). rsync's runs from the first pwrite to the exit of \
         `rsync --inplace --no-whole-file --modify-window=-1 -a EXPORT/{file} rsync://127.0.0.1:P/replica/`, \
         run once the file is closed: rsync's delta transfer, in which the receiver sends checksums of its \
         copy's blocks, the sender rolls a checksum over its whole file to find the changed ones, and only \
         those travel and are written in place (`--modify-window=-1`, as for lsyncd: without it a change \
         made within the second of the module's copy would pass rsync's quick check and be skipped). \
         lsyncd: as in the lag rows with `delay = 0`, its rsync also given `--inplace --no-whole-file`; \
         it starts an rsync of the file when the close arrives. Identical: `imezzo verify` exit 0 \
         afterwards, in every round. CPU over that phase: imezzo's from the run times of each agent's \
         threads (`/proc/PID/task/*/schedstat`, nanoseconds: the phase is shorter than a clock tick of \
         `/proc/PID/stat`); rsync's from the command's `wait4` usage, lsyncd's and the daemon's from \
         `/proc/PID/stat` before the change to `wait4` at their exit (the rsyncs they fork included). \
         Peak RSS: over each process's life, imezzo's initial sync of the file included. First page: \
         when a poll first found one of the pages on imezzo's replica. Server read: what imezzo's server \
         read over the phase (`rchar` of `/proc/PID/io`), the pages it read to answer the client's \
         fetches among it. {rounds} rounds, imezzo, rsync and lsyncd in turn in each; median and range \
         over them.\n",
        size = size_text(pages.mib),
        writes = pages::WRITES,
        poll = PAGES_POLL.as_millis(),
        file = trees::BIG_FILE,
        rounds = PAGES_ROUNDS,
    );
    let _ = writeln!(
        out,
        "| tool | time to identical (median, min–max) | vs rsync | identical | source CPU s | source peak RSS | replica CPU s | replica peak RSS | notes |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for row in &pages.rows {
        let done: Vec<&PagesRound> = row.done().collect();
        let time = row.seconds().map_or_else(
            || "failed".into(),
            |spread| {
                format!(
                    "{} ({}–{})",
                    seconds_text(spread.median),
                    seconds_text(spread.min),
                    seconds_text(spread.max)
                )
            },
        );
        let versus = match (row.tool, pages.imezzo_faster()) {
            (PagesTool::Imezzo, Some(ratio)) => faster_text(ratio),
            _ => "-".into(),
        };
        let identical = done
            .iter()
            .filter(|round| round.verdict == Verdict::Identical)
            .count();
        let identical = if identical == row.rounds.len() {
            format!("yes ({identical} of {})", row.rounds.len())
        } else {
            format!("{identical} of {} rounds", row.rounds.len())
        };
        let cpu = |side: fn(&PagesRound) -> Cost| {
            Spread::of(done.iter().filter_map(|round| side(round).cpu))
                .map_or_else(|| "-".into(), |spread| format!("{:.3}", spread.median))
        };
        let peak = |side: fn(&PagesRound) -> Cost| {
            mib(done.iter().filter_map(|round| side(round).peak_kib).max())
        };
        let mut notes = Vec::new();
        if let Some(first) = Spread::of(done.iter().filter_map(|round| round.first_page)) {
            notes.push(format!(
                "first page on the replica after {} (median)",
                seconds_text(first.median)
            ));
        }
        if let Some(read) = Spread::of(
            done.iter()
                .filter_map(|round| round.server_read.map(|bytes| bytes as f64)),
        ) {
            notes.push(format!(
                "server read {} (median)",
                bytes_text(read.median as u64)
            ));
        }
        for (index, round) in row.rounds.iter().enumerate() {
            match round {
                Err(err) => notes.push(format!("round {} failed: {err}", index + 1)),
                Ok(round) if round.verdict != Verdict::Identical => notes.push(format!(
                    "round {}: verify: {}",
                    index + 1,
                    match &round.verdict {
                        Verdict::Differs(head) => head.clone(),
                        verdict => verdict.cell(),
                    }
                )),
                Ok(_) => {}
            }
        }
        let _ = writeln!(
            out,
            "| {} | {time} | {versus} | {identical} | {} | {} | {} | {} | {} |",
            row.tool.label(),
            cpu(|round| round.source),
            peak(|round| round.source),
            cpu(|round| round.replica),
            peak(|round| round.replica),
            notes.join("; ").replace('|', "/")
        );
    }
    let _ = writeln!(
        out,
        "\n(vs rsync: rsync's median time over imezzo's; CPU: median over the rounds; peak RSS: the \
         largest)\n"
    );
}

/// A time of the pages rows, in ms below a second.
fn seconds_text(seconds: f64) -> String {
    ms(Some(Duration::from_secs_f64(seconds)))
}

/// How much faster imezzo was, from rsync's time over imezzo's.
fn faster_text(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.0}x faster")
    } else if ratio >= 1.0 {
        format!("{ratio:.1}x faster")
    } else {
        format!("{:.1}x slower", 1.0 / ratio)
    }
}

/// The Targets table's row of issue 10's first target.
fn pages_target(pages: Option<&Pages>) -> String {
    let what = format!(
        "{} random 4 KiB writes into 1 GiB: identical within {} ms and at least {PAGES_FASTER:.0}x faster than rsync's delta transfer",
        pages::WRITES,
        PAGES_WITHIN.as_millis()
    );
    let Some(pages) = pages else {
        return format!("| {what} | not measured in this run | - |");
    };
    let row = pages.row(PagesTool::Imezzo);
    let Some(imezzo) = row.and_then(PagesRow::seconds) else {
        return format!("| {what} | imezzo did not complete a round | no |");
    };
    let all_identical = row
        .into_iter()
        .flat_map(|row| &row.rounds)
        .all(|round| {
            round
                .as_ref()
                .is_ok_and(|r| r.verdict == Verdict::Identical)
        });
    let faster = pages.imezzo_faster();
    let met = imezzo.median <= PAGES_WITHIN.as_secs_f64()
        && faster.is_some_and(|ratio| ratio >= PAGES_FASTER)
        && all_identical;
    let scale = if pages.mib == 1024 {
        String::new()
    } else {
        format!(" (a {} file in this run)", size_text(pages.mib))
    };
    format!(
        "| {what} | imezzo {} (median; max {}), rsync's delta transfer {}: {}{}{scale} | {} |",
        seconds_text(imezzo.median),
        seconds_text(imezzo.max),
        pages
            .median(PagesTool::RsyncDelta)
            .map_or_else(|| "-".into(), seconds_text),
        faster.map_or_else(|| "-".into(), faster_text),
        if all_identical {
            ""
        } else {
            "; not identical in every round"
        },
        yes_no(met)
    )
}

fn render_million(million: &Million, out: &mut String) {
    let _ = writeln!(out, "### {} files exported\n", million.files);
    let _ = writeln!(
        out,
        "{} empty files in {} directories on a tmpfs (created in {:.1} s by the bench). The server starts \
         on them (ready after {:.1} s); then a client makes its initial sync into an empty replica; then \
         `rsync -a` copies the same tree into an empty daemon module.\n",
        million.files,
        trees::MILLION_DIRS,
        million.create_seconds,
        million.server_start_seconds
    );
    let _ = writeln!(
        out,
        "| side | time | CPU s | peak RSS | identical |\n| --- | --- | --- | --- | --- |"
    );
    let _ = writeln!(
        out,
        "| imezzo server, once ready | {:.1} s to ready | - | {} | - |",
        million.server_start_seconds,
        mib(million.server_hwm_ready)
    );
    let _ = writeln!(
        out,
        "| imezzo server, after the client's initial sync | - | {} | {} | - |",
        million
            .server_cpu
            .map_or_else(|| "-".into(), |c| format!("{c:.2}")),
        mib(million.server_hwm_synced)
    );
    let _ = writeln!(
        out,
        "| imezzo client, initial sync | {:.1} s | {} | {} | {} |",
        million.sync_seconds,
        million
            .client_cpu
            .map_or_else(|| "-".into(), |c| format!("{c:.2}")),
        mib(million.client_peak),
        million.verdict.cell()
    );
    if let Some(rsync) = &million.rsync {
        let _ = writeln!(
            out,
            "| rsync -a (sender) | {} | {} | {} |",
            rsync
                .seconds
                .map_or_else(|| "failed".into(), |s| format!("{s:.1} s")),
            rsync.sender.cells(),
            rsync.verdict.cell()
        );
        let _ = writeln!(
            out,
            "| rsync daemon (receiver) | - | {} | - |",
            rsync.daemon.cells()
        );
    }
    let _ = writeln!(
        out,
        "\n(server CPU: its whole life, start-up walk included; peak RSS: VmHWM)\n"
    );
}

fn fmt_secs(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 {
        format!("{seconds:.0}")
    } else {
        format!("{seconds}")
    }
}

pub(super) fn lsyncd_version() -> String {
    let Some(lsyncd) = exec::find_program("lsyncd") else {
        return String::new();
    };
    exec::query(Command::new(lsyncd).arg("--version"))
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| line.strip_prefix("Version:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(seconds: f64, verdict: Verdict) -> Result<PagesRound, String> {
        Ok(PagesRound {
            seconds,
            source: Cost {
                cpu: Some(0.004),
                peak_kib: Some(20 * 1024),
            },
            replica: Cost {
                cpu: Some(0.012),
                peak_kib: Some(30 * 1024),
            },
            verdict,
            server_read: Some(1 << 20),
            first_page: Some(seconds / 2.0),
        })
    }

    fn pages(mib: u64, imezzo: Vec<Result<PagesRound, String>>, rsync: &[f64]) -> Pages {
        Pages {
            mib,
            rows: vec![
                PagesRow {
                    tool: PagesTool::Imezzo,
                    rounds: imezzo,
                },
                PagesRow {
                    tool: PagesTool::RsyncDelta,
                    rounds: rsync
                        .iter()
                        .map(|&s| {
                            round(s, Verdict::Identical).map(|round| PagesRound {
                                server_read: None,
                                first_page: None,
                                ..round
                            })
                        })
                        .collect(),
                },
            ],
        }
    }

    #[test]
    fn pages_is_a_part_of_its_own_and_runs_by_default() {
        assert!(Part::ALL.contains(&Part::Pages));
        assert_eq!(Part::Pages.to_string(), "pages");
        assert_eq!(
            Part::from_str("pages", false),
            Ok(Part::Pages),
            "the CLI name"
        );
    }

    #[test]
    fn spread_is_median_and_range() {
        let spread = Spread::of([0.03, 0.01, 0.02].into_iter()).unwrap();
        assert_eq!(
            spread,
            Spread {
                median: 0.02,
                min: 0.01,
                max: 0.03
            }
        );
        assert_eq!(Spread::of(std::iter::empty()), None);
    }

    #[test]
    fn faster_is_rsync_time_over_imezzo_time() {
        assert_eq!(faster_text(85.4), "85x faster");
        assert_eq!(faster_text(2.54), "2.5x faster");
        assert_eq!(faster_text(0.5), "2.0x slower");
        assert_eq!(ratio(2.0, 0.02), Some(100.0));
        assert_eq!(ratio(2.0, 0.0), None);
    }

    #[test]
    fn pages_heading_names_the_file_size() {
        assert_eq!(
            pages_heading(1024),
            "256 random 4 KiB writes into a 1 GiB file"
        );
        assert_eq!(
            pages_heading(64),
            "256 random 4 KiB writes into a 64 MiB file"
        );
    }

    #[test]
    fn pages_target_is_met_within_50_ms_and_20x() {
        let fast = pages(
            1024,
            vec![
                round(0.020, Verdict::Identical),
                round(0.030, Verdict::Identical),
                round(0.060, Verdict::Identical),
            ],
            &[1.5, 2.0, 2.5],
        );
        let row = pages_target(Some(&fast));
        assert_eq!(
            row,
            "| 256 random 4 KiB writes into 1 GiB: identical within 50 ms and at least 20x faster than \
             rsync's delta transfer | imezzo 30.0 ms (median; max 60.0 ms), rsync's delta transfer \
             2.00 s: 67x faster | yes |"
        );

        let slow = pages(1024, vec![round(0.080, Verdict::Identical)], &[10.0]);
        assert!(
            pages_target(Some(&slow)).ends_with("125x faster | no |"),
            "over 50 ms"
        );

        let close = pages(1024, vec![round(0.010, Verdict::Identical)], &[0.1]);
        assert!(
            pages_target(Some(&close)).ends_with("10x faster | no |"),
            "under 20x"
        );

        let differs = pages(
            1024,
            vec![
                round(0.010, Verdict::Identical),
                round(0.010, Verdict::Differs("differs: big.bin".into())),
            ],
            &[2.0],
        );
        assert!(pages_target(Some(&differs)).ends_with("not identical in every round | no |"));

        let small = pages(64, vec![round(0.010, Verdict::Identical)], &[0.5]);
        assert!(pages_target(Some(&small)).contains("(a 64 MiB file in this run) | yes |"));

        assert!(pages_target(None).ends_with("| not measured in this run | - |"));
        let failed = pages(1024, vec![Err("boom".into())], &[2.0]);
        assert!(pages_target(Some(&failed)).ends_with("| imezzo did not complete a round | no |"));
    }

    #[test]
    fn pages_table_has_a_row_per_tool_with_failures_in_its_notes() {
        let pages = pages(
            1024,
            vec![
                round(0.020, Verdict::Identical),
                Err("the replica did not hold the change within 60 s".into()),
                round(0.040, Verdict::Identical),
            ],
            &[2.0, 1.0, 3.0],
        );
        let mut out = String::new();
        render_pages(&pages, &mut out);
        assert!(out.starts_with("### 256 random 4 KiB writes into a 1 GiB file\n\n"));
        assert!(out.contains(
            "`rsync --inplace --no-whole-file --modify-window=-1 -a EXPORT/big.bin rsync://127.0.0.1:P/replica/`"
        ));
        let rows: Vec<&str> = out
            .lines()
            .filter(|line| line.starts_with("| ") && !line.starts_with("| ---"))
            .collect();
        assert_eq!(rows.len(), 3, "header and two tools:\n{out}");
        assert_eq!(
            rows[1],
            "| imezzo server + client | 30.0 ms (20.0 ms–40.0 ms) | 67x faster | 2 of 3 rounds | 0.004 | \
             20.0 MiB | 0.012 | 30.0 MiB | first page on the replica after 15.0 ms (median); server read \
             1.00 MiB (median); round 2 failed: the replica did not hold the change within 60 s |"
        );
        assert_eq!(
            rows[2],
            "| rsync --inplace --no-whole-file --modify-window=-1 -a to rsyncd | 2.00 s (1.00 s–3.00 s) | - | yes (3 of 3) | \
             0.004 | 20.0 MiB | 0.012 | 30.0 MiB |  |"
        );
    }
}
