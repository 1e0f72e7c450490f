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
/// each keeping what its thread freed, and a threshold for serving a block by mmap that
/// rises with every large block freed, up to 32 MiB. Under a random-write load on two
/// files the server held 155 MB; with two arenas, 90 MB. The threshold is fixed at 8 MiB:
/// above the data path's 4 MiB buffers (at 1 MiB they were mapped, faulted in and unmapped
/// again each time, and the server's CPU for a 2 GiB initial sync doubled), below the
/// inode table's arrays of a large tree (left to the rising threshold, they were allocated
/// in the heap and copied as they grew, and a million-file export peaked 11 MiB higher).
/// Call once, first thing in `main`.
pub fn bound_heap() {
    // SAFETY: mallopt only changes allocator parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        // Fixing the mmap threshold also freezes the trim threshold at 128 KiB: the heap's
        // top would go back to the kernel after every large free and fault in again.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
