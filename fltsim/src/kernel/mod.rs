//! The kernel model: simulated threads with their IRQL and APC state, pool, bugchecks, processes, tokens and
//! impersonation, system worker threads, events and push locks.

pub mod apc;
pub mod bugcheck;
pub mod pool;
pub mod process;
pub mod security;
pub mod sync;
pub mod thread;
pub mod work;

/// IRQL values (wdm.h).
pub mod irql {
    /// `PASSIVE_LEVEL`.
    pub const PASSIVE: u8 = 0;
    /// `APC_LEVEL`.
    pub const APC: u8 = 1;
    /// `DISPATCH_LEVEL`.
    pub const DISPATCH: u8 = 2;
    /// `HIGH_LEVEL` on 64-bit Windows.
    pub const HIGH: u8 = 15;

    /// The IRQL's name as the docs write it.
    #[must_use]
    pub fn name(level: u8) -> String {
        match level {
            PASSIVE => "PASSIVE_LEVEL".to_owned(),
            APC => "APC_LEVEL".to_owned(),
            DISPATCH => "DISPATCH_LEVEL".to_owned(),
            other => format!("IRQL {other}"),
        }
    }
}
