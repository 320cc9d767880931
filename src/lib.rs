//! Baton: a pipeline-parallel training engine for transformer language models.
//!
//! This facade re-exports the workspace crates — [`engine`] (models, backends, the pipeline, the `Trainer`,
//! checkpoints, data), [`schedules`] (the schedule IR, generators, validator, simulator and PyTorch
//! interchange) and [`kernels`] (CPU reference ops and the CUDA kernels) — and hosts the `baton` CLI.
//!
//! Embedding it: a model (GPT-2 here; any [`engine::Model`] of your own), a schedule (generated, imported from a
//! PyTorch CSV with [`schedules::schedule_from_csv`], or built by hand), one backend per stage of each
//! data-parallel replica, and the [`engine::Trainer`] loop with an [`engine::Observer`] that hears every step:
//!
//! ```
//! use std::sync::Arc;
//! use baton::engine::data::{default_corpus, Split, Tokenizer};
//! use baton::engine::trainer::{EvalEvent, Observer};
//! use baton::engine::{Cpu, DataParallel, Gpt2, GptConfig, Pipeline, SplitData, Trainer, TrainerConfig};
//! use baton::schedules::{generate, ScheduleKind};
//!
//! struct Print;
//! impl Observer for Print {
//!     fn on_eval(&mut self, e: &EvalEvent) { println!("step {}: val loss {:.3}", e.step, e.val_loss) }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gpt = GptConfig { vocab_size: 256, max_seq: 16, layers: 2, d_model: 32, heads: 2 };
//! let model = Arc::new(Gpt2::new(gpt, 1337)?);
//! let build = || {
//!     Pipeline::builder(model.clone())
//!         .schedule(generate(ScheduleKind::ZbH1, 2, 2, 1)?) // 2 stages, 2 micro-batches per replica
//!         .data_parallel(DataParallel::replicas(2)) // 2 replicas: 4 workers, batches of 8 split 4 + 4
//!         .build(vec![Cpu; 4])
//! };
//! let config = TrainerConfig { steps: 4, eval_every: 2, eval_batches: 1, ..TrainerConfig::default() };
//! let mut trainer = Trainer::new(config, build)?;
//! let tokens = Tokenizer::bytes().encode(default_corpus());
//! let mut data = SplitData::new(Split::new(&tokens, 0.1, 8, 16)?, 0)?;
//! let run = trainer.run(&mut data, &mut Print)?;
//! assert_eq!(run.step, 4);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub use baton_engine as engine;
pub use baton_kernels as kernels;
pub use baton_schedules as schedules;

pub mod cli;
