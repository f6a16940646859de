//! Builds plugins under `plugins/` to `wasm32-wasip2` components, shared by the build scripts
//! of `jobhost-test-plugins` (every plugin, for the tests and benchmarks) and `jobhost` (the
//! example plugin `jobhost demo` carries).
//!
//! Plugins are source, never committed binaries. A fresh machine has no `wasm32-wasip2`
//! standard library (and `RUSTUP_AUTO_INSTALL=0` means nothing installs it on demand), so this
//! adds the target with rustup when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "wasm32-wasip2";

/// Builds the plugins named in `only` (every plugin when empty) in release mode and returns
/// `(name, component path)` for each. Panics with the build's output when it fails: a build
/// script has no better way to say it.
pub fn build(only: &[&str]) -> Vec<(String, PathBuf)> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // Every host crate lives in `host/<crate>/`.
    let root = manifest.ancestors().nth(2).expect("the crate lives in host/ of the workspace").to_path_buf();
    let plugins = root.join("plugins");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one plugin build between
    // profiles and crates, outside plugins/ so building never dirties what we watch.
    let target_dir = out.ancestors().nth(4).map_or_else(|| root.join("target"), Path::to_path_buf).join("wasm-plugins");

    for watched in [
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/.cargo/config.toml",
        "plugin-sdk/src",
        "plugin-sdk/Cargo.toml",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let members: Vec<PathBuf> = plugin_dirs(&plugins)
        .into_iter()
        .filter(|m| only.is_empty() || m.file_name().and_then(|n| n.to_str()).is_some_and(|n| only.contains(&n)))
        .collect();
    for m in &members {
        println!("cargo:rerun-if-changed={}", m.join("src").display());
        println!("cargo:rerun-if-changed={}", m.join("Cargo.toml").display());
    }

    // Two build scripts (this crate's and `jobhost`'s) may run at once: one at a time adds the
    // target and builds, so a fresh machine never runs two `rustup target add`s together.
    std::fs::create_dir_all(&target_dir).expect("create the plugins' target directory");
    let lock = std::fs::File::create(target_dir.join(".build.lock")).expect("create the plugins' build lock");
    lock.lock().expect("take the plugins' build lock");

    ensure_target();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release", "--target", TARGET, "--manifest-path"]).arg(plugins.join("Cargo.toml"));
    for name in only {
        command.args(["-p", name]);
    }
    let output = command
        .arg("--target-dir")
        .arg(&target_dir)
        // In plugins/, so its `.cargo/config.toml` (the plugins' link settings) applies.
        .current_dir(&plugins)
        // What the outer build set for the host must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .output()
        .expect("run cargo to build the plugins");
    if !output.status.success() {
        panic!(
            "building the plugins for {TARGET} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    members
        .iter()
        .map(|m| {
            let name = m.file_name().and_then(|n| n.to_str()).expect("plugin directory name").to_owned();
            let wasm = target_dir.join(TARGET).join("release").join(format!("{}.wasm", name.replace('-', "_")));
            assert!(wasm.exists(), "plugin {name} built but {} is missing", wasm.display());
            (name, wasm)
        })
        .collect()
}

fn plugin_dirs(plugins: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(plugins)
        .expect("read plugins/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").exists() && p.join("src").exists())
        .collect();
    dirs.sort();
    dirs
}

fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().expect("run rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).exists() {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup (needed to build plugins)");
    let status = Command::new("rustup").args(["target", "add", TARGET]).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`rustup target add {TARGET}` failed ({s}); install the target and build again"),
        Err(e) => panic!(
            "the {TARGET} target is missing and rustup could not be run ({e}); install the target and build again"
        ),
    }
}
