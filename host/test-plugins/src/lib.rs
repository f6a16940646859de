//! Paths of the plugin components under `plugins/`, built from source for `wasm32-wasip2` by
//! this crate's build script. The `TEST_*` plugins exist for the tests and benchmarks; nothing
//! in the product depends on this crate (`jobhost demo` carries its own copy of the example
//! plugin).

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
