//! `cargo xtask test`: THE test command. It builds imezzo, runs the integration tests against the
//! real kernel with that binary, then the unit tests.

use std::ffi::OsString;

use anyhow::{bail, Result};
use clap::Args;

use crate::{build, deps, exec, workspace::Workspace};

#[derive(Args)]
pub struct TestArgs {
    /// Arguments for the integration test binaries after `--test-threads=2`, e.g. a test name filter.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

pub fn run(args: TestArgs) -> Result<()> {
    deps::ensure()?;
    let workspace = Workspace::locate()?;
    let imezzo = build::agent(&workspace)?;

    // Build first so that a compile error is not mistaken for a test failure.
    exec::run(
        workspace
            .cargo()
            .args(["build", "--release", "--tests", "-p", "imezzo-tests"]),
    )?;

    let mut failed = Vec::new();
    // Tests share the kernel (probes, mounts), so they run two at a time at most; every test
    // binary runs even when an earlier one fails, so that one run shows every failure.
    let integration = exec::run(
        workspace
            .cargo()
            .args(["test", "--release", "--no-fail-fast", "-p", "imezzo-tests"])
            .args(["--", "--test-threads=2"])
            .args(&args.args)
            .env("IMEZZO_BIN", &imezzo),
    );
    if let Err(err) = integration {
        eprintln!("xtask: {err:#}");
        failed.push("integration tests (imezzo-tests)");
    }
    exec::bail_if_interrupted()?;
    let unit = exec::run(workspace.cargo().args([
        "test",
        "--release",
        "--no-fail-fast",
        "-p",
        "imezzo-agent",
        "-p",
        "imezzo-common",
        "-p",
        "xtask",
    ]));
    if let Err(err) = unit {
        eprintln!("xtask: {err:#}");
        failed.push("unit tests (imezzo-agent, imezzo-common, xtask)");
    }

    if !failed.is_empty() {
        bail!("failed: {}; see the test output above", failed.join(", "));
    }
    println!("xtask: all tests passed");
    Ok(())
}
