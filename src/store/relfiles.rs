//! Relation files on the data device (PostgreSQL's md.c, small): one file per
//! relation, `data_dir/base/<rel>`, block `b` at offset `b × 8 KiB`, opened
//! with O_DIRECT on first use and kept open. Every page write notes its file
//! as needing a sync; the checkpointer takes that set and fsyncs each file
//! before it may call the checkpoint complete.
//!
//! Files grow ahead of their writes, by fallocate in steps of an eighth of
//! their size (1 to 64 MiB): an O_DIRECT write that extends a file or fills
//! a hole takes ext4's inode lock exclusively and is punted by io_uring to
//! a worker, so a batch of such writes goes one at a time; into allocated
//! blocks they run in parallel (fio here, 8 kB writes at queue depth 64:
//! 68 MB/s into a sparse file, 671 MB/s into a fallocated one). Blocks
//! allocated and never written read as zeros, a new page.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::io::file::{self, FileError, OpenMode, SegmentFile};
use crate::io::PAGE_SIZE;

use super::page::PageTag;

pub const BASE_DIR: &str = "base";

pub struct RelFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u32, Arc<SegmentFile>>>,
    /// Bytes of each open file known to be allocated (its length when
    /// first seen, then what [`RelFiles::reserve`] fallocated).
    allocated: Mutex<HashMap<u32, u64>>,
    /// Relations written since the checkpointer last took the set.
    needs_sync: Mutex<BTreeSet<u32>>,
    fsync: bool,
}

impl RelFiles {
    /// `data_dir/base`, created if missing.
    pub fn open(data_dir: &Path, fsync: bool) -> Result<RelFiles, FileError> {
        let dir = data_dir.join(BASE_DIR);
        if !dir.is_dir() {
            file::create_dir_all(&dir)?;
        }
        // At every open, not only right after the mkdir: an open that failed
        // between the mkdir and these syncs leaves a base/ that exists but may
        // not be durable, and the next open must not take it as settled.
        if fsync {
            file::sync_dir(&dir)?;
            file::sync_dir(data_dir)?;
        }
        Ok(RelFiles {
            dir,
            open: Mutex::new(HashMap::new()),
            allocated: Mutex::new(HashMap::new()),
            needs_sync: Mutex::new(BTreeSet::new()),
            fsync,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, rel: u32) -> PathBuf {
        self.dir.join(rel.to_string())
    }

    /// Relation ids with a file, ascending.
    pub fn list(&self) -> Result<Vec<u32>, FileError> {
        let mut rels: Vec<u32> = file::list_files(&self.dir)?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        rels.sort_unstable();
        Ok(rels)
    }

    /// The open file of `rel`; with `create`, created (and its name made
    /// durable) if it does not exist, else `None` for a missing file.
    fn file(&self, rel: u32, create: bool) -> Result<Option<Arc<SegmentFile>>, FileError> {
        let mut open = self.open.lock().unwrap();
        if let Some(f) = open.get(&rel) {
            return Ok(Some(Arc::clone(f)));
        }
        let path = self.path(rel);
        let mode = OpenMode {
            write: true,
            direct: true,
            ..Default::default()
        };
        let f = match SegmentFile::open(&path, mode) {
            Ok(f) => f,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                let f = SegmentFile::open(
                    &path,
                    OpenMode {
                        create_new: true,
                        ..mode
                    },
                )?;
                // IMPORTANT: the new name must survive a crash before any
                // checkpoint counts on the pages written to it. A failed
                // directory fsync is fatal, as for WAL segments: returned as
                // an error, the next attempt would find the file, open it and
                // never fsync base/ again, and a checkpoint would then release
                // the WAL that could redo the pages of a file a crash can lose.
                if self.fsync {
                    if let Err(e) = file::sync_dir(&self.dir) {
                        // Unlocked first: on a simulated disk (tests) fatal
                        // unwinds, and must not leave the map poisoned.
                        drop(open);
                        crate::fatal::fatal(format_args!(
                            "{e} (after creating {})",
                            path.display()
                        ));
                    }
                }
                f
            }
            Err(e) => return Err(e),
        };
        let f = Arc::new(f);
        open.insert(rel, Arc::clone(&f));
        Ok(Some(f))
    }

    /// Reads the page at `tag` into `buf` (8 KiB, aligned). A missing file,
    /// or a block past the end of its file, reads as zeros (a new page).
    pub fn read_page(&self, tag: PageTag, buf: &mut [u8]) -> Result<(), FileError> {
        debug_assert_eq!(buf.len(), PAGE_SIZE);
        let Some(f) = self.file(tag.rel, false)? else {
            buf.fill(0);
            return Ok(());
        };
        let n = f.read_at(buf, tag.offset())?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes a sealed page (8 KiB, aligned) at `tag`, creating the file if
    /// needed, and notes the file for the next checkpoint's sync.
    pub fn write_page(&self, tag: PageTag, buf: &[u8]) -> Result<(), FileError> {
        debug_assert_eq!(buf.len(), PAGE_SIZE);
        let f = self.file_for_write(tag)?;
        f.write_all_at(buf, tag.offset())?;
        self.note_written(tag.rel);
        Ok(())
    }

    /// The file to write page `tag` to through an io_uring (created if
    /// needed), with the page's block allocated. The caller calls
    /// [`RelFiles::note_written`] once the write completed.
    pub fn file_for_write(&self, tag: PageTag) -> Result<Arc<SegmentFile>, FileError> {
        let f = self.file(tag.rel, true)?.expect("created");
        self.reserve(&f, tag)?;
        Ok(f)
    }

    /// Allocates the file's blocks through `tag`'s page if they are not yet,
    /// growing it by a step (see the module comment). A step refused for
    /// want of space is retried for the page alone, so a nearly full data
    /// device still takes what fits.
    fn reserve(&self, f: &SegmentFile, tag: PageTag) -> Result<(), FileError> {
        const MIN_STEP: u64 = 1 << 20;
        const MAX_STEP: u64 = 64 << 20;
        let need = tag.offset() + PAGE_SIZE as u64;
        let mut allocated = self.allocated.lock().unwrap();
        let have = match allocated.get(&tag.rel) {
            Some(&n) => n,
            None => *allocated.entry(tag.rel).or_insert(f.len()?),
        };
        if need <= have {
            return Ok(());
        }
        let step = (have / 8).clamp(MIN_STEP, MAX_STEP);
        let target = need.max(have + step).div_ceil(MIN_STEP) * MIN_STEP;
        let got = match f.allocate(target) {
            Ok(()) => target,
            Err(e) if e.is_no_space() => {
                f.allocate(need)?;
                need
            }
            Err(e) => return Err(e),
        };
        allocated.insert(tag.rel, got);
        Ok(())
    }

    pub fn note_written(&self, rel: u32) {
        self.needs_sync.lock().unwrap().insert(rel);
    }

    /// Takes the set of files written since the last call, for the
    /// checkpointer to fsync. Files written after this are synced next time.
    pub fn take_needs_sync(&self) -> Result<Vec<(u32, Arc<SegmentFile>)>, FileError> {
        let rels = std::mem::take(&mut *self.needs_sync.lock().unwrap());
        rels.into_iter()
            .map(|r| Ok((r, self.file(r, true)?.expect("created"))))
            .collect()
    }
}
