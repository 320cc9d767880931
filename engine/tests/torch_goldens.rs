//! Training with the schedules PyTorch 2.15 dumped (`schedules/tests/golden/torch/`): every golden, compute-only
//! and lowered, imports, validates and trains the tiny GPT; where a schedule keeps each part's backward in
//! micro-batch order, the run is bitwise the unpipelined run (the engine's core promise, for schedules it did not
//! generate).

mod common;

use std::sync::Arc;

use baton_engine::{Cpu, Gpt2, Pipeline, TrainOptions};
use baton_schedules::{schedule_from_csv, validate, Op, Schedule, ScheduleKind};

const STEPS: usize = 2;

fn keeps_accumulation_order(s: &Schedule) -> bool {
    (0..s.stages() as usize).all(|stage| {
        (0..s.chunks()).all(|chunk| {
            let mbs: Vec<u32> = s.actions[stage]
                .iter()
                .filter(|a| a.chunk == chunk && matches!(a.op, Op::B | Op::W))
                .map(|a| a.mb)
                .collect();
            mbs.windows(2).all(|w| w[0] < w[1])
        })
    })
}

fn train(schedule: Schedule) -> (Vec<u32>, Vec<(String, Vec<u32>)>) {
    let p = schedule.stages() as usize;
    let model = Arc::new(Gpt2::new(common::tiny_model(), 5).unwrap());
    let mut options = TrainOptions::default();
    options.optimizer.warmup_steps = 1;
    options.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::builder(model)
        .schedule(schedule)
        .options(options)
        .build(vec![Cpu; p])
        .unwrap();
    let losses = common::batches(STEPS)
        .iter()
        .map(|b| pipe.train_step(b).unwrap().loss.to_bits())
        .collect();
    let params = pipe
        .parameters()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.data.iter().map(|x| x.to_bits()).collect()))
        .collect();
    (losses, params)
}

#[test]
fn every_pytorch_golden_trains_and_order_keeping_ones_match_the_unpipelined_run() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schedules/tests/golden/torch");
    let reference = {
        let one = baton_schedules::generate(ScheduleKind::OneFOneB, 1, 8, 1).unwrap();
        train(one)
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 12, "{files:?}");
    let mut bitwise = 0;
    for path in files {
        let what = path.file_name().unwrap().to_string_lossy().to_string();
        let schedule =
            schedule_from_csv(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{what}: {e}"));
        validate(&schedule).unwrap();
        assert_eq!(schedule.microbatches, 8, "{what}");
        let ordered = keeps_accumulation_order(&schedule);
        let run = train(schedule);
        assert!(run.0.iter().all(|l| f32::from_bits(*l).is_finite()), "{what}");
        if ordered {
            assert_eq!(run, reference, "{what}: differs from the unpipelined run");
            bitwise += 1;
        }
        eprintln!(
            "{what}: trained; {}",
            if ordered {
                "bitwise equal to the unpipelined run"
            } else {
                "reorders a backward: not compared"
            }
        );
    }
    // All of PyTorch's dumps run each part's backward (or W) in micro-batch order: say so if one stops doing it.
    assert_eq!(bitwise, 12, "only {bitwise} goldens keep the accumulation order");
}
