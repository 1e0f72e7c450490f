//! The writers whose speed a watcher slows down. Each runs as its own child process.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::numeric_fields;
use crate::exec;

#[derive(Clone, Copy)]
pub enum Workload {
    /// fio: `count` sequential 4 KiB pwrites to one file (psync, one job, buffered).
    Pwrite { count: u64 },
    /// imezzo-workload small-files: `count` files created, written, renamed, half unlinked.
    SmallFiles { count: u64 },
}

/// The programs the workloads run.
pub struct Programs {
    pub fio: PathBuf,
    pub small_files: PathBuf,
}

pub struct Measured {
    /// In the workload's unit (see [`Workload::unit`]), as the workload itself measured it.
    pub rate: f64,
    /// Wall time of the child process, start to exit.
    pub wall: Duration,
}

impl Workload {
    pub fn label(self) -> String {
        match self {
            Workload::Pwrite { count } => format!("4 KiB pwrite x {count} (fio)"),
            Workload::SmallFiles { count } => format!("small files x {count}"),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::Pwrite { .. } => "IOPS",
            Workload::SmallFiles { .. } => "ops/s",
        }
    }

    pub fn run(self, programs: &Programs, dir: &Path) -> Result<Measured> {
        let mut cmd = match self {
            Workload::Pwrite { count } => {
                let mut cmd = Command::new(&programs.fio);
                cmd.arg("--name=w")
                    .arg(format!("--filename={}", dir.join("f").display()))
                    .args(["--rw=write", "--bs=4k"])
                    .arg(format!("--size={}", count * 4096))
                    .args([
                        "--ioengine=psync",
                        "--numjobs=1",
                        "--direct=0",
                        "--output-format=json",
                    ]);
                cmd
            }
            Workload::SmallFiles { count } => {
                let mut cmd = Command::new(&programs.small_files);
                cmd.arg("small-files")
                    .arg("--dir")
                    .arg(dir)
                    .arg(format!("--files={count}"));
                cmd
            }
        };
        let start = Instant::now();
        let out = exec::output(&mut cmd)?;
        let wall = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}{}",
                exec::describe(&cmd),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let rate = match self {
            Workload::Pwrite { .. } => fio_write_iops(&stdout)?,
            Workload::SmallFiles { .. } => numeric_fields(&stdout)
                .into_iter()
                .find_map(|(key, value)| (key == "ops_per_sec").then_some(value))
                .with_context(|| format!("imezzo-workload printed no ops_per_sec: {stdout:?}"))?,
        };
        Ok(Measured { rate, wall })
    }
}

fn fio_write_iops(stdout: &str) -> Result<f64> {
    // fio may print notes before the JSON document.
    let json = stdout.find('{').map_or(stdout, |start| &stdout[start..]);
    let report: serde_json::Value = serde_json::from_str(json)
        .context("fio did not print a JSON report (--output-format=json)")?;
    report["jobs"][0]["write"]["iops"]
        .as_f64()
        .context("fio's JSON report has no jobs[0].write.iops")
}

#[cfg(test)]
mod tests {
    #[test]
    fn fio_iops_is_read_after_leading_notes() {
        let out = "note: something\n{\"jobs\": [{\"write\": {\"iops\": 1234.5}}]}\n";
        assert_eq!(super::fio_write_iops(out).ok(), Some(1234.5));
    }
}
