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

/// Bytes free for an unprivileged writer on the filesystem holding `path`, if the system
/// says (statvfs on Unix; `None` elsewhere or on failure).
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: `st` is a plain C struct that statvfs fills; `c` is a valid NUL-terminated
        // path that outlives the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}
