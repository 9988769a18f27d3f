//! Entry point: everything happens in [`nixfleet_agent::cli::main`].
fn main() {}
