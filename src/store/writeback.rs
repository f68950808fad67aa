//! Batched write-back of dirty pages through an io_uring, shared by the
//! checkpointer and the background writer: copy up to a batch of pages into
//! bounce pages, flush the WAL once past the newest of them (WAL before data),
//! then write them all at once and wait.

use std::sync::Arc;

use crate::io::file::{FileError, SegmentFile};
use crate::io::page_queue::{PageCompletion, PageQueue};
use crate::io::PAGE_SIZE;
use crate::lsn::Lsn;

use super::buffer_pool::{BufferPool, WriteFilter, WriteStart};
use super::page::PageTag;
use super::StoreError;

/// Most pages written at once (immediate checkpoints; a paced one writes
/// smaller batches, see [`Writeback::set_batch`]).
pub const BATCH: usize = 64;

struct Pending {
    slot: usize,
    frame: usize,
    tag: PageTag,
    lsn: Lsn,
    file: Option<Arc<SegmentFile>>,
}

pub struct Writeback {
    queue: PageQueue,
    pending: Vec<Pending>,
    done: Vec<PageCompletion>,
    /// Pages written since this writer was made.
    pub written: u64,
    /// Pages queued before a batch is written (at most [`BATCH`]).
    batch: usize,
}

impl Writeback {
    pub fn new() -> Result<Writeback, StoreError> {
        Ok(Writeback {
            queue: PageQueue::new(BATCH).map_err(|e| StoreError::Uring("page writer", e))?,
            pending: Vec::with_capacity(BATCH),
            done: Vec::with_capacity(BATCH),
            written: 0,
            batch: BATCH,
        })
    }

    /// Writes batches of `n` pages (1..=BATCH): small batches keep a paced
    /// checkpoint's writes from arriving at the device in bursts.
    pub fn set_batch(&mut self, n: usize) {
        self.batch = n.clamp(1, BATCH);
    }

    /// Starts the write-out of frame `frame` if `filter` wants it, queueing
    /// it in the current batch (which is written when full).
    pub fn offer(
        &mut self,
        pool: &BufferPool,
        frame: usize,
        filter: WriteFilter,
    ) -> Result<WriteStart, StoreError> {
        if self.pending.len() >= self.batch.min(self.queue.slots()) {
            self.flush(pool)?;
        }
        // A flush waits for all its writes, so between flushes the pending
        // pages hold slots 0..len and no slot is in flight.
        let mut slot = self.pending.len();
        let started = match pool.try_start_write(frame, filter, self.queue.page_mut(slot)) {
            Some(s) => s,
            None => {
                // IMPORTANT: another writer's batch holds this frame. Waiting
                // while our batch holds frames that writer may want next
                // deadlocks (the bgwriter and the checkpointer did, found by
                // the simulated-disk torture test): write ours first.
                self.flush(pool)?;
                slot = 0;
                pool.start_write(frame, filter, self.queue.page_mut(slot))
            }
        };
        if let WriteStart::Started { tag, lsn } = started {
            self.pending.push(Pending {
                slot,
                frame,
                tag,
                lsn,
                file: None,
            });
            if self.pending.len() >= self.batch {
                self.flush(pool)?;
            }
        }
        Ok(started)
    }

    /// Writes the pending batch and waits for it. Every page of the batch is
    /// finished (clean, or dirty again if its write failed) whatever happens;
    /// the first failure is returned.
    pub fn flush(&mut self, pool: &BufferPool) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut first_err: Option<StoreError> = None;
        self.done.clear();
        let newest = self.pending.iter().map(|p| p.lsn).max().unwrap();
        if let Err(e) = pool.flush_wal(newest) {
            first_err = Some(e);
        }
        for (i, p) in self.pending.iter_mut().enumerate() {
            if first_err.is_some() {
                break;
            }
            let queued = pool.before_write(p.tag, p.lsn).and_then(|()| {
                let f = pool.files().file_for_write(p.tag)?;
                if f.is_simulated() {
                    // Tests on a simulated disk: written here, synchronously.
                    let res = f.write_all_at(self.queue.page(p.slot), p.tag.offset());
                    self.done.push(PageCompletion {
                        user_data: i as u64,
                        result: match &res {
                            Ok(()) => PAGE_SIZE as i32,
                            Err(e) => -e.errno(),
                        },
                    });
                    p.file = Some(f);
                    return Ok(());
                }
                self.queue
                    .write_page(f.raw_fd(), p.slot, p.tag.offset(), i as u64)
                    .map_err(|e| StoreError::Uring("page writer", e))?;
                p.file = Some(f);
                Ok(())
            });
            if let Err(e) = queued {
                first_err = Some(e);
            }
        }
        if let Err(e) = self.queue.drain(&mut self.done) {
            // The ring itself failed: nothing can be trusted about the batch.
            crate::fatal::fatal(format_args!("page write io_uring failed: {e}"));
        }
        let mut ok = vec![false; self.pending.len()];
        for c in &self.done {
            let p = &self.pending[c.user_data as usize];
            if c.result == PAGE_SIZE as i32 {
                ok[c.user_data as usize] = true;
            } else if first_err.is_none() {
                let err = if c.result < 0 {
                    std::io::Error::from_raw_os_error(-c.result)
                } else {
                    std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short write of {} bytes", c.result),
                    )
                };
                first_err = Some(
                    FileError::new("write to file", &pool.files().path(p.tag.rel), err).into(),
                );
            }
        }
        for (p, ok) in self.pending.drain(..).zip(ok) {
            if ok {
                pool.files().note_written(p.tag.rel);
                self.written += 1;
            }
            pool.finish_write(p.frame, ok);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// fsyncs every file in `files` at once; returns each file's duration in
    /// seconds. A failed fsync is fatal: after it the kernel may have dropped
    /// the dirty pages and cleared the error, so retrying would lie.
    pub fn sync_files(&mut self, files: &[(u32, Arc<SegmentFile>)]) -> Vec<f64> {
        let started = std::time::Instant::now();
        let mut secs = vec![0.0; files.len()];
        for (i, (_, f)) in files.iter().enumerate() {
            if f.is_simulated() {
                if let Err(e) = f.fsync() {
                    crate::fatal::fatal(format_args!("{e}"));
                }
                secs[i] = started.elapsed().as_secs_f64();
                continue;
            }
            if let Err(e) = self.queue.fsync(f.raw_fd(), i as u64) {
                crate::fatal::fatal(format_args!("could not queue fsync: {e}"));
            }
        }
        while self.queue.in_flight() > 0 {
            if let Err(e) = self.queue.submit_and_wait(1, None) {
                crate::fatal::fatal(format_args!("page store io_uring failed: {e}"));
            }
            self.done.clear();
            self.queue.reap(&mut self.done);
            for c in &self.done {
                let (_, f) = &files[c.user_data as usize];
                if c.result < 0 {
                    // IMPORTANT: PostgreSQL's fsyncgate lesson: PANIC, recover from the WAL.
                    crate::fatal::fatal(format_args!(
                        "could not fsync file \"{}\": {}",
                        f.path().display(),
                        std::io::Error::from_raw_os_error(-c.result)
                    ));
                }
                secs[c.user_data as usize] = started.elapsed().as_secs_f64();
            }
        }
        secs
    }
}
