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
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Export layouts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face `transformers` GPT-2: `model.safetensors` + `config.json`.
    Hf,
}

/// Runs `baton export`.
pub fn run(args: &ExportArgs) -> Result<(), CliError> {
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
