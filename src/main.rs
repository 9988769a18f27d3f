//! Entry point: everything happens in [`nixfleet_agent::cli::main`], which returns the
//! documented exit code (see `exit.rs`).

fn main() -> std::process::ExitCode {
    nixfleet_agent::cli::main()
}
