//! A schedule dumped by PyTorch 2.15 (`torch.distributed.pipelining`'s `_dump_csv`, lowered with its
//! send/receive, wait, unshard/reshard and gradient-reduction actions) imported, validated, simulated and
//! trained. The same GPT-2 is trained with Baton's own interleaved 1F1B; both keep every part's backward in
//! micro-batch order, so the two runs must agree bit for bit.
//!
//! ```sh
//! cargo run --release --example torch_schedule                    # the committed PyTorch dump, 30 steps
//! cargo run --release --example torch_schedule -- --quick         # 8 steps (what the test command runs)
//! cargo run --release --example torch_schedule -- path/to/dump.csv
//! ```

use std::sync::Arc;

use baton::engine::data::{default_corpus, Split, Tokenizer};
use baton::engine::{Cpu, Gpt2, GptConfig, OptimizerConfig, Pipeline, SplitData, TrainOptions, Trainer, TrainerConfig};
use baton::schedules::{generate, schedule_from_csv, simulate, to_text, validate, Costs, Op, Schedule, ScheduleKind};

/// The committed dump: `ScheduleInterleaved1F1B`, 2 ranks, 8 micro-batches, 2 parts per rank, lowered.
const DEFAULT_DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schedules/tests/golden/torch/interleaved-1f1b_p2_m8_v2.comms.csv"
);

/// True when every part runs its backward (B, or W for split backward) in micro-batch order 0, 1, 2, …: then
/// weight gradients accumulate in the same order as without pipelining, and training is bitwise reproducible
/// across such schedules.
fn keeps_accumulation_order(s: &Schedule) -> bool {
    (0..s.stages()).all(|stage| {
        (0..s.chunks()).all(|chunk| {
            let mbs: Vec<u32> = s.actions[stage as usize]
                .iter()
                .filter(|a| a.chunk == chunk && matches!(a.op, Op::B | Op::W))
                .map(|a| a.mb)
                .collect();
            mbs.windows(2).all(|w| w[0] < w[1])
        })
    })
}

/// Losses of `steps` steps of a small GPT-2 trained with `schedule`.
fn train(schedule: &Schedule, steps: u64) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let tokens = Tokenizer::bytes().encode(default_corpus());
    let m = schedule.microbatches as usize;
    let mut data = SplitData::new(Split::new(&tokens, 0.1, 2 * m, 32)?, 3)?;
    let gpt = GptConfig {
        vocab_size: 256,
        max_seq: 32,
        layers: 2,
        d_model: 64,
        heads: 4,
    };
    let model = Arc::new(Gpt2::new(gpt, 1337)?);
    let options = TrainOptions {
        optimizer: OptimizerConfig {
            lr: 3e-3,
            warmup_steps: 2,
            total_steps: steps,
            ..OptimizerConfig::default()
        },
        ..TrainOptions::default()
    };
    let stages = schedule.stages() as usize;
    let config = TrainerConfig {
        steps,
        eval_every: 0,
        eval_batches: 1,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(config, || {
        Pipeline::builder(model.clone())
            .schedule(schedule.clone())
            .options(options.clone())
            .build(vec![Cpu; stages])
    })?;
    struct Losses(Vec<f32>);
    impl baton::engine::Observer for Losses {
        fn on_step(&mut self, e: &baton::engine::trainer::StepEvent<'_>) {
            self.0.push(e.report.loss);
        }
    }
    let mut losses = Losses(Vec::new());
    trainer.run(&mut data, &mut losses)?;
    Ok(losses.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| DEFAULT_DUMP.to_string());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let theirs = schedule_from_csv(&text)?;
    let checked = validate(&theirs)?;
    let sim = simulate(&theirs, &Costs::unit(theirs.placement.num_parts()))?;
    println!(
        "{path}: {} stages, {} chunks, {} micro-batches, {} actions; peak stashed activations per stage {:?}; \
         unit-cost bubble {:.1}%",
        theirs.stages(),
        theirs.chunks(),
        theirs.microbatches,
        theirs.num_actions(),
        checked.peak_inflight,
        sim.bubble * 100.0
    );
    print!("{}", to_text(&theirs, &sim));
    let steps = if quick { 8 } else { 30 };
    let with_theirs = train(&theirs, steps)?;
    println!(
        "trained {steps} steps with the PyTorch schedule: loss {:.4} -> {:.4}",
        with_theirs[0],
        with_theirs[with_theirs.len() - 1]
    );
    if with_theirs[with_theirs.len() - 1] >= with_theirs[0] {
        return Err("the loss did not fall".into());
    }
    let ours = generate(
        ScheduleKind::Interleaved,
        theirs.stages(),
        theirs.microbatches,
        theirs.chunks(),
    )?;
    if keeps_accumulation_order(&theirs) && keeps_accumulation_order(&ours) && ours.placement == theirs.placement {
        let with_ours = train(&ours, steps)?;
        let same = with_theirs
            .iter()
            .zip(&with_ours)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "Baton's interleaved 1F1B on the same shape: losses {} the PyTorch schedule's",
            if same { "bitwise equal to" } else { "DIFFERENT from" }
        );
        if !same {
            return Err("schedules that keep the accumulation order must train bitwise alike".into());
        }
    } else {
        println!("(this schedule reorders a part's backward or places parts differently: no bitwise comparison)");
    }
    Ok(())
}
