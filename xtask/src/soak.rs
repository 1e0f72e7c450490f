//! `cargo xtask soak --minutes N [--faults LIST] [--fs KIND]`: the differential tester on new
//! seeds, one after another, for N minutes. Each seed is one run of the tests crate's
//! `imezzo-differential run` (a concurrent seeded workload on the export, faults at seeded
//! points, `imezzo verify` until the replica converges). A failing seed is printed with the
//! command that reruns it, and its full report is kept under target/soak/.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{build, deps, exec, workspace::Workspace};

#[derive(Args)]
pub struct SoakArgs {
    /// How long to run new seeds (a seed started before the end runs to its end).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Fault kinds: none, all, or a comma-separated list of kill-server, kill-client, kill-both,
    /// cut, full.
    #[arg(long, default_value = "none")]
    faults: String,
    /// The export's file system: tmpfs, ext4, xfs or btrfs; `mixed` cycles through all four.
    #[arg(long, default_value = "tmpfs")]
    fs: String,
    /// The first seed (default: from the clock, so that every soak explores new seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Operations per worker.
    #[arg(long, default_value_t = 300)]
    ops: usize,
}

const FILE_SYSTEMS: [&str; 4] = ["tmpfs", "ext4", "xfs", "btrfs"];

pub fn run(args: SoakArgs) -> Result<()> {
    if args.fs != "mixed" && !FILE_SYSTEMS.contains(&args.fs.as_str()) {
        bail!("--fs {}: tmpfs, ext4, xfs, btrfs or mixed", args.fs);
    }
    deps::ensure()?;
    let workspace = Workspace::locate()?;
    let imezzo = build::agent(&workspace)?;
    exec::run(workspace.cargo().args([
        "build",
        "--release",
        "-p",
        "imezzo-tests",
        "--bin",
        "imezzo-differential",
    ]))
    .context("building the differential tester failed")?;
    let tester = workspace.release_bin("imezzo-differential");
    let reports = workspace.root.join("target/soak");
    fs::create_dir_all(&reports).with_context(|| format!("mkdir {}", reports.display()))?;

    let first = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000_000 * 1000)
            .unwrap_or(0)
    });
    let end = Instant::now() + Duration::from_secs(args.minutes * 60);
    let (mut runs, mut failed) = (0u64, Vec::new());
    println!(
        "xtask: soak for {} min from seed {first}, faults {}, fs {}",
        args.minutes, args.faults, args.fs
    );
    while Instant::now() < end {
        let seed = first + runs;
        let fs = if args.fs == "mixed" {
            FILE_SYSTEMS[(runs % 4) as usize]
        } else {
            args.fs.as_str()
        };
        runs += 1;
        let out = Command::new(&tester)
            .args([
                "run",
                "--seed",
                &seed.to_string(),
                "--fs",
                fs,
                "--faults",
                &args.faults,
            ])
            .args(["--ops", &args.ops.to_string()])
            .env("IMEZZO_BIN", &imezzo)
            .output()
            .with_context(|| format!("could not start {}", tester.display()))?;
        exec::bail_if_interrupted()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            println!("xtask: {}", text.lines().next().unwrap_or("").trim());
            continue;
        }
        let report = reports.join(format!("seed-{seed}-{fs}.txt"));
        fs::write(&report, &text).with_context(|| format!("write {}", report.display()))?;
        let headline = text
            .lines()
            .find(|l| l.contains("DIFFERENTIAL FAILURE") || l.contains("panicked"))
            .unwrap_or("(no headline: see the report)")
            .trim()
            .to_string();
        println!(
            "xtask: FAILED seed {seed} on {fs}: {headline}\n       report: {}\n       rerun:  IMEZZO_SEED={seed} IMEZZO_FS={fs} IMEZZO_FAULTS={} IMEZZO_OPS={} cargo xtask test -- differential::seed_from_env",
            report.display(),
            args.faults,
            args.ops
        );
        failed.push(seed);
    }
    println!(
        "xtask: soak done: {runs} seeds, {} failed{}",
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                failed
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    if !failed.is_empty() {
        bail!("{} of {runs} seeds failed", failed.len());
    }
    Ok(())
}
