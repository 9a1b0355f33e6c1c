//! `tollgate`: parse the command line, run it, exit with its status.

use std::process::ExitCode;

use clap::Parser;

// Decisions allocate many small short-lived objects (Cedar's evaluator most
// of all); mimalloc serves them markedly faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stack of each runtime thread. Cedar evaluates recursively; loading bounds
/// how deep a policy may nest, and this leaves a wide margin above that bound.
const WORKER_STACK_BYTES: usize = 8 * 1024 * 1024;

fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {}", tollgate::cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}
