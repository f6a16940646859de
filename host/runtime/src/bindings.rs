//! Host-side bindings of the `jobhost:plugin` world, generated from the root `wit/` — the
//! same files the guest SDK generates from.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});
