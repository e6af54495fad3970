//! The Filter Manager model: registration of minifilters, their instances on volumes, starting and stopping them.

pub mod callback_data;
pub mod cancel;
pub mod context;
pub mod dispatch;
pub mod fileio;
pub mod filelock;
pub mod instance;
pub mod names;
pub mod pending;
pub mod port;
pub mod postpend;
pub mod query;
pub mod registration;
pub mod userbuf;

pub use registration::{FilterRecord, InstanceDefinition, OperationRecord, filters};
