//! The Filter Manager model: registration of minifilters, starting and stopping them.

pub mod registration;

pub use registration::{FilterRecord, InstanceDefinition, OperationRecord, filters};
