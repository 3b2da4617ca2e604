//! The `sluice` binary, built inside the test crate so tests get its path from Cargo.
fn main() -> std::process::ExitCode {
    sluice_gateway::cli::main()
}
