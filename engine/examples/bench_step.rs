//! One configuration's training-step time on the CPU backend, for `scripts/bench-cpu.sh` (which runs PyTorch on
//! the same model and batch beside it). Prints one JSON line: median step seconds, tokens/s, peak resident memory.
//!
//! ```sh
//! cargo run --release -p baton-engine --example bench_step -- \
//!     --layers 4 --d-model 128 --heads 4 --vocab 256 --batch 8 --seq 128 --stages 1 --microbatches 1 \
//!     --threads 2 --steps 10 --warmup 3
//! ```
//!
//! `--batch-weight-grads` batches each part's weight gradients over the step's micro-batches
//! (`TrainOptions::batch_weight_grads`). With `--ops`, also prints to stderr the measured steps' time per CPU backend op (milliseconds and calls per
//! step, summed over stage threads; `baton_engine::backend::op_profile`).

use baton_engine::data::Batch;
use baton_engine::{Cpu, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse().unwrap_or_else(|_| panic!("{name} {v}: not a number"))
        })
}

/// Peak resident set size of this process, bytes (`VmHWM`).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (layers, d, heads, vocab) = (
        arg("--layers", 4),
        arg("--d-model", 128),
        arg("--heads", 4),
        arg("--vocab", 256),
    );
    let (batch, seq, stages, m) = (
        arg("--batch", 8),
        arg("--seq", 128),
        arg("--stages", 1),
        arg("--microbatches", 1),
    );
    let (threads, steps, warmup) = (arg("--threads", 2), arg("--steps", 10), arg("--warmup", 3));
    baton_kernels::fast::set_threads(threads);
    let model = GptConfig {
        vocab_size: vocab,
        max_seq: seq,
        layers,
        d_model: d,
        heads,
    };
    let mut cfg = PipelineConfig::new(model, stages as u32, ScheduleKind::OneFOneB, m as u32);
    cfg.optimizer.total_steps = (steps + warmup) as u64;
    let batched = std::env::args().any(|a| a == "--batch-weight-grads");
    cfg.batch_weight_grads = batched;
    let mut pipe = Pipeline::new(cfg, vec![Cpu; stages])?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut token = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    let ops = std::env::args().any(|a| a == "--ops");
    let mut times = Vec::new();
    for step in 0..steps + warmup {
        if ops && step == warmup {
            baton_engine::backend::op_profile::set_enabled(true);
            let _ = baton_engine::backend::op_profile::take();
        }
        let inputs: Vec<u32> = (0..batch * seq).map(|_| token()).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|_| token()).collect();
        let b = Batch {
            inputs,
            targets,
            batch,
            seq,
        };
        let t = std::time::Instant::now();
        let r = pipe.train_step(&b)?;
        let dt = t.elapsed().as_secs_f64();
        assert!(r.loss.is_finite());
        if step >= warmup {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if ops {
        let per_step = |x: f64| x / steps as f64;
        let table = baton_engine::backend::op_profile::take();
        let total: f64 = table.iter().map(|t| t.seconds).sum();
        eprintln!("{:<28} {:>10} {:>7} {:>11}", "op", "ms/step", "share", "calls/step");
        for t in &table {
            eprintln!(
                "{:<28} {:>10.3} {:>6.1}% {:>11.1}",
                t.op,
                per_step(t.seconds) * 1e3,
                100.0 * t.seconds / total,
                per_step(t.calls as f64)
            );
        }
        eprintln!(
            "{:<28} {:>10.3} (median step {:.3} ms)",
            "all ops",
            per_step(total) * 1e3,
            median * 1e3
        );
    }
    println!(
        "{{\"engine\": \"baton\", \"step_s\": {median:.6}, \"tokens_per_s\": {:.1}, \"peak_rss_bytes\": {}, \"threads\": {threads}, \"stages\": {stages}, \"microbatches\": {m}, \"batch_weight_grads\": {batched}}}",
        (batch * seq) as f64 / median,
        peak_rss_bytes()
    );
    Ok(())
}
