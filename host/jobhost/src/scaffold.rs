//! `jobhost plugin new`: a plugin that runs at once, in every guest language.
//!
//! Each language gets the same listener, in the seeds' shape: the parent `sheet:NAME` job
//! splits by record count, each part checks one rule on its page and writes messages back,
//! and the parent completes on `job:parts-completed`. Beside the source: `sample.csv`, a
//! golden test (`tests/sample/`) whose expectation the sample meets, and a README with the
//! next commands. The templates live in `host/jobhost/templates/` and are part of the binary.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::build::Language;
use crate::golden::{PartCounts, RecordMessages, Snapshot};
use crate::model::{JobStatus, Message};

const SAMPLE: &str = include_str!("../templates/sample.csv");
const README: &str = include_str!("../templates/README.md");
const FIXTURE: &str = include_str!("../templates/fixture.toml");
const RUST_LIB: &str = include_str!("../templates/rust/src/lib.rs");
const PYTHON_APP: &str = include_str!("../templates/python/app.py");
const JS_APP: &str = include_str!("../templates/js/app.js");
const C_APP: &str = include_str!("../templates/c/app.c");

/// Records per part in every template.
const PART_SIZE: u64 = 10;
/// What every template's rule requires of an email.
const REQUIRED: &str = "@";

/// Whether `name` may name a plugin: 1 to 64 of a-z, 0-9 and `-`, starting with a letter.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Writes a plugin called `name` in `dir` (which must not exist yet). `sdk` is the Rust SDK's
/// directory (a path dependency of a Rust plugin); the other SDKs come with the binary.
/// Returns the files written.
pub fn scaffold(language: Language, name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !valid_name(name) {
        bail!("`{name}` is not a plugin name (1 to 64 of a-z, 0-9 and `-`, starting with a letter)");
    }
    if dir.exists() {
        bail!("{} already exists; choose a new directory", dir.display());
    }
    let fill = |t: &str| t.replace("{{name}}", name);
    let (label, source, build_note, sdk_doc) = match language {
        Language::Rust => (
            "Rust",
            "`src/lib.rs`",
            "`jobhost plugin build .` runs `cargo build --release --target wasm32-wasip2` (add the target \
             once with `rustup target add wasm32-wasip2`).",
            "`cargo doc -p jobhost-plugin-sdk --open` in the jobhost repository",
        ),
        Language::Python => (
            "Python",
            "`app.py`",
            "`jobhost plugin build .` makes the component with componentize-py (pinned, installed on \
             first use); the `jobhost_listener` module comes with `jobhost`.",
            "the docstrings of `jobhost_listener` (`plugin-sdk/python/jobhost_listener/__init__.py`; \
             `help(jobhost_listener)`)",
        ),
        Language::JavaScript => (
            "JavaScript",
            "`app.js`",
            "`jobhost plugin build .` bundles `app.js` with the `jobhost-listener` SDK and makes the \
             component with componentize-js (pinned, installed on first use). `jobhost-listener.d.ts` \
             gives editors the SDK's types.",
            "`jobhost-listener.d.ts` (JSDoc on every function)",
        ),
        Language::C => (
            "C",
            "`app.c`",
            "`jobhost plugin build .` generates `plugin.h` from the WIT contract, compiles with \
             clang-19 and wasi-libc (from Debian, installed on first use as root) and makes the \
             component.",
            "the comments in `jobhost.h` (`plugin-sdk/c/jobhost.h`)",
        ),
    };
    let readme = fill(README)
        .replace("{{language}}", label)
        .replace("{{source}}", source)
        .replace("{{part_size}}", &PART_SIZE.to_string())
        .replace("{{build_note}}", build_note)
        .replace("{{sdk_doc}}", sdk_doc);
    let mut files: Vec<(&str, String)> = match language {
        Language::Rust => vec![
            ("Cargo.toml", RUST_CARGO.replace("{name}", name).replace("{sdk}", &sdk.display().to_string())),
            ("src/lib.rs", fill(RUST_LIB)),
            (".cargo/config.toml", RUST_CARGO_CONFIG.into()),
            (".gitignore", "/target\n".into()),
        ],
        Language::Python => vec![("app.py", fill(PYTHON_APP))],
        Language::JavaScript => vec![
            ("app.js", fill(JS_APP)),
            // Editors find the SDK's types here; the build supplies the SDK itself.
            ("jobhost-listener.d.ts", crate::build::JS_SDK_TYPES.to_owned()),
            ("jsconfig.json", JS_CONFIG.to_owned()),
        ],
        Language::C => vec![("app.c", fill(C_APP))],
    };
    files.push(("README.md", readme));
    files.push(("sample.csv", SAMPLE.to_owned()));
    files.push(("tests/sample/fixture.toml", fill(FIXTURE)));
    let mut expected = serde_json::to_string_pretty(&sample_expectation()?)?;
    expected.push('\n');
    files.push(("tests/sample/expected.json", expected));
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap_or(dir))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// What every template produces on `sample.csv`: the golden expectation `plugin new` writes.
fn sample_expectation() -> anyhow::Result<Snapshot> {
    let mut reader = csv::Reader::from_reader(SAMPLE.as_bytes());
    let headers = reader.headers()?.clone();
    let email = headers.iter().position(|h| h == "email").context("the sample has no email column")?;
    let (mut total, mut records) = (0u64, Vec::new());
    for row in reader.records() {
        total += 1;
        if !row?.get(email).unwrap_or_default().contains(REQUIRED) {
            let message = Message::error("email", format!("email must contain {REQUIRED}"));
            records.push(RecordMessages { record: total, messages: vec![message] });
        }
    }
    let error = records.len() as u64;
    let n = total.div_ceil(PART_SIZE);
    let parts = PartCounts { total: n, completed: n, failed: 0, canceled: 0 };
    Ok(Snapshot {
        status: JobStatus::Complete,
        outcome: json!({
            "message": format!("{total} records, {error} invalid"),
            "parts": parts,
            "records": { "total": total, "valid": total - error, "error": error },
        }),
        parts,
        records,
    })
}

const RUST_CARGO: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
jobhost-plugin-sdk = { path = "{sdk}" }

# A plugin is its own workspace (not a member of an enclosing one).
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = "debuginfo"
"#;

/// The same link setting as the repository's `plugins/.cargo/config.toml`, and why.
const RUST_CARGO_CONFIG: &str = r#"# Start with 2 MiB of linear memory instead of the linker's default (the 1 MiB stack plus static
# data), so a handler reading a page of 1,000 records does not grow its memory: a growth costs
# the host a protection change, and shrinking the pooled slot back for the next event a TLB
# shootdown. Raise it if the linker says the initial memory is too small for your static data;
# keep it under the plugin's `memory_mib` limit. Cargo reads this file when run in this
# directory, as `jobhost plugin build` does.
[target.wasm32-wasip2]
rustflags = ["-C", "link-arg=--initial-memory=2097152"]
"#;

const JS_CONFIG: &str = r#"{
  "compilerOptions": {
    "checkJs": true,
    "module": "es2022",
    "target": "es2022",
    "paths": { "jobhost-listener": ["./jobhost-listener.d.ts"] }
  }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_expectation_counts_the_sample() {
        let s = sample_expectation().unwrap();
        assert_eq!(s.outcome["records"], json!({"total": 24, "valid": 19, "error": 5}));
        assert_eq!(s.parts.total, 3);
        let invalid: Vec<u64> = s.records.iter().map(|r| r.record).collect();
        assert_eq!(invalid, [3, 6, 9, 15, 20], "the sample's rows without @");
    }

    /// A scaffolded Rust plugin links as the repository's plugins do: the same flags, so the
    /// tests' shared target directory builds both without recompiling the dependencies.
    #[test]
    fn a_rust_plugin_links_with_the_repository_plugins_settings() {
        let section = |text: &str| text.lines().skip_while(|l| !l.starts_with('[')).collect::<Vec<_>>().join("\n");
        let ours = section(include_str!("../../../plugins/.cargo/config.toml"));
        assert!(ours.contains("--initial-memory=2097152"), "{ours}");
        assert_eq!(section(RUST_CARGO_CONFIG), ours);

        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("p");
        let written = scaffold(Language::Rust, "p", &plugin, Path::new("sdk")).unwrap();
        let config = plugin.join(".cargo/config.toml");
        assert!(written.contains(&config), "{written:?}");
        assert_eq!(std::fs::read_to_string(config).unwrap(), RUST_CARGO_CONFIG);
    }
}
