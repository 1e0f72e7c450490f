//! `cargo xtask bench <name>`: measurements that compare imezzo with its peers side by side in one
//! run, print a markdown table, and write it as the bench's own section of docs/benchmarks.md.
//!
//! To add a bench: a variant of [`Bench`] with its arguments, a module returning the section body,
//! and its heading in [`Bench::heading`].

mod capture;
mod database;
mod replicate;
mod watcher;
mod workload;

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::{build, deps, exec, workspace::Workspace};

#[derive(Subcommand)]
pub enum Bench {
    /// What watching a tree costs a writer: fio pwrites and a small-file storm, with no watcher,
    /// `imezzo capture`, inotifywait and fatrace (fanotify), alternating in rounds.
    Capture(capture::CaptureArgs),
    /// Replication against rsync (daemon on loopback) and lsyncd: lag at paced operation rates,
    /// throughput of a big file and of many small files (initial sync and live), 256 random 4 KiB
    /// writes into a big file against rsync's delta transfer, CPU and memory of each side, and the
    /// server's memory with a million files exported.
    Replicate(replicate::ReplicateArgs),
    /// PostgreSQL under pgbench on a loop-mounted ext4, unwatched, replicated by imezzo and by
    /// lsyncd (delay = 0), alternating in rounds: the throughput pgbench keeps, and how soon after
    /// the database's shutdown the replica is identical (installs PostgreSQL if missing).
    Database(database::DatabaseArgs),
}

impl Bench {
    /// The `## ` heading of this bench's section in docs/benchmarks.md.
    fn heading(&self) -> &'static str {
        match self {
            Bench::Capture(_) => "Capture",
            Bench::Replicate(_) => "Replicate",
            Bench::Database(_) => "Database",
        }
    }
}

pub fn run(bench: Bench) -> Result<()> {
    deps::ensure()?;
    if let Bench::Database(_) = bench {
        deps::database()?;
    }
    exec::require_root("benchmarking (scratch tmpfs mounts, eBPF probes)")?;
    let workspace = Workspace::locate()?;
    let imezzo = build::agent(&workspace)?;
    let heading = bench.heading();
    let busy_before = other_cpu_load();
    let body = match bench {
        Bench::Capture(args) => capture::run(&workspace, &imezzo, &args)?,
        Bench::Replicate(args) => replicate::run(&imezzo, &args)?,
        Bench::Database(args) => database::run(&imezzo, &args)?,
    };
    let busy_after = other_cpu_load();
    let section = format!(
        "## {heading}\n\n{}{}\n{body}",
        provenance(&workspace),
        load_line(busy_before, busy_after)
    );
    println!("\n{section}");
    let docs = workspace.root.join("docs/benchmarks.md");
    write_section(&docs, heading, &section)?;
    println!(
        "xtask: wrote the \"## {heading}\" section of {}",
        docs.display()
    );
    Ok(())
}

/// The command line, date, machine and revision that produced a section's numbers.
fn provenance(workspace: &Workspace) -> String {
    let command: Vec<String> = std::env::args().skip(1).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel =
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into());
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|line| {
                line.strip_prefix("model name")
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory_gib = meminfo_kib("MemTotal").map_or_else(
        || "?".into(),
        |kib| format!("{:.0}", kib as f64 / 1024.0 / 1024.0),
    );
    let mut text = String::new();
    let _ = writeln!(text, "- command: `cargo xtask {}`", command.join(" "));
    let _ = writeln!(text, "- date: {}", utc_now());
    let _ = writeln!(
        text,
        "- machine: nproc {cpus} ({cpu_model}), {memory_gib} GiB RAM, kernel {}",
        kernel.trim()
    );
    let _ = writeln!(text, "- imezzo: {}", revision(workspace));
    text
}

/// How busy the CPUs were over one second, as a fraction: other work on the machine (builds,
/// tests, another agent's probes) skews every number, and this makes it visible.
fn other_cpu_load() -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((total, idle))
    }
    let (total_before, idle_before) = sample()?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (total_after, idle_after) = sample()?;
    let total = total_after.checked_sub(total_before)?;
    let idle = idle_after.checked_sub(idle_before)?;
    (total > 0).then(|| total.saturating_sub(idle) as f64 / total as f64)
}

fn load_line(before: Option<f64>, after: Option<f64>) -> String {
    let percent =
        |load: Option<f64>| load.map_or_else(|| "?".into(), |l| format!("{:.0}%", l * 100.0));
    let busy = before.into_iter().chain(after).any(|load| load > 0.1);
    if busy {
        println!(
            "xtask: warning: the CPUs were busy with other work around the bench ({} before, {} after): \
             the numbers are noisy, rerun on an idle machine",
            percent(before),
            percent(after)
        );
    }
    format!(
        "- other load: CPUs {} busy in the second before the bench, {} in the second after{}\n",
        percent(before),
        percent(after),
        if busy {
            " (busy: numbers are noisy)"
        } else {
            ""
        }
    )
}

fn revision(workspace: &Workspace) -> String {
    let mut git = std::process::Command::new("git");
    git.arg("-C")
        .arg(&workspace.root)
        .args(["describe", "--always", "--dirty", "--abbrev=12"]);
    match exec::query(&mut git) {
        Ok(out) if out.status.success() => {
            format!("commit {}", String::from_utf8_lossy(&out.stdout).trim())
        }
        _ => "working tree without a commit".into(),
    }
}

fn utc_now() -> String {
    // SAFETY: time(NULL) has no preconditions; gmtime_r writes only into the tm we pass.
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm = std::mem::zeroed::<libc::tm>();
        if libc::gmtime_r(&now, &mut tm).is_null() {
            return "unknown".into();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

/// Replaces the `## heading` section of the markdown file (up to the next `## ` heading) with
/// `section`, appends it if absent, and creates the file with an introduction if it is missing.
fn write_section(path: &Path, heading: &str, section: &str) -> Result<()> {
    let existing = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => INTRODUCTION.to_string(),
        Err(err) => return Err(err).with_context(|| format!("could not read {}", path.display())),
    };
    let updated = replace_section(&existing, heading, section);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    }
    fs::write(path, updated).with_context(|| format!("could not write {}", path.display()))
}

const INTRODUCTION: &str = "# Benchmarks\n\n\
Every number here was produced by the command printed with it, on the machine it names. \
Absolute rates differ by tens of percent between machines and runs: compare only numbers from one run, \
which is why each bench measures imezzo and its peers side by side, in alternating rounds.\n";

fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let title = format!("## {heading}");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|line| line.trim_end() == title);
    let mut out = String::new();
    let section = section.trim_end();
    match start {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|line| line.starts_with("## "))
                .map_or(lines.len(), |offset| start + 1 + offset);
            for line in &lines[..start] {
                out.push_str(line);
                out.push('\n');
            }
            out.push_str(section);
            out.push('\n');
            if end < lines.len() {
                out.push('\n');
                for line in &lines[end..] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        None => {
            out.push_str(text.trim_end());
            out.push_str("\n\n");
            out.push_str(section);
            out.push('\n');
        }
    }
    out
}

pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// 1234567.0 -> "1.23 M", 56789.0 -> "56.8 k".
pub(crate) fn si(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e9 {
        (value / 1e9, " G")
    } else if value >= 1e6 {
        (value / 1e6, " M")
    } else if value >= 1e3 {
        (value / 1e3, " k")
    } else {
        (value, "")
    };
    let digits = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else {
        2
    };
    format!("{scaled:.digits$}{suffix}")
}

/// `key=value` fields of a line such as `imezzo: capture stopped: events=12 drops=0`, tolerant
/// of punctuation around them; values that are not numbers are skipped.
pub(crate) fn numeric_fields(line: &str) -> Vec<(String, f64)> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            let key = key.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
            let value = value.trim_end_matches(|c: char| !c.is_ascii_digit());
            Some((key.to_string(), value.parse().ok()?))
        })
        .filter(|(key, _)| !key.is_empty())
        .collect()
}

/// A `/proc/meminfo` field in KiB, e.g. `meminfo_kib("MemAvailable")`.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_replaced_and_the_others_kept() {
        let text = "# Benchmarks\n\nintro\n\n## Capture\n\nold table\n\n## Replicate\n\nkept\n";
        let out = replace_section(text, "Capture", "## Capture\n\nnew table\n");
        assert_eq!(
            out,
            "# Benchmarks\n\nintro\n\n## Capture\n\nnew table\n\n## Replicate\n\nkept\n"
        );
    }

    #[test]
    fn missing_section_is_appended() {
        let out = replace_section("# Benchmarks\n\nintro\n", "Capture", "## Capture\n\nt\n");
        assert_eq!(out, "# Benchmarks\n\nintro\n\n## Capture\n\nt\n");
    }

    #[test]
    fn summary_line_fields_are_parsed_tolerantly() {
        let fields =
            numeric_fields("imezzo: capture stopped: events=123456, drops=0 rescans=2 ops=789.");
        assert_eq!(
            fields,
            vec![
                ("events".to_string(), 123456.0),
                ("drops".to_string(), 0.0),
                ("rescans".to_string(), 2.0),
                ("ops".to_string(), 789.0)
            ]
        );
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(1_234_567.0), "1.23 M");
        assert_eq!(si(56_789.0), "56.8 k");
        assert_eq!(si(12.0), "12.0");
    }
}
