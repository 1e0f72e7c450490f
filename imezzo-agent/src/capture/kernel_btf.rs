//! Kernel struct offsets for the probes, read from the running kernel's BTF.
//!
//! Rust eBPF gets no CO-RE relocations, so the probes take every offset they use from the
//! `OFFSETS` global, filled here at load time. A missing field means a kernel this build
//! does not understand: we refuse to load rather than read the wrong bytes.

use std::path::Path;

use btf_rs::{Btf, Type};
use imezzo_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "the kernel has no BTF at {VMLINUX_BTF}: imezzo needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    Missing,
    #[error("cannot parse the kernel BTF at {VMLINUX_BTF}: {0}")]
    Parse(String),
    #[error("the kernel's BTF has no `struct {0}` with a field `{1}`; this kernel is not supported")]
    Field(&'static str, &'static str),
}

/// Byte offset of `field` in `struct name`, looking through anonymous unions and structs.
fn field_offset(btf: &Btf, name: &'static str, field: &'static str) -> Result<u32, BtfError> {
    let types = btf.resolve_types_by_name(name).map_err(|_| BtfError::Field(name, field))?;
    for ty in types {
        if let Type::Struct(st) = ty {
            if let Some(bits) = find_member(btf, &st, field, 0) {
                return Ok(bits / 8);
            }
        }
    }
    Err(BtfError::Field(name, field))
}

fn find_member(btf: &Btf, st: &btf_rs::Struct, field: &str, base_bits: u32) -> Option<u32> {
    for member in &st.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        let bits = base_bits + member.bit_offset();
        if name == field {
            return Some(bits);
        }
        if name.is_empty() {
            // An anonymous struct or union: its fields belong to the outer struct.
            let mut ty = btf.resolve_chained_type(member).ok()?;
            loop {
                ty = match ty {
                    Type::Struct(inner) | Type::Union(inner) => {
                        if let Some(found) = find_member(btf, &inner, field, bits) {
                            return Some(found);
                        }
                        break;
                    }
                    Type::Typedef(ref t) => btf.resolve_chained_type(t).ok()?,
                    Type::Const(ref t) => btf.resolve_chained_type(t).ok()?,
                    Type::Volatile(ref t) => btf.resolve_chained_type(t).ok()?,
                    _ => break,
                };
            }
        }
    }
    None
}

/// Reads every offset the probes need from the running kernel.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(BtfError::Missing);
    }
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Parse(e.to_string()))?;
    let f = |s, m| field_offset(&btf, s, m);
    Ok(KernelOffsets {
        task_files: f("task_struct", "files")?,
        task_fs: f("task_struct", "fs")?,
        task_flags: f("task_struct", "flags")?,
        files_fdt: f("files_struct", "fdt")?,
        fdt_max_fds: f("fdtable", "max_fds")?,
        fdt_fd: f("fdtable", "fd")?,
        file_inode: f("file", "f_inode")?,
        file_pos: f("file", "f_pos")?,
        file_mode: f("file", "f_mode")?,
        inode_sb: f("inode", "i_sb")?,
        inode_ino: f("inode", "i_ino")?,
        inode_mode: f("inode", "i_mode")?,
        inode_size: f("inode", "i_size")?,
        sb_dev: f("super_block", "s_dev")?,
        sb_magic: f("super_block", "s_magic")?,
        // Filled by `add_btrfs` when the export is on btrfs.
        btrfs_vfs_inode: 0,
        btrfs_inode_root: 0,
        btrfs_root_anon_dev: 0,
        // Filled by `add_xfs` when the export is on XFS.
        xfs_vfs_inode: 0,
        // io_uring is optional in a kernel: zero (and no completion probe) without it.
        uring_req_file: f("io_kiocb", "file").unwrap_or(0),
        uring_req_opcode: f("io_kiocb", "opcode").unwrap_or(0),
        fs_root: f("fs_struct", "root")?,
        fs_pwd: f("fs_struct", "pwd")?,
        path_dentry: f("path", "dentry")?,
        dentry_inode: f("dentry", "d_inode")?,
        regs_di: f("pt_regs", "di")?,
        regs_si: f("pt_regs", "si")?,
        regs_dx: f("pt_regs", "dx")?,
        regs_r10: f("pt_regs", "r10")?,
        regs_r8: f("pt_regs", "r8")?,
        regs_r9: f("pt_regs", "r9")?,
        regs_orig_ax: f("pt_regs", "orig_ax")?,
        i_dirty_pages: enum_value(&btf, "inode_state_flags_t", "I_DIRTY_PAGES").unwrap_or(4),
    })
}

/// The value of `member` in the enum `name`, if the kernel's BTF has that enum.
fn enum_value(btf: &Btf, name: &str, member: &str) -> Option<u32> {
    for t in btf.resolve_types_by_name(name).ok()? {
        if let Type::Enum(e) = t {
            for m in &e.members {
                if btf.resolve_name(m).ok()?.as_str() == member {
                    return Some(m.val());
                }
            }
        }
    }
    None
}

/// Adds the offsets the probes need to report a btrfs inode's device as `stat(2)` does (its
/// subvolume's anonymous device rather than the super block's `s_dev`).
pub fn add_btrfs(offsets: &mut KernelOffsets) -> Result<(), BtfError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Parse(e.to_string()))?;
    // btrfs built as a module keeps its types in split BTF next to vmlinux's.
    let module = Path::new("/sys/kernel/btf/btrfs");
    let module_btf = if module.exists() {
        Some(Btf::from_split_file(module, &btf).map_err(|e| BtfError::Parse(e.to_string()))?)
    } else {
        None
    };
    let btf = module_btf.as_ref().unwrap_or(&btf);
    let f = |s, m| field_offset(btf, s, m);
    offsets.btrfs_vfs_inode = f("btrfs_inode", "vfs_inode")?;
    offsets.btrfs_inode_root = f("btrfs_inode", "root")?;
    offsets.btrfs_root_anon_dev = f("btrfs_root", "anon_dev")?;
    if offsets.btrfs_root_anon_dev == 0 {
        // Zero tells the probes "not btrfs"; anon_dev is never the first field.
        return Err(BtfError::Field("btrfs_root", "anon_dev"));
    }
    Ok(())
}

/// Adds the offset the XFS timestamp probe needs (`i_vnode` in `struct xfs_inode`). XFS is
/// part of vmlinux's BTF when built in; as a module its types are in split BTF.
pub fn add_xfs(offsets: &mut KernelOffsets) -> Result<(), BtfError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Parse(e.to_string()))?;
    let module = Path::new("/sys/kernel/btf/xfs");
    let module_btf = if module.exists() {
        Some(Btf::from_split_file(module, &btf).map_err(|e| BtfError::Parse(e.to_string()))?)
    } else {
        None
    };
    let btf = module_btf.as_ref().unwrap_or(&btf);
    offsets.xfs_vfs_inode = field_offset(btf, "xfs_inode", "i_vnode")?;
    if offsets.xfs_vfs_inode == 0 {
        return Err(BtfError::Field("xfs_inode", "i_vnode"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_the_running_kernel_are_found_and_plausible() {
        let o = kernel_offsets().expect("this machine has BTF");
        // pt_regs is ABI on x86_64: orig_ax follows the 15 general registers.
        assert_eq!(o.regs_orig_ax, 15 * 8);
        assert_eq!(o.regs_di, 14 * 8);
        assert!(o.file_inode > 0 && o.inode_ino > 0 && o.task_files > 0);
        assert_ne!(o.fs_root, o.fs_pwd);
        // I_DIRTY_PAGES: 4 while it was a constant, a larger bit of the enum since (64 in 6.18).
        assert!(o.i_dirty_pages.is_power_of_two() && o.i_dirty_pages >= 4, "{}", o.i_dirty_pages);
    }

    #[test]
    fn btrfs_offsets_are_found_when_btrfs_is_in_the_kernel() {
        let in_kernel = std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.contains("\tbtrfs"));
        if !in_kernel {
            return;
        }
        let mut o = kernel_offsets().expect("this machine has BTF");
        add_btrfs(&mut o).expect("btrfs types in the kernel's BTF");
        assert!(o.btrfs_vfs_inode > o.btrfs_inode_root && o.btrfs_root_anon_dev > 0);
    }

    #[test]
    fn xfs_offset_is_found_when_xfs_is_in_the_kernel() {
        let in_kernel = std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.contains("\txfs"));
        if !in_kernel {
            return;
        }
        let mut o = kernel_offsets().expect("this machine has BTF");
        add_xfs(&mut o).expect("xfs types in the kernel's BTF");
        assert!(o.xfs_vfs_inode > 0);
    }
}
