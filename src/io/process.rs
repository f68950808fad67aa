//! Signals to other processes (`walden promote` asks a running server to
//! promote with SIGUSR1, as `pg_ctl promote` does).

/// Sends SIGUSR1 to process `pid`.
pub fn send_sigusr1(pid: u32) -> std::io::Result<()> {
    // SAFETY: kill only reads its two integer arguments.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
