//! The agent's heap: bounded at start, and freed memory handed back to the kernel after the
//! agent's large, short-lived phases.
//!
//! glibc keeps what a program frees in its arenas for reuse, and returns it only from the top
//! of the main heap. The agents have phases that allocate a lot once and then never again:
//! parsing the kernel's BTF to load the probes (some 25 MB), building the inode table of a
//! large tree (the index arrays it outgrew), a full sync of a large tree (its manifest's
//! queue and the set of paths it named). Without this, an agent carries that memory for its
//! whole life: a client was seen holding 126 MB of RSS after the full sync of a million
//! files, 31 MB once trimmed.

/// Returns the free memory of every arena to the kernel. Call it after a phase, not in a loop.
pub fn release_freed() {
    // SAFETY: malloc_trim only hands free heap pages back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// glibc's defaults let a busy agent hold far more memory than it uses: an arena per thread
/// that ever allocated (up to eight per core, and tokio's blocking pool has many threads),
/// each keeping what its thread freed. Under a random-write load on two files the server
/// held 155 MB; with two arenas, 90 MB. Also fixing the threshold above which blocks are
/// mapped (1 MiB; glibc raises it with every large block freed) cut that to 73 MB, but the
/// data path's 4 MiB buffers were then mapped, faulted in and unmapped again each time: the
/// server's CPU for a 2 GiB initial sync doubled. Call once, first thing in `main`.
pub fn bound_heap() {
    // SAFETY: mallopt only changes allocator parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
