//! `imezzo-workload`: file-system workloads for `cargo xtask bench`, each run as its own process so
//! that a benchmark times the workload under a watcher and nothing of the harness.
//!
//! Prints one line of `key=value` fields on stdout, which xtask parses.

use std::{
    fs::{self, File},
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "imezzo-workload",
    about = "File-system workloads for cargo xtask bench"
)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// For each of N files: create d<i%100>/f<i>, write 4 KiB, close, rename it to d<i%100>/g<i>,
    /// and unlink every other one. Counts create, write, rename and unlink as one operation each.
    SmallFiles {
        /// Directory to work in (the 100 subdirectories are made before the clock starts).
        #[arg(long)]
        dir: PathBuf,
        /// Number of files.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        files: u64,
    },
}

const DIRS: u64 = 100;

fn main() -> ExitCode {
    match Cli::parse().workload {
        Workload::SmallFiles { dir, files } => match small_files(&dir, files) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("imezzo-workload: error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn small_files(dir: &std::path::Path, files: u64) -> Result<()> {
    for d in 0..DIRS.min(files) {
        let sub = dir.join(format!("d{d}"));
        fs::create_dir(&sub).with_context(|| format!("could not create {}", sub.display()))?;
    }
    let block = [0x5a_u8; 4096];
    let mut ops = 0_u64;
    let start = Instant::now();
    for i in 0..files {
        let sub = dir.join(format!("d{}", i % DIRS));
        let created = sub.join(format!("f{i}"));
        let renamed = sub.join(format!("g{i}"));
        let mut file = File::create(&created)
            .with_context(|| format!("could not create {}", created.display()))?;
        file.write_all(&block)
            .with_context(|| format!("could not write {}", created.display()))?;
        drop(file);
        fs::rename(&created, &renamed).with_context(|| {
            format!(
                "could not rename {} to {}",
                created.display(),
                renamed.display()
            )
        })?;
        ops += 3;
        if i % 2 == 1 {
            fs::remove_file(&renamed)
                .with_context(|| format!("could not unlink {}", renamed.display()))?;
            ops += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "files={files} ops={ops} seconds={seconds:.6} files_per_sec={:.0} ops_per_sec={:.0}",
        files as f64 / seconds,
        ops as f64 / seconds
    );
    Ok(())
}
