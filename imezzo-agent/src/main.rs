//! The `imezzo` binary.
mod cli;

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// imezzo: InterMezzo rebuilt. Capture every change under a directory with eBPF tracepoint
/// probes and journal it, for replication to client agents.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Capture every change under ROOT and print the journal live, one operation a line.
    ///
    /// Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) and a kernel with BTF. The
    /// probes stay pinned under /sys/fs/bpf/imezzo/<instance>/ while it runs. Stop with
    /// Ctrl-C; a summary line goes to stderr.
    Capture {
        /// The exported directory.
        #[arg(long)]
        root: PathBuf,
        /// One JSON object per line (format in docs/journal-format.md).
        #[arg(long)]
        json: bool,
        /// Size of the kernel ring buffer in bytes (a power of two, at least 4096).
        #[arg(long, default_value_t = 8 << 20)]
        ring_bytes: u32,
        /// Attach only an empty program where the probes hook every syscall's exit, journal
        /// nothing, and wait for Ctrl-C: the floor `cargo xtask bench capture` measures
        /// capture's cost against.
        #[arg(long, hide = true)]
        empty_probe: bool,
    },
    Verify(cli::verify::VerifyArgs),
    Init(cli::identity::InitArgs),
    Id(cli::identity::IdArgs),
    Server(cli::server::ServerArgs),
    Client(cli::client::ClientArgs),
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    imezzo_agent::memory::bound_heap();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            writeln!(
                buf,
                "imezzo: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
    let cli = Cli::parse();
    let result = run(cli);
    // Counts of problems reported but not yet summarised.
    imezzo_agent::report::flush();
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("imezzo: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Capture {
            root,
            json,
            ring_bytes,
            empty_probe: false,
        } => cli::capture::run(root, json, ring_bytes).map(|()| ExitCode::SUCCESS),
        Command::Capture {
            empty_probe: true, ..
        } => cli::capture::empty_probe().map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => Ok(cli::verify::run(args)),
        Command::Init(args) => cli::identity::init(args).map(|()| ExitCode::SUCCESS),
        Command::Id(args) => cli::identity::id(args).map(|()| ExitCode::SUCCESS),
        Command::Server(args) => cli::server::run(args),
        Command::Client(args) => cli::client::run(args),
        Command::Demo(args) => cli::demo::run(args),
    }
}
