//! The CPU backend is bitwise reproducible for any number of compute threads: the same model trained with 1, 2,
//! 3 and 4 threads in the process-wide pool, unpipelined and on 4 stages (1F1B, ZB-H1), gives the same losses and
//! parameters bit for bit. (Its own test binary: it resizes the process's pool.)

mod common;

use baton_engine::{Cpu, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;

const STEPS: usize = 3;

/// Wide enough that every op is cut into several chunks (each micro-batch's products into 8 blocks, its GELU
/// into 16 chunks, its layer norms into 2).
fn model() -> GptConfig {
    GptConfig {
        vocab_size: 97,
        max_seq: 32,
        layers: 2,
        d_model: 64,
        heads: 4,
    }
}

fn run(kind: ScheduleKind, p: u32) -> Vec<u32> {
    let mut cfg = PipelineConfig::new(model(), p, kind, 2);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::new(cfg, vec![Cpu; p as usize]).unwrap();
    let mut bits = Vec::new();
    for batch in common::batches_with(STEPS, 8, 32, 97, 0x5eed) {
        bits.push(pipe.train_step(&batch).unwrap().loss.to_bits());
    }
    for t in pipe.parameters().unwrap().values() {
        bits.extend(t.data.iter().map(|x| x.to_bits()));
    }
    bits
}

#[test]
fn results_are_bitwise_identical_for_1_2_3_and_4_threads_and_stage_pools() {
    let mut reference: Option<Vec<u32>> = None;
    // Shared pools of 1–4 threads, then a pool of its own per stage (1 and 2 threads each).
    for (threads, per_stage) in [(1, 0), (2, 0), (3, 0), (4, 0), (2, 1), (2, 2)] {
        baton_kernels::fast::set_threads(threads);
        baton_kernels::fast::set_stage_threads(per_stage);
        assert_eq!(baton_kernels::fast::threads(), threads);
        for (kind, p) in [
            (ScheduleKind::OneFOneB, 1),
            (ScheduleKind::OneFOneB, 4),
            (ScheduleKind::ZbH1, 4),
        ] {
            let bits = run(kind, p);
            match &reference {
                None => reference = Some(bits),
                Some(want) => assert!(
                    *want == bits,
                    "{threads} threads ({per_stage} per stage), {kind} on {p} stages: differs from 1 thread, 1 stage"
                ),
            }
        }
    }
    baton_kernels::fast::set_stage_threads(0);
}
