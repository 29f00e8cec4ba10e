//! The `schemagate` binary: a thin shell around the library's command line.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    schemagate::cli::main().await
}
