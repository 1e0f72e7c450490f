//! The differential tester's helper binary.
//!
//! * `imezzo-differential worker ...`: one worker process of a run (started by the harness;
//!   see `imezzo_tests::differential::worker_main`).
//! * `imezzo-differential run [--seed N] [--fs tmpfs|ext4|xfs|btrfs] [--faults LIST]
//!   [--ops N] [--workers N] [--shrink]`: one whole run, as root, with the agent binary from
//!   $IMEZZO_BIN; prints `seed N: ok ...` or the failure report and exits 1. The IMEZZO_*
//!   variables apply first, the flags win. This is what `cargo xtask soak` loops over.

use imezzo_tests::differential::{self, Config, Fault};
use imezzo_tests::FsKind;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("worker") => std::process::exit(differential::worker_main(&args[2..])),
        Some("run") => std::process::exit(run(&args[2..])),
        _ => {
            eprintln!(
                "usage: imezzo-differential run [--seed N] [--fs tmpfs|ext4|xfs|btrfs] \
                 [--faults none|all|kill-server,kill-client,kill-both,cut,full] [--ops N] \
                 [--workers N] [--shrink]\n       imezzo-differential worker ... (internal)"
            );
            std::process::exit(2);
        }
    }
}

fn run(args: &[String]) -> i32 {
    let me = std::env::current_exe().expect("current_exe");
    let mut cfg = Config::new(0, FsKind::Tmpfs, &[], &me).with_env(true);
    let mut i = 0;
    while i < args.len() {
        let val = || {
            args.get(i + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--seed" => cfg.seed = val().parse().expect("--seed"),
            "--fs" => cfg.fs = FsKind::parse(&val()).expect("--fs: tmpfs, ext4, xfs or btrfs"),
            "--faults" => cfg.faults = Fault::parse_list(&val()).expect("--faults"),
            "--ops" => cfg.ops = val().parse().expect("--ops"),
            "--workers" => cfg.workers = val().parse().expect("--workers"),
            "--shrink" => {
                cfg.shrink = true;
                i += 1;
                continue;
            }
            a => panic!("unknown argument {a:?}"),
        }
        i += 2;
    }
    match differential::run(&cfg) {
        Ok(p) => {
            println!(
                "seed {} ({}, faults {}): ok: converged {:.1?} after the workload, {}/{} operations \
                 succeeded, {} agent log lines, {:.1?} in all",
                cfg.seed,
                cfg.fs.name(),
                Fault::list_name(&cfg.faults),
                p.converged_after,
                p.ops_ok,
                p.ops_total,
                p.agent_log_lines,
                p.wall
            );
            0
        }
        Err(f) => {
            println!("{}", f.report);
            1
        }
    }
}
