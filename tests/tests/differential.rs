//! The random differential tester in CI (issue 9): seeded concurrent workloads of every kind
//! of object and change on the server's export, with and without faults, on tmpfs, ext4, XFS
//! and btrfs exports; each run must end with a replica identical to the export (`imezzo
//! verify`) and agents that kept their stderr short. See `imezzo_tests::differential`.
//!
//! A failure prints the seed, the fault schedule, the differences, the agents' stderr, the
//! last operations and the exact command that reruns it. To rerun one seed:
//! `IMEZZO_SEED=N IMEZZO_FS=ext4 IMEZZO_FAULTS=kill-server cargo xtask test -- differential::seed_from_env`
//! (add IMEZZO_SHRINK=1 to cut the operations down). While IMEZZO_SEED is set, the fixed-seed
//! tests below leave the machine to that one.
//!
//! Budget: 25 seeds, 1 to 15 s each when the replica converges (the faulted ones spread their
//! workload over 10 s); a test stops at its first failing seed, which costs 60 s more. Two
//! tests at a time: about 2.5 min when all converge, under 9 min when every test fails.

mod differential {
    use imezzo_tests::differential::{run, Config, Fault};
    use imezzo_tests::FsKind;
    use std::path::Path;

    const HELPER: &str = env!("CARGO_BIN_EXE_imezzo-differential");

    fn check(cfg: &Config) {
        match run(cfg) {
            Ok(p) => eprintln!(
                "[differential] seed {} on {} with faults {}: converged {:.1?} after the workload; \
                 {}/{} operations succeeded; {} agent log lines; {:.1?}",
                cfg.seed,
                cfg.fs.name(),
                Fault::list_name(&cfg.faults),
                p.converged_after,
                p.ops_ok,
                p.ops_total,
                p.agent_log_lines,
                p.wall
            ),
            Err(f) => panic!("{}", f.report),
        }
    }

    /// Runs `seeds` one after another, stopping at the first failure.
    fn seeds(fs: FsKind, faults: &[Fault], seeds: &[u64]) {
        if std::env::var("IMEZZO_SEED").is_ok_and(|v| !v.trim().is_empty()) {
            eprintln!("IMEZZO_SEED is set: only differential::seed_from_env runs a seed");
            return;
        }
        for &seed in seeds {
            check(&Config::new(seed, fs, faults, Path::new(HELPER)).with_env(false));
        }
    }

    #[test]
    fn tmpfs_replica_converges_without_faults() {
        seeds(FsKind::Tmpfs, &[], &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn ext4_replica_converges_without_faults() {
        seeds(FsKind::Ext4, &[], &[11, 12, 13]);
    }

    #[test]
    fn xfs_replica_converges_without_faults() {
        seeds(FsKind::Xfs, &[], &[21, 22]);
    }

    #[test]
    fn btrfs_replica_converges_without_faults() {
        seeds(FsKind::Btrfs, &[], &[31]);
    }

    #[test]
    fn replica_converges_after_server_kill9_and_restart() {
        seeds(FsKind::Tmpfs, &[Fault::KillServer], &[41, 42]);
    }

    #[test]
    fn replica_converges_after_client_kill9_and_restart() {
        seeds(FsKind::Tmpfs, &[Fault::KillClient], &[51, 52]);
    }

    #[test]
    fn replica_converges_after_both_agents_kill9_and_restart() {
        seeds(FsKind::Tmpfs, &[Fault::KillBoth], &[61, 62]);
    }

    #[test]
    fn replica_converges_after_the_link_is_cut() {
        seeds(FsKind::Tmpfs, &[Fault::Cut], &[71, 72]);
    }

    #[test]
    fn replica_converges_after_its_file_system_was_full() {
        seeds(FsKind::Tmpfs, &[Fault::Full], &[81, 82]);
    }

    #[test]
    fn ext4_replica_converges_under_every_fault() {
        seeds(FsKind::Ext4, &Fault::ALL, &[91, 92]);
    }

    /// The seed of IMEZZO_SEED (with IMEZZO_FS, IMEZZO_FAULTS, IMEZZO_OPS, IMEZZO_WORKERS,
    /// IMEZZO_REPLAY, IMEZZO_SHRINK); seed 0 on tmpfs without faults when none is given.
    #[test]
    fn seed_from_env() {
        check(&Config::new(0, FsKind::Tmpfs, &[], Path::new(HELPER)).with_env(true));
    }
}
