//! Installs what building and testing imezzo needs, each step checked first so that a second run
//! installs nothing. One line a step: what is present, or what is being installed.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{exec, workspace};

/// Debian packages: LLVM 22 and its link dependencies for bpf-linker, bpftool to inspect loaded
/// programs, and the peers and tools the tests and benchmarks drive (mkfs.ext4, mkfs.xfs and
/// mkfs.btrfs for the loop-mounted exports of the tests).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "inotify-tools",
    "fatrace",
    "fio",
    "rsync",
    "lsyncd",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
];

/// What `cargo xtask bench database` adds: PostgreSQL's server, its client programs (psql,
/// pgbench, pg_amcheck) and its contrib extensions (amcheck).
const DATABASE_PACKAGES: &[&str] = &["postgresql", "postgresql-contrib"];

/// bpf-linker 0.13 defaults to LLVM 23, which Debian lacks; rustc's own LLVM is 22.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn ensure() -> Result<()> {
    rust_src()?;
    debian_packages(DEBIAN_PACKAGES)?;
    bpf_linker()?;
    tracefs()?;
    bpffs()?;
    Ok(())
}

/// The probes build with `-Z build-std=core`, which needs nightly's rust-src.
fn rust_src() -> Result<()> {
    let listed = exec::query(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup is needed to build the probes with nightly")?;
    if !listed.status.success() {
        bail!(
            "the nightly toolchain is not available ({}): install it with \
             `rustup toolchain install nightly --component rust-src`",
            String::from_utf8_lossy(&listed.stderr).trim()
        );
    }
    let installed = String::from_utf8_lossy(&listed.stdout);
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("xtask: rust-src (nightly) present");
        return Ok(());
    }
    println!("xtask: installing rust-src for nightly (rustup)...");
    exec::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("could not add rust-src to the nightly toolchain")
}

/// The packages of the database bench, installed only when it runs.
pub fn database() -> Result<()> {
    debian_packages(DATABASE_PACKAGES)
}

fn debian_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        if !dpkg_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        println!("xtask: Debian packages present ({})", packages.join(" "));
        return Ok(());
    }
    println!("xtask: installing {} (apt)...", missing.join(" "));
    exec::require_root(&format!(
        "installing the Debian packages {}",
        missing.join(" ")
    ))?;

    let mut updated = false;
    if !apt_lists_present() {
        apt_update()?;
        updated = true;
    }
    if let Err(err) = apt_install(&missing) {
        if updated {
            return Err(err);
        }
        println!("xtask: apt-get install failed, updating the package lists and retrying...");
        apt_update()?;
        apt_install(&missing)?;
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = exec::query(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("dpkg-query is missing: xtask installs packages with apt, on Debian or Ubuntu")?;
    // dpkg-query exits non-zero for a package it has never heard of: that is "not installed".
    Ok(String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// A fresh image ships without package lists; `apt-get install` then finds nothing.
fn apt_lists_present() -> bool {
    fs::read_dir("/var/lib/apt/lists")
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

fn apt_update() -> Result<()> {
    exec::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("could not update the apt package lists: check the network and /etc/apt/sources.list*")
}

fn apt_install(packages: &[&str]) -> Result<()> {
    exec::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {} with apt-get", packages.join(" ")))
}

/// The linker rustc uses for the bpfel-unknown-none target.
fn bpf_linker() -> Result<()> {
    let on_path = Path::new("bpf-linker").to_path_buf();
    let in_cargo_bin = workspace::cargo_bin_dir().map(|dir| dir.join("bpf-linker"));
    for candidate in std::iter::once(on_path).chain(in_cargo_bin) {
        if let Ok(out) = exec::query(Command::new(&candidate).arg("--version")) {
            if out.status.success() {
                let version = String::from_utf8_lossy(&out.stdout);
                println!("xtask: bpf-linker present ({})", version.trim());
                return Ok(());
            }
        }
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "{LLVM_PREFIX}/bin/llvm-config is missing: install llvm-22-dev (apt) before bpf-linker"
        );
    }
    println!("xtask: installing bpf-linker (cargo install against LLVM 22, about a minute)...");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(Path::new(LLVM_PREFIX).join("bin")).chain(std::env::split_paths(&path)),
    )
    .context("PATH contains a directory with a ':' in its name")?;
    // Without these two, bpf-linker's build finds the system's older llvm-config and fails at link
    // time with `unable to find library -lLLVM`.
    exec::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("could not install bpf-linker")
}

/// Classic tracepoints are attached by the id read from tracefs, which a fresh machine has not mounted.
fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        println!("xtask: tracefs mounted at /sys/kernel/tracing");
        return Ok(());
    }
    println!("xtask: mounting tracefs at /sys/kernel/tracing...");
    exec::require_root("mounting tracefs")?;
    exec::run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("could not mount tracefs: the kernel needs CONFIG_TRACING")
}

/// bpffs, where programs and maps can be pinned and bpftool looks for them.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("could not read /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    });
    if mounted {
        println!("xtask: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    println!("xtask: mounting bpffs at /sys/fs/bpf...");
    exec::require_root("mounting bpffs")?;
    exec::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("could not mount bpffs on /sys/fs/bpf")
}
