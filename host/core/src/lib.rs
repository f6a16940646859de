//! What every jobhost crate shares: the resources of the job model, the engine's typed errors,
//! topic patterns and event filters, and the engine's clock.
//!
//! # Layout
//!
//! - [`model`]: the resources (environments, sheets, records, jobs, events, executions) and
//!   their fields, ids and limits.
//! - [`error`]: the typed [`Error`] of every engine call, its stable [`ErrorKind`], and
//!   [`StoreError`], which keeps a backend's cause.
//! - [`filter`]: topic patterns and event filters (what a subscription matches).
//! - [`clock`]: the engine's clock, driven by tokio time so tests can pause it.
//! - `generate` (feature `generate`): proptest generators of the JSON values jobhost stores.
//!
//! The modules form a chain with no cycle: `model` ← `error` ← `filter`; `clock` needs only
//! `model`'s `Millis`.

pub mod clock;
pub mod error;
pub mod filter;
#[cfg(any(test, feature = "generate"))]
pub mod generate;
pub mod model;

pub use error::{Error, ErrorKind, Result, StoreError};
