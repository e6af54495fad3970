//! The Filter Manager model: registration of minifilters, their instances on volumes, starting and stopping them.

pub mod instance;
pub mod registration;

pub use registration::{FilterRecord, InstanceDefinition, OperationRecord, filters};
