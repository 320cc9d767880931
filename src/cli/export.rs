//! `baton export`: write a checkpoint in another model layout (Hugging Face GPT-2).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::CliError;
use crate::engine::{checkpoint, export};

/// Arguments of `baton export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint directory (or a run's `checkpoints/` folder: the newest complete one is used).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Target layout.
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    pub format: ExportFormat,
    /// Output directory (must be empty or absent unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write into a non-empty --out, replacing the files of the same names there.
    #[arg(long)]
    pub force: bool,
}

/// Export layouts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face `transformers` GPT-2: `model.safetensors` + `config.json`.
    Hf,
}

/// Runs `baton export`.
pub fn run(args: &ExportArgs) -> Result<(), CliError> {
    if !args.force {
        if let Ok(mut entries) = std::fs::read_dir(&args.out) {
            if let Some(Ok(first)) = entries.next() {
                return Err(CliError::usage(format!(
                    "--out {} is not empty (it holds {}); pass --force to overwrite, or choose an empty directory",
                    args.out.display(),
                    first.file_name().to_string_lossy()
                )));
            }
        } else if args.out.exists() {
            return Err(CliError::usage(format!(
                "--out {} exists and is not a directory",
                args.out.display()
            )));
        }
    }
    let ckpt = checkpoint::load(&args.checkpoint).map_err(|e| CliError::failure(e.to_string()))?;
    match args.format {
        ExportFormat::Hf => {
            let model = ckpt.manifest.gpt2().map_err(|e| CliError::failure(e.to_string()))?;
            export::export_hf(&ckpt.params, &model.config, &args.out).map_err(|e| CliError::failure(e.to_string()))?
        }
    }
    eprintln!("exported {} to {}", ckpt.dir.display(), args.out.display());
    Ok(())
}
