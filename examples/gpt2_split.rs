//! GPT-2 with an explicit, uneven split and the ZB-H1 zero-bubble schedule; a run interrupted by a checkpoint
//! and resumed **on another layout** (2 stages, 1F1B) ends bitwise equal to the uninterrupted run.
//!
//! ```sh
//! cargo run --release --example gpt2_split            # 40 steps, checkpoint at 20
//! cargo run --release --example gpt2_split -- --quick # 12 steps, checkpoint at 6 (what the test command runs)
//! ```

use std::sync::Arc;

use baton::engine::checkpoint;
use baton::engine::data::{default_corpus, Split, Tokenizer};
use baton::engine::trainer::Quiet;
use baton::engine::{
    Cpu, Gpt2, GptConfig, OptimizerConfig, Pipeline, Result, SplitData, StageSplit, TrainOptions, Trainer,
    TrainerConfig,
};
use baton::schedules::{generate, ScheduleKind};

const SEQ: usize = 32;
const BATCH: usize = 8;

/// A trainer for `steps` steps of GPT-2 on `stages` CPU stages with schedule `kind` and `split`.
fn trainer(config: TrainerConfig, kind: ScheduleKind, stages: u32, split: StageSplit) -> Result<Trainer<'static, Cpu>> {
    let gpt = GptConfig {
        vocab_size: Tokenizer::bytes().vocab_size(),
        max_seq: SEQ,
        layers: 4,
        d_model: 64,
        heads: 4,
    };
    let model = Arc::new(Gpt2::new(gpt, 1337)?);
    let options = TrainOptions {
        optimizer: OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 4,
            total_steps: config.steps,
            ..OptimizerConfig::default()
        },
        ..TrainOptions::default()
    };
    Trainer::new(config, move || {
        Pipeline::builder(model.clone())
            .schedule(generate(kind, stages, 4, 1)?)
            .split(split.clone())
            .options(options.clone())
            .build(vec![Cpu; stages as usize])
    })
}

fn data() -> Result<SplitData> {
    let tokens = Tokenizer::bytes().encode(default_corpus());
    SplitData::new(Split::new(&tokens, 0.1, BATCH, SEQ)?, 42)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 12 } else { 40 };
    let root = std::env::temp_dir().join(format!("baton-example-gpt2-split-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // Units: 0 embedding, 1..=4 blocks, 5 head. Uneven: the first stage takes the embedding alone, the second
    // three blocks, the third the last block and the head.
    let uneven = StageSplit::parse("0..1,1..4,4..6")?;
    let base = TrainerConfig {
        steps,
        eval_every: 0,
        eval_batches: 2,
        ..TrainerConfig::default()
    };

    // Uninterrupted.
    let mut full = trainer(base.clone(), ScheduleKind::ZbH1, 3, uneven.clone())?;
    let summary = full.run(&mut data()?, &mut Quiet)?;
    println!(
        "uninterrupted: {} steps, ZB-H1 on 3 stages {:?}, val loss {:.4} -> {:.4}",
        summary.step,
        full.pipeline().ranges(),
        summary.first_val.unwrap_or(f32::NAN),
        summary.last_val.unwrap_or(f32::NAN)
    );

    // Interrupted halfway with a checkpoint...
    let half = TrainerConfig {
        stop_at: Some(steps / 2),
        checkpoint_dir: Some(root.clone()),
        ..base.clone()
    };
    let mut first = trainer(half, ScheduleKind::ZbH1, 3, uneven)?;
    first.run(&mut data()?, &mut Quiet)?;
    let ck = checkpoint::load(&root)?;
    println!("checkpoint {} at step {}", ck.dir.display(), ck.manifest.step);

    // ... and resumed on another layout: 2 stages, 1F1B, the model's even split.
    let mut second = trainer(
        TrainerConfig {
            checkpoint_dir: Some(root.clone()),
            ..base
        },
        ScheduleKind::OneFOneB,
        2,
        StageSplit::Uniform,
    )?;
    let mut resumed_data = data()?;
    second.resume(&ck, &mut resumed_data)?;
    let end = second.run(&mut resumed_data, &mut Quiet)?;
    println!(
        "resumed on 1F1B with 2 stages {:?}: step {}",
        second.pipeline().ranges(),
        end.step
    );

    let (a, b) = (full.pipeline().parameters()?, second.pipeline().parameters()?);
    let differing: Vec<&String> = a
        .iter()
        .filter(|(name, t)| {
            b.get(*name)
                .is_none_or(|u| t.data.iter().zip(&u.data).any(|(x, y)| x.to_bits() != y.to_bits()))
        })
        .map(|(name, _)| name)
        .collect();
    std::fs::remove_dir_all(&root)?;
    if !differing.is_empty() || a.len() != b.len() {
        return Err(format!("resumed run differs from the uninterrupted one in {differing:?}").into());
    }
    println!(
        "the resumed run's {} parameters are bitwise equal to the uninterrupted run's",
        a.len()
    );
    Ok(())
}
