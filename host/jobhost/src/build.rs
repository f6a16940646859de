//! Building plugins from source, for every guest language, with one command
//! (`jobhost plugin build DIR`).
//!
//! - The language is read off the directory: `Cargo.toml` → Rust, `app.py` → Python,
//!   `app.js` → JavaScript, `app.c` → C.
//! - Toolchains are pinned ([`COMPONENTIZE_PY`], [`COMPONENTIZE_JS`]) and installed on first
//!   use from their registry (PyPI, npm, Debian's packages for clang and wasi-libc) into the
//!   tools directory (`JOBHOST_TOOLS`, default
//!   `~/.cache/jobhost/tools`), never from whatever happens to be on the machine.
//! - The language SDK and the WIT contract are part of this binary and staged next to the
//!   source, so a plugin builds anywhere the `jobhost` binary is.
//! - Builds of the large guests (a Python component is ~19 MB, a JavaScript one ~12 MB, and
//!   each takes seconds) are cached by
//!   content: the hash of the tool version, the WIT, the SDK and every source file names the
//!   output, so an unchanged plugin is never rebuilt. Rust builds use Cargo's own cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};

/// The WIT contract every plugin is built against.
pub const WIT: &str = include_str!("../../../wit/jobhost.wit");
/// The Python listener SDK (`jobhost_listener`).
pub const PYTHON_SDK: &str = include_str!("../../../plugin-sdk/python/jobhost_listener/__init__.py");
/// The world Python plugins are built against (`python-plugin`: the plugin world and
/// `wasi:http`) and the parts of `wasi:http`, `wasi:io` and `wasi:clocks` the SDK's `http`
/// client uses, as (path under the build's `wit/`, text).
pub const PYTHON_WIT: &[(&str, &str)] = &[
    ("python.wit", include_str!("../../../plugin-sdk/python/wit/python.wit")),
    ("deps/http.wit", include_str!("../../../plugin-sdk/python/wit/deps/http.wit")),
    ("deps/io.wit", include_str!("../../../plugin-sdk/python/wit/deps/io.wit")),
    ("deps/clocks.wit", include_str!("../../../plugin-sdk/python/wit/deps/clocks.wit")),
];
/// componentize-py, from PyPI, exactly this version.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// The JavaScript listener SDK (`jobhost-listener`).
pub const JS_SDK: &str = include_str!("../../../plugin-sdk/js/jobhost-listener.js");
/// Its TypeScript declarations.
pub const JS_SDK_TYPES: &str = include_str!("../../../plugin-sdk/js/jobhost-listener.d.ts");
/// @bytecodealliance/componentize-js, from npm, exactly this version.
pub const COMPONENTIZE_JS: &str = "0.23.0";
/// The C listener SDK (`jobhost.h`).
pub const C_SDK: &str = include_str!("../../../plugin-sdk/c/jobhost.h");
/// clang from Debian, this major version, with wasi-libc and the wasm32 compiler runtime.
pub const CLANG: &str = "clang-19";
/// The Debian packages of the C toolchain.
pub const C_PACKAGES: &[&str] = &["clang-19", "lld-19", "wasi-libc", "libclang-rt-19-dev-wasm32"];
/// rolldown, from npm: bundles the app, its modules and the SDK into the one module
/// componentize-js takes (it resolves no package imports itself).
pub const ROLLDOWN: &str = "1.3.2";

/// A guest language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// A Cargo package building a `cdylib` for `wasm32-wasip2`.
    Rust,
    /// `app.py` (with any modules beside it) using `jobhost_listener`.
    Python,
    /// `app.js` (an ES module, with any modules beside it) using `jobhost-listener`.
    JavaScript,
    /// `app.c` (with any `.c` and `.h` files beside it) using `jobhost.h`.
    C,
}

impl Language {
    /// The language of the plugin source in `dir`.
    pub fn detect(dir: &Path) -> anyhow::Result<Self> {
        if dir.join("Cargo.toml").is_file() {
            Ok(Self::Rust)
        } else if dir.join("app.py").is_file() {
            Ok(Self::Python)
        } else if dir.join("app.js").is_file() {
            Ok(Self::JavaScript)
        } else if dir.join("app.c").is_file() {
            Ok(Self::C)
        } else {
            bail!(
                "{}: no plugin source here (expected Cargo.toml for Rust, app.py for Python, app.js for \
                 JavaScript or app.c for C)",
                dir.display()
            )
        }
    }
}

/// Where pinned toolchains are installed.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("JOBHOST_TOOLS") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("jobhost").join("tools")
}

/// Builds the plugin in `src` with the tools in [`tools_dir`]; returns the component (in a
/// cache: copy it to deploy it).
pub fn build(src: &Path) -> anyhow::Result<PathBuf> {
    build_in(src, &tools_dir())
}

/// [`build`] with the tools and build cache in `tools`.
pub fn build_in(src: &Path, tools: &Path) -> anyhow::Result<PathBuf> {
    match Language::detect(src)? {
        Language::Rust => build_rust(src),
        Language::Python => build_python(src, tools),
        Language::JavaScript => build_js(src, tools),
        Language::C => build_c(src, tools),
    }
}

/// Runs a command; on failure the error carries what it printed.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        let program = Path::new(cmd.get_program()).file_name().unwrap_or_default().to_string_lossy().into_owned();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        bail!("{program} failed ({}):\n{}", out.status, tidy(&text));
    }
    Ok(())
}

/// A tool's error output without the tool's own insides: a Rust backtrace (componentize-py is
/// Rust underneath) and the stack frames of a Node.js tool say nothing about the author's code.
fn tidy(text: &str) -> String {
    let text = text.split("\nStack backtrace:").next().unwrap_or(text);
    let mut out: Vec<&str> =
        text.lines().filter(|l| !(l.trim_start().starts_with("at ") && l.contains("node_modules"))).collect();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.join("\n")
}

/// Runs `f` holding an exclusive lock on `name` in the tools directory: builds and installs
/// run from several processes (and test threads) at once.
fn locked<T>(dir: &Path, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = std::fs::File::create(dir.join(format!(".{name}.lock")))?;
    file.lock().with_context(|| format!("cannot lock {name} in {}", dir.display()))?;
    f()
}

/// A Python virtualenv under `tools` with `package==version`, installed once per version (and
/// again when an install broke half-way); returns the path of its command `bin`.
pub fn python_tool(tools: &Path, package: &str, version: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let venv = tools.join(format!("{package}-{version}"));
    let exe = venv.join("bin").join(bin);
    let stamp = venv.join(".installed");
    locked(tools, &format!("{package}-{version}"), || {
        if stamp.is_file() && exe.is_file() {
            return Ok(exe.clone());
        }
        // No stamp: a fresh machine or an install that broke half-way; start over.
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("Python 3 with the venv module is needed to build Python plugins")?;
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", &format!("{package}=={version}")]))
            .with_context(|| format!("cannot install {package} {version} from PyPI"))?;
        std::fs::write(&stamp, version)?;
        Ok(exe.clone())
    })
}

/// npm packages at exact versions, installed together once into `tools/<name>`; returns the
/// directory whose `node_modules/.bin` has their commands.
fn npm_tools(tools: &Path, name: &str, packages: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let dir = tools.join(name);
    let stamp = dir.join(".installed");
    let specs: Vec<String> = packages.iter().map(|(p, v)| format!("{p}@{v}")).collect();
    locked(tools, name, || {
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s == specs.join(" ")) {
            return Ok(dir.clone());
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--save-exact", "--prefix"])
            .arg(&dir)
            .args(&specs))
        .with_context(|| format!("cannot install {} from npm (Node.js and npm are needed)", specs.join(", ")))?;
        std::fs::write(&stamp, specs.join(" "))?;
        Ok(dir.clone())
    })
}

/// Every file under `dir` (sorted), skipping build output and caches.
fn source_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with('.') || matches!(name, "__pycache__" | "target" | "node_modules") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies the plugin's source files (as [`source_files`] sees them) under `to`.
fn copy_sources(src: &Path, to: &Path) -> anyhow::Result<()> {
    for file in source_files(src)? {
        let dest = to.join(file.strip_prefix(src).unwrap_or(&file));
        std::fs::create_dir_all(dest.parent().unwrap_or(to))?;
        std::fs::copy(&file, &dest).with_context(|| format!("cannot copy {}", file.display()))?;
    }
    Ok(())
}

/// The content key of a build: tool, contract, SDK and sources.
fn content_key(tool: &str, sdk: &str, src: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    for part in [tool, WIT, sdk] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for file in source_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file).to_string_lossy().into_owned();
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// A key that changes exactly when a plugin's sources change (`jobhost dev` rebuilds on it).
pub fn source_key(src: &Path) -> anyhow::Result<String> {
    content_key("", "", src)
}

fn plugin_name(src: &Path) -> anyhow::Result<String> {
    let src = src.canonicalize().with_context(|| format!("cannot read {}", src.display()))?;
    Ok(src.file_name().and_then(|n| n.to_str()).context("the plugin directory has no name")?.to_owned())
}

/// A build cached by content: the component for `src` under `tools/builds/<key>/<name>.wasm`,
/// where the key hashes `recipe` (tools and how they are called), the WIT, `sdk` and the
/// sources. `sources_at` is where `make` copies the sources inside its staging directory.
/// On a miss `tools_for` readies the tools, then `make` builds into a fresh staging
/// directory and writes the component to the path it is given; the staging directory is
/// removed either way. Returns the component's path.
fn cached_build<T>(
    src: &Path,
    sources_at: &str,
    tools: &Path,
    recipe: &str,
    sdk: &str,
    tools_for: impl FnOnce() -> anyhow::Result<T>,
    make: impl FnOnce(T, &Path, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let name = plugin_name(src)?;
    let key = content_key(recipe, sdk, src)?;
    let builds = tools.join("builds");
    // The file stem is the plugin's name, as for a component dropped in a directory.
    let out = builds.join(&key).join(format!("{name}.wasm"));
    if out.is_file() {
        return Ok(out);
    }
    let ready = tools_for()?;
    locked(tools, &format!("build-{key}"), || {
        if out.is_file() {
            return Ok(out.clone());
        }
        let stage = builds.join(format!(".stage-{key}"));
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&stage)?;
        std::fs::create_dir_all(builds.join(&key))?;
        let result = make(ready, &stage, &out);
        let _ = std::fs::remove_dir_all(&stage);
        // The tools saw the staged copy: name the author's files in what they reported.
        result.map(|()| out.clone()).map_err(|e| {
            let (staged, author) = (stage.join(sources_at).display().to_string(), src.display().to_string());
            let shown = format!("{e:#}")
                .replace(&format!("{}/", staged.trim_end_matches('/')), &format!("{author}/"))
                .replace(&stage.display().to_string(), &author);
            anyhow::anyhow!(shown)
        })
    })
}

/// `text` (a traceback, a build error) with the plugin's source directory named as its author
/// knows it: componentize-py names the directories of a component's Python path `/0`, `/1`,
/// …, and `/0` is the staged copy of the sources (the first `-p` of `build_python`).
pub fn python_author_paths(text: &str, src: &Path) -> String {
    text.replace("\"/0/", &format!("\"{}/", src.display()))
}

fn build_python(src: &Path, tools: &Path) -> anyhow::Result<PathBuf> {
    let recipe = format!("componentize-py {COMPONENTIZE_PY}");
    let tool = || python_tool(tools, "componentize-py", COMPONENTIZE_PY, "componentize-py");
    let sdk: String = std::iter::once(PYTHON_SDK).chain(PYTHON_WIT.iter().map(|(_, text)| *text)).collect();
    cached_build(src, "src", tools, &recipe, &sdk, tool, |componentize, stage, out| {
        std::fs::create_dir_all(stage.join("wit/deps"))?;
        std::fs::create_dir_all(stage.join("jobhost_listener"))?;
        std::fs::write(stage.join("wit/jobhost.wit"), WIT)?;
        for (path, text) in PYTHON_WIT {
            std::fs::write(stage.join("wit").join(path), text)?;
        }
        std::fs::write(stage.join("jobhost_listener/__init__.py"), PYTHON_SDK)?;
        // A copy of the sources: the builder writes bytecode caches beside what it compiles.
        copy_sources(src, &stage.join("src"))?;
        let tmp = stage.join("out.wasm");
        run(Command::new(&componentize)
            .env("RUST_BACKTRACE", "0")
            .arg("-d")
            .arg(stage.join("wit"))
            .args(["-w", "python-plugin", "componentize", "app", "-p"])
            .arg(stage.join("src"))
            .arg("-p")
            .arg(stage)
            .arg("-o")
            .arg(&tmp))
        .map_err(|e| anyhow::anyhow!(python_author_paths(&format!("{e:#}"), src)))
        .with_context(|| format!("the Python build of {} failed", src.display()))?;
        Ok(std::fs::rename(&tmp, out)?)
    })
}

/// The module componentize-js builds: it hands the root listener to the app's default export
/// (at build time: componentize-js runs the module's top level then) and exports the WIT
/// interface.
const JS_ENTRY: &str = "import setup from \"./app.js\";\n\
    import { listener as root, exported } from \"jobhost-listener\";\n\
    setup(root);\n\
    export { exported as listener };\n";

fn build_js(src: &Path, tools: &Path) -> anyhow::Result<PathBuf> {
    let recipe = format!("componentize-js {COMPONENTIZE_JS} rolldown {ROLLDOWN} {JS_ENTRY}");
    let tool = || {
        npm_tools(
            tools,
            &format!("componentize-js-{COMPONENTIZE_JS}"),
            &[("@bytecodealliance/componentize-js", COMPONENTIZE_JS), ("rolldown", ROLLDOWN)],
        )
    };
    cached_build(src, "", tools, &recipe, JS_SDK, tool, |tool, stage, out| {
        let bin = tool.join("node_modules/.bin");
        // The sources, the SDK as the package `jobhost-listener`, the contract, and the entry.
        copy_sources(src, stage)?;
        let sdk = stage.join("node_modules/jobhost-listener");
        std::fs::create_dir_all(&sdk)?;
        std::fs::write(
            sdk.join("package.json"),
            r#"{"name": "jobhost-listener", "type": "module", "main": "index.js", "types": "index.d.ts"}"#,
        )?;
        std::fs::write(sdk.join("index.js"), JS_SDK)?;
        std::fs::write(sdk.join("index.d.ts"), JS_SDK_TYPES)?;
        std::fs::create_dir_all(stage.join("wit"))?;
        std::fs::write(stage.join("wit/jobhost.wit"), WIT)?;
        std::fs::write(stage.join("__jobhost_main.js"), JS_ENTRY)?;
        let tmp = stage.join("__out.wasm");
        let externals: Vec<String> = ["jobs", "records", "sheets", "log", "config", "completion"]
            .iter()
            .map(|i| format!("jobhost:plugin/{i}@0.1.0"))
            .collect();
        run(Command::new(bin.join("rolldown"))
            .current_dir(stage)
            .args(["__jobhost_main.js", "--file", "__bundle.js", "--format", "esm", "--platform", "neutral"])
            .args(["--external", &externals.join(",")]))
        .and_then(|()| {
            run(Command::new(bin.join("componentize-js"))
                .current_dir(stage)
                .args(["__bundle.js", "--wit", "wit", "-n", "plugin", "-d", "fetch-event", "-o"])
                .arg(&tmp))
        })
        .map_err(|e| {
            // rolldown names files relative to the staging directory (`─[ app.js:15:23 ]`).
            let mut text = format!("{e:#}");
            for file in source_files(src).unwrap_or_default() {
                let rel = file.strip_prefix(src).unwrap_or(&file).display().to_string();
                text = text.replace(&format!("[ {rel}:"), &format!("[ {}:", file.display()));
            }
            anyhow::anyhow!(text)
        })
        .with_context(|| format!("the JavaScript build of {} failed", src.display()))?;
        // Stacks name lines of the bundle: keep it beside the component to look them up.
        std::fs::rename(stage.join("__bundle.js"), out.with_extension("bundle.js"))?;
        Ok(std::fs::rename(&tmp, out)?)
    })
}

/// The C toolchain's version line, installing the Debian packages first when they are missing
/// and this process may (root with apt-get).
fn c_toolchain(tools: &Path) -> anyhow::Result<String> {
    let version = || -> Option<String> {
        let out = Command::new(CLANG).arg("--version").output().ok()?;
        let sysroot = Path::new("/usr/lib/wasm32-wasi/libc.a").is_file();
        let line = String::from_utf8_lossy(&out.stdout).lines().next()?.to_owned();
        (out.status.success() && sysroot).then_some(line)
    };
    locked(tools, "c-toolchain", || {
        if let Some(v) = version() {
            return Ok(v);
        }
        let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !is_root {
            bail!("the C toolchain is missing: install it with `sudo apt-get install {}`", C_PACKAGES.join(" "));
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(C_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("cannot install {} with apt-get", C_PACKAGES.join(" ")))?;
        version().context("the C toolchain was installed but clang-19 or wasi-libc is still missing")
    })
}

/// The C bindings of the `plugin` world: `plugin.c`, `plugin.h`, `plugin_component_type.o`.
fn c_bindings(dir: &Path) -> anyhow::Result<()> {
    let mut resolve = wit_parser::Resolve::default();
    let pkg = resolve.push_str("jobhost.wit", WIT)?;
    let world = resolve.select_world(&[pkg], Some("plugin"))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files)?;
    for (name, bytes) in files.iter() {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

fn build_c(src: &Path, tools: &Path) -> anyhow::Result<PathBuf> {
    let toolchain = c_toolchain(tools)?;
    let recipe = format!("{toolchain} wit-bindgen-c 0.63.0");
    cached_build(
        src,
        "",
        tools,
        &recipe,
        C_SDK,
        || Ok(()),
        |(), stage, out| {
            copy_sources(src, stage)?;
            std::fs::write(stage.join("jobhost.h"), C_SDK)?;
            let generated = stage.join("__bindings");
            std::fs::create_dir_all(&generated)?;
            c_bindings(&generated)?;
            let mut sources: Vec<PathBuf> = source_files(src)?
                .into_iter()
                .filter(|f| f.extension().is_some_and(|e| e == "c"))
                .map(|f| stage.join(f.strip_prefix(src).unwrap_or(&f)))
                .collect();
            sources.push(generated.join("plugin.c"));
            let core = stage.join("__core.wasm");
            run(Command::new(CLANG)
                .args(["--target=wasm32-wasi", "--sysroot=/usr", "-mexec-model=reactor", "-O2", "-Wall", "-Werror"])
                .arg("-I")
                .arg(stage)
                .arg("-I")
                .arg(&generated)
                .args(&sources)
                .arg(generated.join("plugin_component_type.o"))
                .arg("-o")
                .arg(&core))
            .with_context(|| format!("the C build of {} failed", src.display()))?;
            let component = wit_component::ComponentEncoder::default()
                .module(&std::fs::read(&core)?)?
                .adapter(
                    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
                )?
                .validate(true)
                .encode()
                .context("cannot make the C module a component")?;
            Ok(std::fs::write(out, component)?)
        },
    )
}

/// Builds a Rust plugin (a Cargo package building a `cdylib`) for `wasm32-wasip2` with Cargo,
/// whose own cache makes a rebuild incremental; returns the component. Cargo's diagnostics go
/// to this process's stderr.
pub fn build_rust(src: &Path) -> anyhow::Result<PathBuf> {
    let src = &src.canonicalize().with_context(|| format!("cannot find {}", src.display()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format", "json"])
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        // In the package's directory, so its own `.cargo/config.toml` applies, as when its
        // author runs cargo there.
        .current_dir(src)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    let mut wasm = None;
    let mut errors = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                for f in msg["filenames"].as_array().into_iter().flatten() {
                    if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                        wasm = Some(PathBuf::from(f));
                    }
                }
            }
            Some("compiler-message") => {
                let m = &msg["message"];
                // Shown as rustc renders it (paths relative to the package).
                eprint!("{}", m["rendered"].as_str().unwrap_or_default());
                if m["level"] != "error" {
                    continue;
                }
                // The place and first line of each error, repeated in the build's error.
                let place = m["spans"].as_array().and_then(|s| s.iter().find(|s| s["is_primary"] == true)).map(|s| {
                    let file = src.join(s["file_name"].as_str().unwrap_or(""));
                    format!("{}:{}:{}: ", file.display(), s["line_start"], s["column_start"])
                });
                errors.push(format!("{}{}", place.unwrap_or_default(), m["message"].as_str().unwrap_or("")));
            }
            _ => {}
        }
    }
    if !output.status.success() {
        if errors.is_empty() {
            bail!("the build of {} failed (see above)", src.display());
        }
        bail!("the build of {} failed:\n{}", src.display(), errors.join("\n"));
    }
    wasm.with_context(|| format!("the build of {} produced no .wasm (is it a cdylib?)", src.display()))
}
