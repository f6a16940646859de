//! jobhost's integration tests, linked as one test binary (wasmtime and the host are linked
//! once, not once per file). Each module is one area; `support` holds the shared helpers.
//!
//! The engine's rules are not here: they are the store conformance suite
//! (`jobhost-engine`'s `conformance` feature), which every backend runs from its own crate.
//! These tests cover what sits on top — the WebAssembly runtime, the sandbox, hot reload, the
//! HTTP API, every guest language, the `jobhost` binary — and crash recovery.

mod support;

mod api;
mod cli;
mod console;
mod crash;
mod disk;
mod fleet;
mod languages;
mod outbound;
mod reload;
mod runtime;
mod sandbox;
