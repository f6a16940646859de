//! Builds the example plugin `jobhost demo` runs (`plugins/submit-large-sheet`) and embeds it
//! in the binary (`OUT_DIR/demo_plugin.rs`), so the demo works wherever the binary is copied.
//! Adds the `wasm32-wasip2` target when the machine lacks it — `jobhost plugin build` and
//! `dev` need it for Rust plugins too.

#[path = "../test-plugins/build_plugins.rs"]
mod build_plugins;

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let built = build_plugins::build(&["submit-large-sheet"]);
    let (_, wasm) = built.first().expect("the example plugin was built");
    let code = format!(
        "/// The example plugin (`plugins/submit-large-sheet`) as a component.\npub const SUBMIT_LARGE_SHEET: &[u8] = include_bytes!({:?});\n",
        wasm.display().to_string()
    );
    std::fs::write(out.join("demo_plugin.rs"), code).expect("write demo_plugin.rs");
}
