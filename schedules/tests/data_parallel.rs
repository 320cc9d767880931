//! Property tests of the data-parallel cost model over every generated family, shape and cost.

use baton_schedules::{
    data_parallel_from_sim, generate, simulate, simulate_data_parallel, Costs, DpCosts, ScheduleKind,
};
use proptest::prelude::*;

/// A generated schedule of `kind` near the asked shape (the shape each family serves).
fn schedule(kind: ScheduleKind, p: u32, m: u32) -> baton_schedules::Schedule {
    let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
        2
    } else {
        1
    };
    let m = match kind {
        ScheduleKind::Interleaved => m * p,
        // Two weight versions need windows of p - 1 or more micro-batches.
        ScheduleKind::TwoBw => m.max(p - 1),
        _ => m,
    };
    generate(kind, p, m, v).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Per part: forward, input-gradient and weight-gradient time (the full backward is their sum).
type PartCosts = Vec<(f64, f64, f64)>;

/// A generated family, stages, micro-batches, per-part costs and per-part gradient bytes.
type Case = (ScheduleKind, u32, u32, PartCosts, Vec<f64>);

/// Per-part compute costs and gradient bytes.
fn part_costs(parts: usize) -> impl Strategy<Value = (PartCosts, Vec<f64>)> {
    (
        prop::collection::vec((0.01f64..2.0, 0.01f64..2.0, 0.01f64..2.0), parts),
        prop::collection::vec(0.0f64..4e8, parts),
    )
}

fn costs_of(table: &[(f64, f64, f64)], lat: f64) -> Costs {
    Costs {
        forward: table.iter().map(|c| c.0).collect(),
        backward: table.iter().map(|c| c.1 + c.2).collect(),
        backward_input: table.iter().map(|c| c.1).collect(),
        backward_weight: table.iter().map(|c| c.2).collect(),
        latency: lat,
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(ScheduleKind::GENERATED.to_vec()),
        1u32..=6,
        1u32..=10,
    )
        .prop_flat_map(|(kind, p, m)| {
            let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
                2
            } else {
                1
            };
            part_costs((p * v) as usize).prop_map(move |(table, bytes)| (kind, p, m, table, bytes))
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn overlap_never_exposes_more_than_the_flush(
        (kind, p, m, table, bytes) in case(),
        d in 2u32..=16, gbps in 0.5f64..400.0, lat_us in 0.0f64..50.0,
        bucket_mib in prop::sample::select(vec![1.0f64, 4.0, 25.0, f64::INFINITY]),
        hop in 0.0f64..0.5,
    ) {
        let s = schedule(kind, p, m);
        let costs = costs_of(&table, hop);
        let flush = DpCosts {
            replicas: d,
            grad_bytes: bytes,
            link_bytes_per_s: gbps * 1e9 / 8.0,
            link_latency_s: lat_us * 1e-6,
            bucket_bytes: bucket_mib * 1024.0 * 1024.0,
            overlap: false,
        };
        let sim = simulate(&s, &costs).unwrap();
        let without = data_parallel_from_sim(&s, &sim, &flush).unwrap();
        let with = data_parallel_from_sim(&s, &sim, &DpCosts { overlap: true, ..flush.clone() }).unwrap();
        prop_assert!(with.exposed_comm <= without.exposed_comm + 1e-9, "{kind} p={p} m={m}: {with:?} {without:?}");
        prop_assert!(with.step_time <= without.step_time + 1e-9);
        for (a, b) in with.stages.iter().zip(&without.stages) {
            prop_assert!(a.end <= b.end + 1e-9);
            prop_assert!(a.exposed <= b.exposed + 1e-9);
            // The same work either way.
            prop_assert!(close(a.busy, b.busy) && a.buckets == b.buckets);
        }
        for r in [&with, &without] {
            prop_assert_eq!(r.compute_makespan, sim.makespan);
            prop_assert!(r.step_time >= r.compute_makespan);
            prop_assert!(close(r.exposed_comm, r.step_time - r.compute_makespan));
            prop_assert!(close(r.exposed_comm, r.stages.iter().map(|st| st.exposed).fold(0.0, f64::max)));
            prop_assert!((0.0..=1.0).contains(&r.exposed_share));
            // Waiting for the reductions only adds idle time.
            prop_assert!(r.step_idle + 1e-9 >= r.bubble);
            prop_assert!(close(r.wire_bytes, 2.0 * f64::from(d - 1) / f64::from(d) * r.grad_bytes));
            for st in &r.stages {
                // The link is never busier than the reduction's window.
                prop_assert!(st.end + 1e-9 >= st.start + st.busy);
            }
        }
        // With overlap the first bucket leaves no later than the stage's last action; with one chunk per
        // stage that last action is the stage's last B or W, so exactly then.
        for st in with.stages.iter().filter(|st| st.buckets > 0) {
            prop_assert!(st.start <= st.compute_end);
            if s.chunks() == 1 {
                prop_assert_eq!(st.start, st.compute_end);
            }
        }
        // Without overlap every reduction starts at the flush and runs back to back.
        for st in without.stages.iter().filter(|st| st.buckets > 0) {
            prop_assert_eq!(st.start, sim.makespan);
            prop_assert!(close(st.end, sim.makespan + st.busy));
        }
    }

    #[test]
    fn one_replica_is_the_plain_simulation(
        (kind, p, m, table, bytes) in case(), overlap in any::<bool>(), hop in 0.0f64..0.5,
    ) {
        let s = schedule(kind, p, m);
        let costs = costs_of(&table, hop);
        let sim = simulate(&s, &costs).unwrap();
        let dp = DpCosts { replicas: 1, grad_bytes: bytes, link_bytes_per_s: 1e6, link_latency_s: 1e-3, bucket_bytes: 1e3, overlap };
        let r = simulate_data_parallel(&s, &costs, &dp).unwrap();
        prop_assert_eq!(r.step_time, sim.makespan);
        prop_assert_eq!(r.exposed_comm, 0.0);
        prop_assert_eq!(r.bubble, sim.bubble);
        prop_assert!(r.stages.iter().all(|st| st.busy == 0.0 && st.buckets == 0));
    }

    #[test]
    fn faster_links_never_slow_a_step(
        (kind, p, m, table, bytes) in case(), d in 2u32..=8, overlap in any::<bool>(),
        gbps in 0.5f64..100.0, faster in 1.0f64..10.0, lat_us in 0.0f64..20.0, more_lat_us in 0.0f64..20.0,
    ) {
        let s = schedule(kind, p, m);
        let costs = costs_of(&table, 0.0);
        let slow = DpCosts {
            replicas: d,
            grad_bytes: bytes,
            link_bytes_per_s: gbps * 1e9 / 8.0,
            link_latency_s: lat_us * 1e-6,
            bucket_bytes: 2.0 * 1024.0 * 1024.0,
            overlap,
        };
        let fast = DpCosts { link_bytes_per_s: slow.link_bytes_per_s * faster, ..slow.clone() };
        let laggy = DpCosts { link_latency_s: slow.link_latency_s + more_lat_us * 1e-6, ..slow.clone() };
        let (r_slow, r_fast, r_laggy) = (
            simulate_data_parallel(&s, &costs, &slow).unwrap(),
            simulate_data_parallel(&s, &costs, &fast).unwrap(),
            simulate_data_parallel(&s, &costs, &laggy).unwrap(),
        );
        prop_assert!(r_fast.step_time <= r_slow.step_time + 1e-9);
        prop_assert!(r_fast.exposed_comm <= r_slow.exposed_comm + 1e-9);
        prop_assert!(r_laggy.step_time + 1e-9 >= r_slow.step_time);
        // More replicas move more bytes over each link (2(D−1)/D grows with D).
        let wider = DpCosts { replicas: d + 1, ..slow.clone() };
        let r_wider = simulate_data_parallel(&s, &costs, &wider).unwrap();
        prop_assert!(r_wider.step_time + 1e-9 >= r_slow.step_time);
    }
}
