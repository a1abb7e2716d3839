//! Multi-version key space: every write makes a new revision, and any revision since the last
//! compaction can be read.
//!
//! - [`backend`]: the ordered byte map underneath (sled in production, memory in tests).
//! - [`keys`]: how records, leases and meta values are laid out in it.
//! - [`packed`]: how the sled backend packs small revision records into buckets.
//! - [`store`]: the MVCC rules — revisions, versions, ranges at a revision, compaction — over an
//!   in-memory index of every key's revisions, rebuilt from the backend at start-up (as etcd
//!   rebuilds its `treeIndex` from bolt).

pub mod backend;
pub mod keys;
pub mod packed;
pub mod store;

pub use backend::{Backend, Batch, Defragmented, MemBackend, SledBackend};
pub use keys::Revision;
pub use store::{MvccStore, RangeResult};
