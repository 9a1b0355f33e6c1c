//! `tollgate`: parse the command line, run it, exit with its status.

use std::process::ExitCode;

use clap::Parser;

// Decisions allocate many small short-lived objects (Cedar's evaluator most
// of all); mimalloc serves them markedly faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    match tollgate::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {}", tollgate::cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}
