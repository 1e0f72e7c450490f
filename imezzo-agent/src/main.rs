//! The `imezzo` binary.
mod cli_client;
mod cli_demo;
mod cli_identity;
mod cli_server;
mod cli_verify;

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::{Parser, Subcommand};
use imezzo_agent::capture::{Capture, CaptureConfig};

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
    },
    Verify(cli_verify::VerifyArgs),
    Init(cli_identity::InitArgs),
    Id(cli_identity::IdArgs),
    Server(cli_server::ServerArgs),
    Client(cli_client::ClientArgs),
    Demo(cli_demo::DemoArgs),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "imezzo: {}: {}", record.level().as_str().to_lowercase(), record.args()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
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
        Command::Capture { root, json, ring_bytes } => capture(root, json, ring_bytes).map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => Ok(cli_verify::run(args)),
        Command::Init(args) => cli_identity::init(args).map(|()| ExitCode::SUCCESS),
        Command::Id(args) => cli_identity::id(args).map(|()| ExitCode::SUCCESS),
        Command::Server(args) => cli_server::run(args),
        Command::Client(args) => cli_client::run(args),
        Command::Demo(args) => cli_demo::run(args),
    }
}

fn capture(root: PathBuf, json: bool, ring_bytes: u32) -> anyhow::Result<()> {
    let mut cap = Capture::start(&CaptureConfig { root, ring_bytes, changed_since: None })?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!("imezzo: capture ready: journalling changes under {}", cap.root().display());
    let stdout = std::io::stdout();
    let mut out = std::io::LineWriter::new(stdout.lock());
    cap.run(&STOP, &mut |entry| {
        let line = if json {
            serde_json::to_string(&entry).unwrap_or_default()
        } else {
            entry.to_string()
        };
        // A closed stdout (`| head`) ends the capture rather than the process.
        if writeln!(out, "{line}").is_err() {
            STOP.store(true, Ordering::Relaxed);
        }
    });
    let s = cap.stats();
    eprintln!(
        "imezzo: capture stopped: events={} drops={} rescans={} ops={}",
        s.events, s.drops, s.rescans, s.ops
    );
    Ok(())
}
