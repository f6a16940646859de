//! The Rust guest SDK for jobhost listeners.
//!
//! Listeners are compiled to WebAssembly components against the contract in `wit/`. This crate
//! will wrap the generated bindings behind an API shaped like `@flatfile/listener`
//! (`filter(...).on("job:ready", ...)`). Until the WIT contract lands, native listeners are
//! written against [`jobhost::listener`](../jobhost/listener/index.html) in the host crate.
