//! Relation files on the data device (PostgreSQL's md.c, small): one file per
//! relation, `data_dir/base/<rel>`, block `b` at offset `b × 8 KiB`, opened
//! with O_DIRECT on first use and kept open. Every page write notes its file
//! as needing a sync; the checkpointer takes that set and fsyncs each file
//! before it may call the checkpoint complete.

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
            if fsync {
                file::sync_dir(&dir)?;
                file::sync_dir(data_dir)?;
            }
        }
        Ok(RelFiles {
            dir,
            open: Mutex::new(HashMap::new()),
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
                // checkpoint counts on the pages written to it.
                if self.fsync {
                    file::sync_dir(&self.dir)?;
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
        let f = self.file(tag.rel, true)?.expect("created");
        f.write_all_at(buf, tag.offset())?;
        self.note_written(tag.rel);
        Ok(())
    }

    /// The file to write `tag` to through an io_uring (created if needed).
    /// The caller calls [`RelFiles::note_written`] once the write completed.
    pub fn file_for_write(&self, rel: u32) -> Result<Arc<SegmentFile>, FileError> {
        Ok(self.file(rel, true)?.expect("created"))
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
