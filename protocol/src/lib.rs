//! Shunt's protocol crate: what the driver, `shuntctl` and the tests share.
//!
//! `no_std` with `alloc` and no `unsafe`: the policy model, the compiled path matcher, the NT name rules and the
//! communication-port wire format live here so that the same code runs in the kernel and in user mode.
#![no_std]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

extern crate alloc;

/// The version of the port protocol this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
