//! Waiting for sockets with poll(2), for the code that drives blocking or
//! non-blocking sockets itself rather than through an io_uring: the client
//! (a full send buffer) and the benchmark's event loop (answers on many
//! connections).
//!
//! A wait interrupted by a signal returns `Ok` with nothing ready: every
//! caller loops and waits again.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits until `fd` can take more bytes (a non-blocking socket whose send
/// buffer was full), or has failed or hung up (the next send says which).
pub fn wait_writable(fd: RawFd) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd it is given, which lives
    // on this stack frame for the call.
    let rc = unsafe { libc::poll(&mut p, 1, -1) };
    interrupted_is_ok(rc)
}

/// Whether `fd` has input, an end of file or an error right now (a poll
/// with a zero timeout): for threads that poll a blocking socket for a
/// short while before they block in a read ([`crate::io::poll_until`]).
pub fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd it is given, which lives
    // on this stack frame for the call; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0
}

/// Descriptors waited on together for input.
pub struct ReadableSet {
    fds: Vec<libc::pollfd>,
}

impl ReadableSet {
    pub fn new(fds: impl IntoIterator<Item = RawFd>) -> ReadableSet {
        ReadableSet {
            fds: fds
                .into_iter()
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
        }
    }

    /// Waits up to `timeout` (whole milliseconds) for any descriptor to be
    /// readable, closed or failed; [`ReadableSet::ready`] then says which.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        for f in self.fds.iter_mut() {
            f.revents = 0;
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll reads and writes exactly fds.len() pollfds, all in the
        // vector it is given, for the duration of the call.
        let rc = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        interrupted_is_ok(rc)
    }

    /// Whether descriptor `i` (in the order given to [`ReadableSet::new`])
    /// had an event in the last wait: input, end of file, or an error.
    pub fn ready(&self, i: usize) -> bool {
        self.fds[i].revents != 0
    }
}

fn interrupted_is_ok(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn a_set_says_which_descriptor_has_input() {
        let (mut a_tx, a_rx) = UnixStream::pair().unwrap();
        let (_b_tx, b_rx) = UnixStream::pair().unwrap();
        let mut set = ReadableSet::new([a_rx.as_raw_fd(), b_rx.as_raw_fd()]);
        let t = Instant::now();
        set.wait(Duration::from_millis(50)).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "waited its timeout"
        );
        assert!(!set.ready(0) && !set.ready(1));
        a_tx.write_all(b"x").unwrap();
        set.wait(Duration::from_secs(5)).unwrap();
        assert!(set.ready(0) && !set.ready(1));
        drop(_b_tx);
        set.wait(Duration::from_secs(5)).unwrap();
        assert!(set.ready(1), "a closed peer counts as ready (end of file)");
    }

    #[test]
    fn a_socket_with_room_is_writable_at_once() {
        let (tx, _rx) = UnixStream::pair().unwrap();
        wait_writable(tx.as_raw_fd()).unwrap();
    }
}
