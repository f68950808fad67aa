//! While the page store recovers, the listener is already bound and
//! answered here: Hello and Status work (so `walden status` shows how far
//! redo has come), every other request gets `STARTING_UP` and the
//! connection closes, as PostgreSQL answers "the database system is starting
//! up". One plain thread with blocking sockets: it serves operators, not load.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::protocol::{self, Decoder, ErrorCode, Frame, FrameRef, Limits};
use crate::store::RecoveryProgress;

pub(crate) struct StartupResponder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

pub(crate) struct Context {
    pub progress: Arc<RecoveryProgress>,
    pub token: Option<Arc<[u8]>>,
    pub name: String,
    pub segment_size: u64,
    pub started: Instant,
}

impl StartupResponder {
    pub fn start(listener: &OwnedFd, cx: Context) -> std::io::Result<StartupResponder> {
        let l = TcpListener::from(listener.try_clone()?);
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("walden-startup".into())
            .spawn(move || {
                while !st.load(SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let _ = answer(s, &cx);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                // O_NONBLOCK belongs to the socket, which the shards share
                // (through duplicates) from now on: hand it back as it came.
                let _ = l.set_nonblocking(false);
            })?;
        Ok(StartupResponder {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops answering; connections not yet accepted wait in the listen
    /// queue for the shards.
    pub fn stop(mut self) {
        self.stop.store(true, SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StartupResponder {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub(crate) fn status_json(cx: &Context) -> String {
    let p = &cx.progress;
    let (from, at, end) = (
        p.from.load(Relaxed),
        p.at.load(Relaxed),
        p.end.load(Relaxed),
    );
    let pct = if end > from {
        (at.saturating_sub(from)) as f64 * 100.0 / (end - from) as f64
    } else {
        0.0
    };
    format!(
        concat!(
            "{{\"server\":\"{}\",\"state\":\"recovering\",\"uptime_seconds\":{:.3},",
            "\"recovery\":{{\"active\":{},\"redo_from\":\"{}\",\"replayed_to\":\"{}\",",
            "\"end_of_wal\":\"{}\",\"percent\":{:.1},\"records\":{}}}}}"
        ),
        cx.name,
        cx.started.elapsed().as_secs_f64(),
        p.active.load(Relaxed),
        Lsn(from),
        Lsn(at),
        Lsn(end),
        pct,
        p.records.load(Relaxed)
    )
}

fn answer(mut s: TcpStream, cx: &Context) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    // Before Hello, a few KiB at most, as on a shard.
    let mut dec = Decoder::awaiting_hello(Limits::default());
    let mut buf = vec![0u8; 16 << 10];
    let mut out = Vec::new();
    let mut hello = false;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        let mut taken = 0;
        while taken < n {
            taken += dec.extend(&buf[taken..n]);
            loop {
                out.clear();
                let close = match dec.next_frame() {
                    Ok(None) => break,
                    Ok(Some(FrameRef::Hello {
                        request_id, token, ..
                    })) if !hello => {
                        let ok = cx
                            .token
                            .as_deref()
                            .map_or(true, |t| super::constant_time_eq(t, token));
                        if ok {
                            hello = true;
                            protocol::encode(
                                &Frame::HelloOk {
                                    request_id,
                                    version: protocol::VERSION,
                                    system_id: 0,
                                    segment_size: cx.segment_size,
                                    limits: Limits::default(),
                                    max_in_flight: 1,
                                    server_name: cx.name.clone(),
                                },
                                &mut out,
                            );
                            false
                        } else {
                            error(
                                &mut out,
                                request_id,
                                ErrorCode::AUTH_FAILED,
                                "authentication failed: wrong or missing token",
                            );
                            true
                        }
                    }
                    Ok(Some(FrameRef::Status { request_id })) if hello => {
                        protocol::encode(
                            &Frame::StatusReply {
                                request_id,
                                insert_lsn: Lsn(0),
                                write_lsn: Lsn(0),
                                flush_lsn: Lsn(0),
                                json: status_json(cx),
                            },
                            &mut out,
                        );
                        false
                    }
                    Ok(Some(f)) => {
                        let p = &cx.progress;
                        let msg = format!(
                            "the database system is starting up: redo at {} of {}",
                            Lsn(p.at.load(Relaxed)),
                            Lsn(p.end.load(Relaxed))
                        );
                        error(&mut out, f.request_id(), ErrorCode::STARTING_UP, &msg);
                        true
                    }
                    Err(e) => {
                        protocol::encode(&e.to_frame(), &mut out);
                        true
                    }
                };
                if hello {
                    dec.hello_accepted();
                }
                s.write_all(&out)?;
                if close {
                    return Ok(());
                }
            }
        }
    }
}

fn error(out: &mut Vec<u8>, request_id: u64, code: ErrorCode, message: &str) {
    protocol::encode(
        &Frame::Error {
            request_id,
            code,
            message: message.to_string(),
        },
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, ClientError};
    use crate::durability::Durability;
    use crate::record::Kind;

    #[test]
    fn status_shows_recovery_and_everything_else_waits() {
        let l = crate::io::net::listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = crate::io::net::local_addr(&l).unwrap().to_string();
        let progress = Arc::new(RecoveryProgress::default());
        progress.active.store(true, SeqCst);
        progress.from.store(0x100_0000, SeqCst);
        progress.at.store(0x180_0000, SeqCst);
        progress.end.store(0x200_0000, SeqCst);
        let r = StartupResponder::start(
            &l,
            Context {
                progress,
                token: None,
                name: "walden test".into(),
                segment_size: 1 << 20,
                started: Instant::now(),
            },
        )
        .unwrap();
        let mut c = Client::connect(&addr, None).unwrap();
        let (_, _, _, json) = c.status().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["state"], "recovering");
        assert_eq!(v["recovery"]["replayed_to"], "0/1800000");
        assert_eq!(v["recovery"]["percent"], 50.0);
        let e = c
            .append(Durability::Local, &[(Kind::DATA, b"too early")])
            .unwrap_err();
        match e {
            ClientError::Server { code, message } => {
                assert_eq!(code, ErrorCode::STARTING_UP);
                assert!(message.contains("starting up"), "{message}");
            }
            other => panic!("{other}"),
        }
        r.stop();
    }
}
