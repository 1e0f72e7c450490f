//! `cargo xtask`: what `build.rs` cannot do for imezzo. Installing the toolchain and the kernel mounts,
//! privileged test runs, and benchmarks against the peers.

mod bench;
mod build;
mod deps;
mod exec;
mod run;
mod soak;
mod test;
mod tmpfs;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer tasks for imezzo. Every task that needs the toolchain installs it first (see `deps`).
#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (rust-src, Debian packages, bpf-linker) and mount
    /// tracefs and bpffs. Idempotent: a second run only reports what is present.
    Deps,
    /// Install the dependencies, then build the self-contained `imezzo` binary (release).
    Build,
    /// Build, then run `imezzo` with the given arguments, e.g. `cargo xtask run -- capture --root /srv/x --json`.
    /// With no arguments, capture a fresh scratch tmpfs and say where it is.
    Run(run::RunArgs),
    /// Build, then run every test: the integration tests against the real kernel, and the unit tests.
    Test(test::TestArgs),
    /// Run the differential tester on new seeds for N minutes (`--minutes N [--faults ...]`),
    /// printing each failing seed and how to rerun it.
    Soak(soak::SoakArgs),
    /// Benchmarks; each writes its section of docs/benchmarks.md.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    exec::catch_interrupts();
    let result = match cli.task {
        Task::Deps => deps::ensure(),
        Task::Build => build::run(),
        Task::Run(args) => run::run(args),
        Task::Test(args) => test::run(args),
        Task::Soak(args) => soak::run(args),
        Task::Bench(bench) => bench::run(bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
