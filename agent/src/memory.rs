//! Giving memory back after a pass. A pass over 10,000 services allocates tens of MiB of
//! short-lived objects (the registry, each scope's listeners, the compiled set); glibc keeps
//! the freed pages, so without this the agent's RSS would stay at its busiest pass's peak.

/// Returns free heap pages to the kernel (glibc's `malloc_trim`, every arena). About a
/// millisecond at this agent's size; a no-op on other C libraries.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
