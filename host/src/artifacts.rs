//! Paths of the plugin components under `plugins/`, built from source by `build.rs` for
//! `wasm32-wasip2`. The example plugin (`SUBMIT_LARGE_SHEET`) backs `jobhost demo`; the
//! `TEST_*` plugins exist for the tests and benchmarks.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
