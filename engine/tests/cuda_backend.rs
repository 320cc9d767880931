//! The CUDA backend: a clean error (never a panic) without a device, and — on a GPU — a 2-stage pipeline on
//! `Cuda` that trains like the same pipeline on `Cpu` (losses within 1e-4 relative over 3 steps: fp32 cuBLAS and
//! kernels reassociate sums, so bitwise equality is not expected).

use baton_engine::backend::Cuda;
use baton_engine::data::Batch;
use baton_engine::error::EngineError;
use baton_engine::{Cpu, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;

const STEPS: usize = 3;
const BATCH: usize = 4;
const SEQ: usize = 16;
const VOCAB: usize = 67;

fn model() -> GptConfig {
    GptConfig {
        vocab_size: VOCAB,
        max_seq: SEQ,
        layers: 4,
        d_model: 32,
        heads: 4,
    }
}

fn batches() -> Vec<Batch> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % VOCAB as u64) as u32
    };
    (0..STEPS)
        .map(|_| {
            let stream: Vec<u32> = (0..BATCH * (SEQ + 1)).map(|_| next()).collect();
            let (mut inputs, mut targets) = (Vec::new(), Vec::new());
            for row in stream.chunks(SEQ + 1) {
                inputs.extend_from_slice(&row[..SEQ]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch: BATCH,
                seq: SEQ,
            }
        })
        .collect()
}

fn losses<B: baton_engine::Backend>(backends: Vec<B>) -> Vec<f32> {
    let mut cfg = PipelineConfig::new(model(), 2, ScheduleKind::OneFOneB, 2);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::new(cfg, backends).unwrap();
    batches().iter().map(|b| pipe.train_step(b).unwrap().loss).collect()
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    match Cuda::new(0) {
        Err(EngineError::NoCudaDevice(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("expected NoCudaDevice, got {other}"),
        // A machine with a GPU: the constructor works, which is fine too.
        Ok(cuda) => drop(cuda),
    }
    let msg = match Cuda::new(usize::MAX) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("device usize::MAX cannot exist"),
    };
    assert!(msg.contains("no CUDA device"), "{msg}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn two_stage_pipeline_on_cuda_matches_cpu() {
    let stage0 = Cuda::new(0).unwrap();
    let stage1 = stage0.with_new_stream().unwrap();
    let gpu = losses(vec![stage0, stage1]);
    let cpu = losses(vec![Cpu; 2]);
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let rel = ((g - c) / c).abs();
        println!("step {step}: cpu {c:.7} cuda {g:.7} rel {rel:.2e}");
        assert!(g.is_finite() && rel <= 1e-4, "step {step}: cpu loss {c}, cuda loss {g}");
    }
}
