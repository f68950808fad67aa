//! TEMPORARY: compile shim until the standby store lands. Deleted at merge.
#![allow(dead_code, unused_variables)]
use std::sync::Arc;
use crate::config::Config;
use crate::io::uring::EventFd;
use crate::lock::DirLocks;
use crate::lsn::Lsn;
use crate::store::{RecoveryProgress, Store, StoreError};

pub(crate) trait StandbyShim: Sized {
    fn open_standby_locked(cfg: Config, p: Arc<RecoveryProgress>, l: DirLocks, s: Option<u64>) -> Result<Self, StoreError>;
    fn apply_lsn(&self) -> Lsn;
    fn add_apply_listener(&self, w: Arc<EventFd>);
    fn system_identifier(&self) -> u64;
}
impl StandbyShim for Store {
    fn open_standby_locked(cfg: Config, p: Arc<RecoveryProgress>, l: DirLocks, s: Option<u64>) -> Result<Self, StoreError> { unimplemented!() }
    fn apply_lsn(&self) -> Lsn { unimplemented!() }
    fn add_apply_listener(&self, w: Arc<EventFd>) {}
    fn system_identifier(&self) -> u64 { self.control().system_identifier }
}
