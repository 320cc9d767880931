//! The `baton` command line: argument parsing and the subcommands.

mod export;
mod generate;
mod launch;
mod plan;
mod plan_scale;
pub mod report;
mod schedule;
pub mod tensorboard;
mod trace;
pub mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Exit code for bad command-line arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a failure while running a command.
pub const EXIT_FAILURE: u8 = 1;

/// Baton: pipeline-parallel training for transformer language models.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate (or import), validate and simulate a pipeline schedule, and print or draw it.
    Schedule(schedule::ScheduleArgs),
    /// Profile a GPT's units and find the fastest split, schedule, micro-batch count, chunks and recomputation
    /// under a per-stage memory budget; print the plan and draw its timeline.
    Plan(Box<plan::PlanArgs>),
    /// Train a GPT split into pipeline stages (defaults: 4 layers, d_model 128, 4 stages, 1F1B, 8 micro-batches).
    Train(Box<train::TrainArgs>),
    /// Sample text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Write a checkpoint in the Hugging Face GPT-2 layout.
    Export(export::ExportArgs),
    /// Write a run's report (`report.html`, `loss.svg`) from its directory (`baton train` writes one at its end).
    Report(report::ReportArgs),
    /// Supervise a training job (`mpirun …`, `srun …` or `baton train …`): restart it from its newest checkpoint
    /// after a failure, naming the lost rank and stage.
    Launch(launch::LaunchArgs),
}

/// The command line as `baton` parses it: the derived [`Cli`] with every `baton train` default appended to its
/// help (`[default: 300]`, taken from [`train::TrainConfig::default`], so help and behaviour cannot disagree) and
/// negative numbers accepted as values (so `--steps -1` is reported as a bad value of `--steps`).
pub fn command() -> clap::Command {
    let defaults = train::defaults_for_help();
    Cli::command()
        .mut_subcommands(|sub| {
            sub.mut_args(|a| {
                if a.get_action().takes_values() {
                    a.allow_negative_numbers(true)
                } else {
                    a
                }
            })
        })
        .mut_subcommand("train", |t| {
            t.mut_args(|a| match defaults.get(a.get_id().as_str()) {
                Some(v) => {
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    a.help(format!("{help} [default: {v}]"))
                }
                None => a,
            })
        })
}

/// Parses `std::env::args`, runs the command, and maps errors to a one-line message and exit code.
pub fn main() -> ExitCode {
    let parsed = command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // clap's whole message: what is wrong (every missing argument, the valid values), the usage line and
            // where help is. Help and version go to stdout with status 0; every usage error exits 2.
            let _ = e.print();
            return if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_USAGE)
            };
        }
    };
    let result = match cli.command {
        Command::Schedule(args) => schedule::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Launch(args) => launch::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// A CLI failure: a one-line message and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// One line for the user.
    pub message: String,
    /// Process exit code.
    pub code: u8,
}

impl CliError {
    /// A usage error (bad argument value): exit code 2.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }

    /// A failure while running: exit code 1.
    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: EXIT_FAILURE,
        }
    }
}

/// Writes `contents` to `path`, or to stdout when no path is given. A file is written to a
/// temporary name and renamed, so a failed write never leaves a half-written file behind.
pub(crate) fn write_output(path: Option<&std::path::Path>, contents: &str) -> Result<(), CliError> {
    use std::io::Write;
    match path {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(contents.as_bytes())
                .map_err(|e| CliError::failure(format!("writing to stdout: {e}")))
        }
        Some(path) => {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = std::path::PathBuf::from(tmp);
            std::fs::write(&tmp, contents)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| CliError::failure(format!("writing {}: {e}", path.display())))
        }
    }
}
