//! Test filters that sit above the filter under test and put its callbacks in the contexts it must survive: a
//! create pended and replayed from a system worker ([`poster`]), and reads issued at APC_LEVEL, inside a guarded
//! region or with a top-level IRP set ([`context_reader`]). Each loads through the ordinary loader, with its own
//! service and an altitude above Shunt's, so scenarios load it beside Shunt. [`locker`] is a filter that serves a
//! file's byte-range locks itself, for the lock tests.
//!
//! They are correct filters: they break no rule themselves, unless a test asks one to (which `tests/testfilters.rs`
//! and the lock tests show). [`build`] holds the registration boilerplate they share with the test filters of
//! fltsim's own tests.

pub mod build;
pub mod context_reader;
pub mod locker;
pub mod poster;
