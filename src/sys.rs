//! The little the crate asks of the operating system directly.

/// Lower the calling thread's scheduling priority to `nice` (Linux: per thread; threads
/// it starts inherit it). Best effort: elsewhere, or on failure, nothing changes.
pub fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread (who = 0 is the caller's thread id on
    // Linux) only changes its scheduling priority; it touches no memory of ours.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}
