//! The `jobhost` binary: argument parsing lives in [`jobhost::cli`].

// The host allocates on every write it batches, every event it routes and every page it
// converts, from many threads at once; mimalloc's per-thread heaps measured faster than the
// system allocator there (docs/BENCHMARKS.md, "Performance, issue 16: job lifecycles").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    jobhost::cli::main()
}
