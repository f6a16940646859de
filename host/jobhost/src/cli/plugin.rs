//! `jobhost plugin check|list|build|new` on local files.

use super::*;

pub(super) async fn check(file: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    match runtime.load(file).await {
        Ok(plugin) => {
            if json_out {
                println!(
                    "{}",
                    json!({ "ok": true, "name": plugin.name, "version": plugin.version, "routes": plugin.routes })
                );
            } else {
                println!("{} ({}): {} route(s)", plugin.name, plugin.version, plugin.routes.len());
                for (i, r) in plugin.routes.iter().enumerate() {
                    let filter = if r.filter.is_null() { String::new() } else { format!(" {}", r.filter) };
                    println!("  #{i} {}{filter}", r.topic);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json_out {
                println!("{}", json!({ "ok": false, "error": e.to_string() }));
            } else {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

pub(super) async fn list(plugins: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(plugins)
        .with_context(|| format!("cannot read the plugins directory {}", plugins.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let kept = crate::reload::history(plugins, &name).unwrap_or_default();
        let entry = match runtime.load(&f).await {
            Ok(p) => {
                json!({ "name": name, "version": p.version, "routes": p.routes, "kept": kept.iter().map(|k| &k.version).collect::<Vec<_>>() })
            }
            Err(e) => {
                json!({ "name": name, "error": e.to_string(), "kept": kept.iter().map(|k| &k.version).collect::<Vec<_>>() })
            }
        };
        out.push(entry);
    }
    if json_out {
        println!("{}", Value::from(out));
    } else {
        for p in &out {
            match p.get("version") {
                Some(v) => println!(
                    "{} {} ({} route(s)); kept: {}",
                    p["name"].as_str().unwrap_or(""),
                    v.as_str().unwrap_or(""),
                    p["routes"].as_array().map_or(0, Vec::len),
                    p["kept"]
                ),
                None => {
                    println!("{} cannot load: {}", p["name"].as_str().unwrap_or(""), p["error"].as_str().unwrap_or(""))
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn build(dir: &Path, out: Option<&Path>, json_out: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let src = dir.to_owned();
    let built = tokio::task::spawn_blocking(move || crate::build::build(&src)).await??;
    let path = match out {
        Some(out) => {
            std::fs::copy(&built, out).with_context(|| format!("cannot write {}", out.display()))?;
            out.to_owned()
        }
        None => built,
    };
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if json_out {
        println!("{}", json!({ "component": path, "bytes": bytes, "seconds": started.elapsed().as_secs_f64() }));
    } else {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn new_plugin(
    name: &str,
    lang: NewLanguage,
    dir: Option<PathBuf>,
    sdk: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let (language, sdk) = match lang {
        NewLanguage::Rust => {
            let sdk = sdk.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugin-sdk"));
            let sdk =
                sdk.canonicalize().with_context(|| format!("the Rust SDK is not at {} (pass --sdk)", sdk.display()))?;
            (crate::build::Language::Rust, sdk)
        }
        // The Python SDK is part of this binary.
        NewLanguage::Python => (crate::build::Language::Python, PathBuf::new()),
        NewLanguage::Js => (crate::build::Language::JavaScript, PathBuf::new()),
        NewLanguage::C => (crate::build::Language::C, PathBuf::new()),
    };
    for path in crate::scaffold::scaffold(language, name, &dir, &sdk)? {
        println!("wrote {}", path.display());
    }
    let d = dir.display();
    println!("run it on the sample:   jobhost run --plugin-src {d} --records {d}/sample.csv --job sheet:{name}");
    println!("edit, save, see:        jobhost dev --plugin-src {d} --records {d}/sample.csv --job sheet:{name}");
    println!("golden tests:           jobhost plugin test {d}");
    Ok(ExitCode::SUCCESS)
}

/// Copies a component built from `src` into a plugins directory the atomic way (write, then
/// rename), with the manifest the sources carry when there is one (limits and grants:
/// `src/NAME.toml`, NAME the component's or the directory's name — a Rust crate
/// `enrich-emails` builds `enrich_emails.wasm`): whoever runs sources locally is their
/// operator. The manifest goes first, so the reload that sees the new component sees its
/// manifest too. A manifest already in the directory stays when the sources have none (an
/// operator may have written it).
pub(crate) fn publish(src: &Path, component: &Path, plugins: &Path) -> anyhow::Result<String> {
    let name = component.file_stem().and_then(|s| s.to_str()).context("component file name")?.to_owned();
    let src = src.canonicalize().unwrap_or_else(|_| src.to_owned());
    let dir_name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    // (`Cargo.toml` is never one, whatever the directory is called.)
    let manifest = [name.as_str(), dir_name]
        .iter()
        .filter(|n| **n != "Cargo")
        .map(|n| src.join(format!("{n}.toml")))
        .find(|p| p.is_file());
    // Written elsewhere in the directory, then renamed: the watcher never sees half a file.
    let place = |from: &Path, file: String| {
        let tmp = plugins.join(format!(".{file}.tmp"));
        std::fs::copy(from, &tmp).and_then(|_| std::fs::rename(&tmp, plugins.join(&file)))
    };
    if let Some(manifest) = manifest {
        place(&manifest, format!("{name}.toml"))
            .with_context(|| format!("cannot publish the manifest {}", manifest.display()))?;
    }
    place(component, format!("{name}.wasm"))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source directory `name` holding `files`, a plugins directory, and a built component.
    fn setup(name: &str, files: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join(name);
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&plugins).unwrap();
        for f in files {
            std::fs::write(src.join(f), format!("# {f}\n")).unwrap();
        }
        (root, src, plugins)
    }

    #[test]
    fn the_manifest_beside_the_sources_is_published_by_either_name() {
        // A Rust crate `enrich-emails` builds `enrich_emails.wasm`; its manifest is named after the directory.
        let (root, src, plugins) = setup("enrich-emails", &["Cargo.toml", "enrich-emails.toml"]);
        let wasm = root.path().join("enrich_emails.wasm");
        std::fs::write(&wasm, b"component").unwrap();
        assert_eq!(publish(&src, &wasm, &plugins).unwrap(), "enrich_emails");
        assert_eq!(std::fs::read_to_string(plugins.join("enrich_emails.toml")).unwrap(), "# enrich-emails.toml\n");
        assert_eq!(std::fs::read(plugins.join("enrich_emails.wasm")).unwrap(), b"component");

        // Named after the component, it wins.
        std::fs::write(src.join("enrich_emails.toml"), "# by component\n").unwrap();
        publish(&src, &wasm, &plugins).unwrap();
        assert_eq!(std::fs::read_to_string(plugins.join("enrich_emails.toml")).unwrap(), "# by component\n");
    }

    #[test]
    fn without_a_manifest_in_the_sources_the_directory_keeps_its_own_and_cargo_toml_is_never_one() {
        let (root, src, plugins) = setup("Cargo", &["Cargo.toml"]);
        let wasm = root.path().join("cargo_plugin.wasm");
        std::fs::write(&wasm, b"component").unwrap();
        std::fs::write(plugins.join("cargo_plugin.toml"), "# the operator's\n").unwrap();
        publish(&src, &wasm, &plugins).unwrap();
        assert_eq!(std::fs::read_to_string(plugins.join("cargo_plugin.toml")).unwrap(), "# the operator's\n");
        assert!(!plugins.join("Cargo.toml").exists());
        let entries = std::fs::read_dir(&plugins).unwrap().count();
        assert_eq!(entries, 2, "the component and the operator's manifest, no temporary files");
    }
}
