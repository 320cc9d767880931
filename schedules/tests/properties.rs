//! Property tests over (stages, micro-batches, chunks, costs).

use baton_schedules::{generate, interleaved_stash_cap, simulate, validate, Costs, ScheduleKind};
use proptest::prelude::*;

fn costs_strategy() -> impl Strategy<Value = (f64, f64, f64, f64)> {
    (0.1f64..4.0, 0.1f64..4.0, 0.1f64..4.0, 0.0f64..2.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_generated_schedule_validates_and_simulates(
        p in 1u32..=16, m in 1u32..=64, v in prop::sample::select(vec![1u32, 2, 3, 4]),
        kind in prop::sample::select(ScheduleKind::GENERATED.to_vec()),
        (f, i, w, lat) in costs_strategy(),
    ) {
        let Ok(s) = generate(kind, p, m, v) else {
            // Refused shapes must be the documented ones.
            let ok = match kind {
                ScheduleKind::Interleaved => v < 2 || m < p,
                ScheduleKind::ZbV => v != 2,
                ScheduleKind::TwoBw => v != 1 || m + 1 < p,
                _ => v != 1,
            };
            prop_assert!(ok, "{kind} refused p={p} m={m} v={v}");
            return Ok(());
        };
        let val = validate(&s).map_err(|e| TestCaseError::fail(format!("{kind} p={p} m={m} v={v}: {e}")))?;
        let costs = Costs::uniform(p * v, f, i + w, i, w, lat);
        let sim = simulate(&s, &costs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(sim.makespan.is_finite() && sim.makespan > 0.0);
        prop_assert!((0.0..1.0).contains(&sim.bubble));
        prop_assert_eq!(&sim.peak_inflight, &val.peak_inflight);
        // Work is conserved: each stage is busy for exactly its actions' costs.
        for (st, busy) in sim.busy.iter().enumerate() {
            let work: f64 = s.actions[st].iter().map(|a| costs.of(a.op, s.part_of(st as u32, a).unwrap())).sum();
            prop_assert!((busy - work).abs() <= 1e-9 * work.max(1.0));
        }
        for (st, &peak) in val.peak_inflight.iter().enumerate() {
            let st = st as u32;
            match kind {
                ScheduleKind::OneFOneB | ScheduleKind::ZbH1 | ScheduleKind::TwoBw => prop_assert!(peak <= (p - st).min(m), "{kind} stage {st} peak {peak}"),
                ScheduleKind::GPipe => prop_assert_eq!(peak, m),
                ScheduleKind::ZbV => prop_assert!(peak <= 2 * p, "zb-v stage {st} peak {peak}"),
                ScheduleKind::Interleaved => {
                    let cap = interleaved_stash_cap(p, v, m)[st as usize];
                    prop_assert!(peak <= cap, "interleaved stage {st} peak {peak} over Megatron's {cap}");
                }
                _ => {}
            }
        }
    }

    #[test]
    fn latency_never_shortens_a_schedule(
        p in 1u32..=8, m in 1u32..=16, kind in prop::sample::select(ScheduleKind::GENERATED.to_vec()), lat in 0.0f64..3.0,
    ) {
        let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) { 2 } else { 1 };
        let m = match kind {
            ScheduleKind::Interleaved => m * p,
            ScheduleKind::TwoBw => m.max(p - 1),
            _ => m,
        };
        let s = generate(kind, p, m, v).unwrap();
        let base = simulate(&s, &Costs::uniform(p * v, 1.0, 2.0, 1.0, 1.0, 0.0)).unwrap().makespan;
        let slow = simulate(&s, &Costs::uniform(p * v, 1.0, 2.0, 1.0, 1.0, lat)).unwrap().makespan;
        prop_assert!(slow >= base);
    }
}
