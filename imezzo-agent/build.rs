//! Builds the probe object (imezzo-ebpf, for bpfel-unknown-none with nightly and
//! bpf-linker) so that the `imezzo` binary embeds it: one self-contained executable.
//! `cargo xtask deps` installs the toolchain this needs.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../imezzo-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "imezzo-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
