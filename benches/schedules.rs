//! Generate + validate + simulate cost against schedule size. The cost must grow linearly with
//! the number of actions (Throughput is declared per action, so a flat actions/s means linear).

use std::time::Duration;

use baton::schedules::{generate, peak_receive_buffers, simulate, validate, Costs, ScheduleKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench_pipeline_of_schedule_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("generate_validate_simulate");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::ZbH1] {
        for p in [8u32, 32, 64] {
            for m in [64u32, 256, 1024] {
                let actions = generate(kind, p, m, 1).expect("valid shape").num_actions() as u64;
                group.throughput(Throughput::Elements(actions));
                let costs = Costs::uniform(p, 1.0, 2.0, 1.0, 1.0, 0.1);
                group.bench_with_input(
                    BenchmarkId::new(kind.name(), format!("p{p}_m{m}")),
                    &(p, m),
                    |bench, &(p, m)| {
                        bench.iter(|| {
                            let s = generate(kind, p, m, 1).expect("valid shape");
                            let v = validate(&s).expect("valid schedule");
                            let r = simulate(&s, &costs).expect("simulates");
                            (v.actions, r.makespan)
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

/// `peak_receive_buffers` (once per pipeline): `O(stages · actions)`.
fn bench_receive_buffers(c: &mut Criterion) {
    let mut group = c.benchmark_group("peak_receive_buffers");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (p, m) in [(4u32, 8u32), (8, 64), (64, 1024)] {
        let s = generate(ScheduleKind::OneFOneB, p, m, 1).expect("valid shape");
        group.throughput(Throughput::Elements(s.num_actions() as u64));
        group.bench_function(BenchmarkId::new("1f1b", format!("p{p}_m{m}")), |bench| {
            bench.iter(|| peak_receive_buffers(&s).expect("valid schedule"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pipeline_of_schedule_work, bench_receive_buffers);
criterion_main!(benches);
