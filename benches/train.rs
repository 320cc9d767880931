//! Training-step throughput of the default model on the CPU backend (p = 1 and p = 4), and the
//! executor's own overhead per action with layers that do no work (a whole `train_step` of a model of no-op
//! units: the executor, its transport and an empty optimizer phase).

use std::sync::Arc;
use std::time::Duration;

use baton::engine::backend::CpuBuf;
use baton::engine::data::{default_corpus, Batch, Split, Tokenizer};
use baton::engine::model::{Forward, Layer, MicroBatch, Model, Param, Saved};
use baton::engine::{Cpu, GptConfig, Pipeline, PipelineConfig, Result};
use baton::schedules::{generate, ScheduleKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn default_batches(n: usize) -> Vec<Batch> {
    let tokens = Tokenizer::bytes().encode(default_corpus());
    let split = Split::new(&tokens, 0.1, 16, 128).expect("the corpus holds a batch");
    let mut loader = split.train_loader(7).expect("loader");
    (0..n).map(|_| loader.next_batch()).collect()
}

fn bench_train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step_default_model");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    let batches = default_batches(4);
    group.throughput(Throughput::Elements((16 * 128) as u64));
    for p in [1u32, 4] {
        let cfg = PipelineConfig::new(GptConfig::small(256), p, ScheduleKind::OneFOneB, 8);
        let mut pipe = Pipeline::new(cfg, vec![Cpu; p as usize]).expect("valid pipeline");
        group.bench_with_input(BenchmarkId::new("1f1b_m8", format!("p{p}")), &p, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                pipe.train_step(&batches[i % batches.len()]).expect("step").loss
            })
        });
    }
    group.finish();
}

/// A layer that computes nothing: isolates the executor's cost per action.
struct NoOp {
    last: bool,
}

impl Layer<Cpu> for NoOp {
    fn name(&self) -> String {
        "no-op".into()
    }
    fn params(&self) -> &[Param<Cpu>] {
        &[]
    }
    fn params_mut(&mut self) -> &mut [Param<Cpu>] {
        &mut []
    }
    fn forward(&self, _be: &Cpu, _x: Option<CpuBuf>, _mb: &MicroBatch<Cpu>) -> Result<Forward<Cpu>> {
        Ok(Forward {
            out: (!self.last).then(|| CpuBuf::new(Vec::new())),
            losses: self.last.then(|| CpuBuf::new(vec![0.0])),
            saved: Saved::empty(),
        })
    }
    fn backward_input(
        &self,
        _be: &Cpu,
        _s: &mut Saved<Cpu>,
        _d: Option<CpuBuf>,
        _mb: &MicroBatch<Cpu>,
    ) -> Result<Option<CpuBuf>> {
        Ok(Some(CpuBuf::new(Vec::new())))
    }
    fn backward_weight(&mut self, _be: &Cpu, _s: Saved<Cpu>, _mb: &MicroBatch<Cpu>) -> Result<()> {
        Ok(())
    }
}

/// `units` no-op units: a model whose step costs only the executor (and an empty optimizer phase).
struct NoOpModel {
    units: usize,
}

impl Model<Cpu> for NoOpModel {
    fn kind(&self) -> String {
        "no-op".into()
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "units": self.units })
    }
    fn num_units(&self) -> usize {
        self.units
    }
    fn unit_name(&self, unit: usize) -> String {
        format!("noop.{unit}")
    }
    fn build_unit(&self, unit: usize, _be: &Cpu) -> Result<Box<dyn Layer<Cpu>>> {
        Ok(Box::new(NoOp {
            last: unit + 1 == self.units,
        }))
    }
    fn vocab_size(&self) -> usize {
        2
    }
    fn max_seq(&self) -> usize {
        1
    }
}

fn bench_executor_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("executor_overhead_noop");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (kind, p, m) in [
        (ScheduleKind::OneFOneB, 4u32, 64u32),
        (ScheduleKind::ZbH1, 4, 64),
        (ScheduleKind::OneFOneB, 2, 256),
    ] {
        let schedule = generate(kind, p, m, 1).expect("valid shape");
        let actions = schedule.num_actions() as u64;
        let mut pipe = Pipeline::builder(Arc::new(NoOpModel { units: p as usize }))
            .schedule(schedule)
            .build(vec![Cpu; p as usize])
            .expect("valid pipeline");
        // One token per micro-batch.
        let batch = Batch {
            inputs: vec![0; m as usize],
            targets: vec![1; m as usize],
            batch: m as usize,
            seq: 1,
        };
        group.throughput(Throughput::Elements(actions));
        group.bench_function(
            BenchmarkId::new(kind.name(), format!("p{p}_m{m}_{actions}actions")),
            |b| b.iter(|| pipe.train_step(&batch).expect("runs").loss),
        );
    }
    group.finish();
}

/// The training stall of an asynchronous save (the host snapshot) against a synchronous save
/// (snapshot + serialise + SHA-256 + fsync + rename), default model.
fn bench_checkpoint(c: &mut Criterion) {
    use baton::engine::checkpoint;
    use baton::engine::data::TokenizerKind;
    let mut group = c.benchmark_group("checkpoint_default_model");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let cfg = PipelineConfig::new(GptConfig::small(256), 4, ScheduleKind::OneFOneB, 8);
    let pipe = Pipeline::new(cfg, vec![Cpu; 4]).expect("valid pipeline");
    let root = std::env::temp_dir().join(format!("baton-bench-ckpt-{}", std::process::id()));
    group.bench_function("snapshot_stall", |b| {
        b.iter(|| {
            checkpoint::snapshot(&pipe, TokenizerKind::Bytes, None)
                .expect("snapshot")
                .step
        })
    });
    group.bench_function("synchronous_save", |b| {
        b.iter(|| checkpoint::save(&root, &pipe, TokenizerKind::Bytes, None).expect("save"))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, bench_train_step, bench_executor_overhead, bench_checkpoint);
criterion_main!(benches);
