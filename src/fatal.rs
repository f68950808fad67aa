//! The process-wide policy for errors the engine must not survive: a failed
//! fsync/fdatasync, a failed WAL write, a directory fsync that did not
//! complete. PostgreSQL calls this PANIC: log, abort, and let the restart
//! recover from the WAL. Never retried: after a failed sync the kernel may
//! have dropped the dirty data and cleared the error ("fsyncgate"), so a
//! retry that succeeds proves nothing.
//!
//! On a simulated disk (tests, [`crate::io::sim`]) the disk dies instead and
//! the calling thread unwinds, so that one test process can watch many
//! crashes.

/// Logs `msg` and aborts the process. Call it with the operation, the file
/// and the LSN range that is not acknowledged, as PostgreSQL's messages do.
#[cold]
pub(crate) fn fatal(msg: std::fmt::Arguments<'_>) -> ! {
    // Tests on a simulated disk: the disk dies and this thread unwinds.
    crate::io::sim::on_fatal(&msg.to_string());
    tracing::error!("PANIC: {msg}");
    eprintln!("walden: PANIC: {msg}");
    std::process::abort()
}
