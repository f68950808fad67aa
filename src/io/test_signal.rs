//! Test scaffolding for the io_uring teardown tests: a signal that
//! interrupts a blocking wait with EINTR.

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a handler that does nothing for `sig`, without SA_RESTART: the
/// signal then ends a blocking call (an io_uring wait) with EINTR instead of
/// being restarted by the kernel.
pub fn interrupt_with(sig: libc::c_int) {
    // SAFETY: sigaction is plain old data, all-zero is valid (an empty mask,
    // no flags); the handler is an extern "C" fn that does nothing, which is
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

/// The calling thread, for `pthread_kill`.
pub fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}
