//! The `jobhost` binary: argument parsing lives in [`jobhost::cli`].

fn main() -> std::process::ExitCode {
    jobhost::cli::main()
}
