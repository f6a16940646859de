//! The plugin author's edit-to-result loop, per language, as `jobhost dev` runs it.
//!
//! For each language: `plugin new`'s scaffold is built and loaded once (as `dev` does at
//! start), then its rule is edited N times — each edit new content, so nothing comes from a
//! build cache — and each edit is built, compiled, loaded and run on the sample; the answer
//! (the invalid records) is checked against the rule. Reported per phase, median of the
//! edits: build (the language's builder), compile (Cranelift, with the runtime's incremental
//! cache warm from the previous versions), run (the job on the 24-record sample). The
//! baseline, in the same run: compiling the same new versions with the incremental cache off.
//!
//! `cargo bench -p jobhost --bench authoring` runs every language with 4 edits; under
//! `cargo test` a quick smoke runs C with 2 edits and asserts nothing about time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost::build::Language;
use jobhost::golden;
use jobhost::runtime::{Runtime, RuntimeConfig};

/// The scaffold's rule as its source writes it.
const RULE: &str = "\"@\"";

struct Phases {
    build: Duration,
    compile: Duration,
    run: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn runtime(incremental: bool) -> Arc<Runtime> {
    Runtime::new(RuntimeConfig {
        cache_dir: None,
        incremental_cache: incremental.then_some(jobhost::runtime::DEFAULT_INCREMENTAL_CACHE),
        ..RuntimeConfig::default()
    })
    .unwrap()
}

/// Invalid records of the sample under "every email contains `required`".
fn expected_invalid(sample: &Path, required: &str) -> usize {
    let mut reader = csv::Reader::from_path(sample).unwrap();
    reader.records().filter(|r| !r.as_ref().unwrap().get(1).unwrap_or_default().contains(required)).count()
}

/// Runs the sample job through `plugin`; returns how long it took and the invalid records.
async fn run_sample(
    rt: &Arc<Runtime>,
    plugin: Arc<jobhost::runtime::Plugin>,
    src: &Path,
    name: &str,
) -> (Duration, usize) {
    let dir = tempfile::tempdir().unwrap();
    let records = jobhost::cli::read_records(&src.join("sample.csv")).unwrap();
    let job = golden::parse_job(&format!("sheet:{name}")).unwrap();
    let t = Instant::now();
    let timeout = Duration::from_secs(120);
    let snapshot =
        golden::run_in_store(dir.path(), rt, plugin, records, &job, serde_json::Value::Null, timeout).await.unwrap();
    let took = t.elapsed();
    assert_eq!(snapshot.status, jobhost::model::JobStatus::Complete, "{}", snapshot.outcome);
    (took, snapshot.invalid())
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{from} in {}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

async fn language(label: &str, language: Language, source: &str, edits: usize, tools: &Path) {
    let work = tempfile::tempdir().unwrap();
    let name = format!("bench-{}", label.to_lowercase());
    let src = work.path().join(&name);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    jobhost::scaffold::scaffold(language, &name, &src, &repo.join("plugin-sdk")).unwrap();
    if language == Language::Rust {
        // Reuse the dependencies the host's build script compiled for wasm32-wasip2.
        std::fs::copy(repo.join("plugins/Cargo.lock"), src.join("Cargo.lock")).unwrap();
        std::fs::create_dir_all(src.join(".cargo")).unwrap();
        let target = repo.join("target/wasm-plugins").canonicalize().unwrap();
        std::fs::write(
            src.join(".cargo/config.toml"),
            format!("[build]\ntarget-dir = {:?}\n", target.display().to_string()),
        )
        .unwrap();
    }
    let build = |src: PathBuf, tools: PathBuf| async move {
        tokio::task::spawn_blocking(move || jobhost::build::build_in(&src, &tools).unwrap()).await.unwrap()
    };
    let (warm, cold) = (runtime(true), runtime(false));
    // What `dev` does at start: build and load the first version.
    let t = Instant::now();
    let first = build(src.clone(), tools.to_owned()).await;
    let first_build = t.elapsed();
    let t = Instant::now();
    warm.load(&first).await.unwrap();
    let first_compile = t.elapsed();

    let file = src.join(source);
    let (mut phases, mut uncached) = (Vec::new(), Vec::new());
    let mut rule = RULE.to_owned();
    for i in 0..edits {
        // New content every time ("@e", "@ex", …): the build cache never answers.
        let required = format!("@{}", &"example.com"[..(i % 10) + 1]);
        let next = format!("\"{required}\"");
        edit(&file, &rule, &next);
        rule = next;
        let t = Instant::now();
        let component = build(src.clone(), tools.to_owned()).await;
        let built = t.elapsed();
        let t = Instant::now();
        let plugin = Arc::new(warm.load(&component).await.unwrap());
        let compiled = t.elapsed();
        let (ran, invalid) = run_sample(&warm, plugin, &src, &name).await;
        assert_eq!(invalid, expected_invalid(&src.join("sample.csv"), &required), "{label}: rule {required}");
        phases.push(Phases { build: built, compile: compiled, run: ran });
        let t = Instant::now();
        cold.load(&component).await.unwrap();
        uncached.push(t.elapsed());
    }
    let build = median(phases.iter().map(|p| p.build).collect());
    let compile = median(phases.iter().map(|p| p.compile).collect());
    let run = median(phases.iter().map(|p| p.run).collect());
    let total = build + compile + run;
    let baseline = build + median(uncached.clone()) + run;
    let (hits, misses) = warm.incremental_hits_and_misses();
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "{:<44} {:>9.2} s {:>9.2} s {:>7.2}x",
        format!("{label}: edit → new counts"),
        s(total),
        s(baseline),
        s(total) / s(baseline)
    );
    println!(
        "    build {:.2} s, compile {:.2} s (without the incremental cache {:.2} s, {:.2}x), run {:.3} s; \
         first build {:.2} s, first compile {:.2} s; functions reused {hits}, compiled {misses}",
        s(build),
        s(compile),
        s(median(uncached.clone())),
        s(compile) / s(median(uncached)),
        s(run),
        s(first_build),
        s(first_compile),
    );
}

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let only = |name: &str| named.is_empty() || named.iter().any(|a| a == name);
    let tools = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost authoring-loop benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<44} {:>11} {:>11} {:>8}", "benchmark (median of the edits)", "jobhost", "baseline", "ratio");
    rt.block_on(async {
        let edits = if full { 4 } else { 2 };
        let languages = [
            ("C", Language::C, "app.c"),
            ("Rust", Language::Rust, "src/lib.rs"),
            ("Python", Language::Python, "app.py"),
            ("JavaScript", Language::JavaScript, "app.js"),
        ];
        for (label, lang, source) in languages {
            // The quick smoke under `cargo test` builds only C: the others' builders take
            // seconds per build, and the authoring tests already build every language.
            if (full || lang == Language::C) && only(&label.to_lowercase()) {
                language(label, lang, source, edits, &tools).await;
            }
        }
    });
}
