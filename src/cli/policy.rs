//! `tollgate policy promote|rollback`: safe policy rollout (see
//! [`crate::policy::rollout`]).

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::policy::rollout::{self, RolloutDirs};

/// `tollgate policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Make the shadow set (policy.shadow_dir) live after checking it loads;
    /// the live set is kept in policy.previous_dir (default DIR.previous).
    Promote,
    /// Swap the live set and the previous one (a second rollback undoes the first).
    Rollback,
}

/// Runs a `policy` subcommand against the directories of `config`.
pub fn run(config: &Config, command: &PolicyCommand) -> ExitCode {
    let live = config.resolve(&config.policy.dir);
    let dirs = RolloutDirs {
        previous: config.policy.previous_dir.as_ref().map_or_else(
            || RolloutDirs::default_previous(&live),
            |p| config.resolve(p),
        ),
        shadow: config.policy.shadow_dir.as_ref().map(|p| config.resolve(p)),
        live,
    };
    let check =
        |dir: &std::path::Path| super::load_store(config, Some(dir.to_path_buf())).map(drop);
    let (result, done) = match command {
        PolicyCommand::Promote => (rollout::promote(&dirs, check), "promoted"),
        PolicyCommand::Rollback => (rollout::rollback(&dirs, check), "rolled back"),
    };
    match result {
        Ok(()) => {
            println!(
                "{done}: {} is live (the set it replaced is in {}); a watching server reloads it",
                dirs.live.display(),
                dirs.previous.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
