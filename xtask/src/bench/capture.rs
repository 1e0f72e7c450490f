//! `cargo xtask bench capture`: what watching a tree costs the processes writing to it.
//!
//! Each workload runs with no watcher, under `imezzo capture`, under `inotifywait -m -r` and under
//! `fatrace -c` (fanotify), each run on its own fresh tmpfs. Every round runs every pair, in an
//! order rotated from round to round, and a watcher's ratio is taken against the no-watcher run of
//! the same round, so that drift of the machine during the bench cancels out.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{value_parser, Args};

use super::{
    median, si,
    watcher::{self, Seen, Watcher},
    workload::{self, Measured, Workload},
};
use crate::{exec, tmpfs::TmpfsDir, workspace::Workspace};

#[derive(Args)]
pub struct CaptureArgs {
    /// Number of 4 KiB pwrites in the fio workload.
    #[arg(long, default_value_t = 200_000, value_parser = value_parser!(u64).range(1..))]
    pwrites: u64,
    /// Number of files in the small-file workload.
    #[arg(long, default_value_t = 50_000, value_parser = value_parser!(u64).range(1..))]
    files: u64,
    /// Rounds; each runs every workload under every watcher once. Medians are reported.
    #[arg(long, default_value_t = 3, value_parser = value_parser!(u32).range(1..))]
    rounds: u32,
}

/// One workload run under one watcher.
struct Sample {
    round: u32,
    workload: usize,
    watcher: Watcher,
    measured: Measured,
    seen: Option<Seen>,
}

pub fn run(workspace: &Workspace, imezzo: &Path, args: &CaptureArgs) -> Result<String> {
    check_memory(args.pwrites)?;
    let (workload_programs, watcher_programs) = programs(workspace, imezzo)?;
    let workloads = [
        Workload::Pwrite {
            count: args.pwrites,
        },
        Workload::SmallFiles { count: args.files },
    ];

    let mut samples = Vec::new();
    for round in 0..args.rounds {
        println!(
            "xtask: bench capture: round {} of {}",
            round + 1,
            args.rounds
        );
        for (index, &workload) in workloads.iter().enumerate() {
            for turn in 0..Watcher::ALL.len() {
                let watcher = Watcher::ALL[(turn + round as usize) % Watcher::ALL.len()];
                exec::bail_if_interrupted()?;
                let (measured, seen) =
                    measure(workload, watcher, &workload_programs, &watcher_programs)
                        .with_context(|| {
                            format!(
                                "round {}: {} under {}",
                                round + 1,
                                workload.label(),
                                watcher.label()
                            )
                        })?;
                println!(
                    "xtask: bench capture: {} under {}: {} {} in {:.2} s",
                    workload.label(),
                    watcher.label(),
                    si(measured.rate),
                    workload.unit(),
                    measured.wall.as_secs_f64()
                );
                samples.push(Sample {
                    round,
                    workload: index,
                    watcher,
                    measured,
                    seen,
                });
            }
        }
    }
    Ok(render(&workloads, &samples))
}

/// One workload under one watcher on a fresh tmpfs.
fn measure(
    workload: Workload,
    watcher: Watcher,
    workload_programs: &workload::Programs,
    watcher_programs: &watcher::Programs,
) -> Result<(Measured, Option<Seen>)> {
    // Declared first so that it is dropped (unmounted) after the watcher has stopped.
    let dir = TmpfsDir::mount("imezzo-bench")?;
    let mut running = watcher::start(watcher, watcher_programs, dir.path())?;
    let measured = workload.run(workload_programs, dir.path())?;
    let seen = match running.as_mut() {
        Some(running) => Some(running.stop()?),
        None => None,
    };
    Ok((measured, seen))
}

fn programs(
    workspace: &Workspace,
    imezzo: &Path,
) -> Result<(workload::Programs, watcher::Programs)> {
    // The small-file workload is a binary of this crate, built optimised like the agent.
    exec::run(workspace.cargo().args([
        "build",
        "--release",
        "-p",
        "xtask",
        "--bin",
        "imezzo-workload",
    ]))
    .context("could not build the imezzo-workload binary")?;
    let find = |name: &str| {
        exec::find_program(name)
            .with_context(|| format!("{name} is not installed: run `cargo xtask deps` (as root)"))
    };
    Ok((
        workload::Programs {
            fio: find("fio")?,
            small_files: workspace.release_bin("imezzo-workload"),
        },
        watcher::Programs {
            imezzo: imezzo.to_path_buf(),
            inotifywait: find("inotifywait")?,
            fatrace: find("fatrace")?,
        },
    ))
}

/// The fio file lives in RAM, on a tmpfs that may take at most half of it by default.
fn check_memory(pwrites: u64) -> Result<()> {
    let needed_kib = pwrites.saturating_mul(4);
    let available_kib = super::meminfo_kib("MemAvailable");
    if let Some(available_kib) = available_kib {
        if needed_kib > available_kib / 2 {
            bail!(
                "--pwrites {pwrites} writes {} MiB to a tmpfs, more than half of the {} MiB of available memory: \
                 choose a smaller --pwrites",
                needed_kib / 1024,
                available_kib / 1024
            );
        }
    }
    Ok(())
}

fn render(workloads: &[Workload], samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Each workload runs as its own process on a fresh tmpfs under /tmp, with no watcher, under \
         `imezzo capture --root DIR --json` (stdout counted, started once it logs `capture ready`), \
         `inotifywait -m -r DIR` (once it reports `Watches established`) and `fatrace -c` \
         (fanotify mount mark, cwd in DIR, 0.5 s to start), and under `imezzo capture --empty-probe`, \
         which attaches only an empty program where imezzo's probes hook every syscall's exit and \
         journals nothing: the floor any eBPF capture pays (the `sys_exit` tracepoint enabled, a \
         program call per syscall). Watchers stop on SIGINT once their output \
         settles. Rate: the workload's own measure (fio's write IOPS; imezzo-workload's create, write, \
         rename and unlink operations a second), median over rounds. vs none: median over rounds of \
         the ratio to the no-watcher run of the same round. Events: imezzo's own count from its exit \
         summary, one output line an event for the others, per second of the workload's wall time. \
         Drops: imezzo's `drops=`, inotify's queue overflows (`Q_OVERFLOW` lines); fatrace reports none. \
         Peak RSS: VmHWM of the watcher just before it was stopped.\n"
    );
    let _ = writeln!(
        out,
        "| workload | watcher | rate | vs none | events | events/s | drops | peak RSS | notes |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let ratio_in_round = |round: u32, workload: usize, watcher: Watcher| {
        let rate = |watcher: Watcher| {
            samples
                .iter()
                .find(|s| s.round == round && s.workload == workload && s.watcher == watcher)
                .map(|s| s.measured.rate)
        };
        let baseline = rate(Watcher::None)?;
        (baseline > 0.0).then(|| rate(watcher).map(|r| r / baseline))?
    };
    for (index, workload) in workloads.iter().enumerate() {
        for watcher in Watcher::ALL {
            let runs: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == index && s.watcher == watcher)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let rate = median(&mut runs.iter().map(|s| s.measured.rate).collect::<Vec<_>>());
            let ratio = median(
                &mut runs
                    .iter()
                    .filter_map(|s| ratio_in_round(s.round, index, watcher))
                    .collect::<Vec<_>>(),
            );
            let seen: Vec<(&Seen, Duration)> = runs
                .iter()
                .filter_map(|s| s.seen.as_ref().map(|seen| (seen, s.measured.wall)))
                .collect();
            let events = median(
                &mut seen
                    .iter()
                    .filter_map(|(s, _)| s.events.map(|e| e as f64))
                    .collect::<Vec<_>>(),
            );
            let events_per_sec = median(
                &mut seen
                    .iter()
                    .filter_map(|(s, wall)| Some(s.events? as f64 / wall.as_secs_f64().max(1e-9)))
                    .collect::<Vec<_>>(),
            );
            let drops = seen.iter().filter_map(|(s, _)| s.drops).max();
            let peak_rss = seen.iter().filter_map(|(s, _)| s.peak_rss_kib).max();
            // Notes carry counts of one run: those of the last round.
            let notes = seen
                .last()
                .map(|(s, _)| s.notes.clone())
                .unwrap_or_default();
            let dash = || "-".to_string();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                workload.label(),
                watcher.label(),
                rate.map_or_else(dash, |r| format!("{} {}", si(r), workload.unit())),
                ratio.map_or_else(dash, |r| format!("{r:.2}")),
                events.map_or_else(dash, si),
                events_per_sec.map_or_else(dash, si),
                drops.map_or_else(dash, |d| d.to_string()),
                peak_rss.map_or_else(dash, |kib| format!("{:.1} MiB", kib as f64 / 1024.0)),
                notes.join("; ").replace('|', "/"),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nimezzo above the floor: in each round, the empty probe's ratio to the no-watcher run \
         minus imezzo's, in points; median and range over rounds.\n"
    );
    for (index, workload) in workloads.iter().enumerate() {
        let mut points: Vec<f64> = samples
            .iter()
            .filter(|s| s.workload == index && s.watcher == Watcher::None)
            .filter_map(|s| {
                let floor = ratio_in_round(s.round, index, Watcher::EmptyProbe)?;
                let imezzo = ratio_in_round(s.round, index, Watcher::Imezzo)?;
                Some(100.0 * (floor - imezzo))
            })
            .collect();
        let low = points.iter().copied().fold(f64::INFINITY, f64::min);
        let high = points.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = match median(&mut points) {
            Some(mid) => writeln!(
                out,
                "- {}: {mid:.1} points ({low:.1} to {high:.1})",
                workload.label()
            ),
            None => writeln!(out, "- {}: not measured", workload.label()),
        };
    }
    out
}
