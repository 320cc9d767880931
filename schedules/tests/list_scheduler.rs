//! The list scheduler: closed forms under unit costs, the fixed generators as baselines (at
//! their own memory), uneven stage costs, caps, accumulation order, any placement, bad options.

use baton_schedules::{
    generate, interleaved, interleaved_stash_cap, list_schedule, one_f_one_b, one_f_one_b_stash_cap, simulate,
    validate, zb_h1, zb_h1_weight_stash_cap, zb_v, Costs, ListOptions, Op, Placement, Schedule, ScheduleError,
    ScheduleKind,
};
use proptest::prelude::*;

/// Unit costs: F = I = W = 1 and B = I + W = 2 per part, no latency.
fn unit(parts: u32) -> Costs {
    Costs::uniform(parts, 1.0, 2.0, 1.0, 1.0, 0.0)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

fn list(placement: &Placement, m: u32, costs: &Costs, opts: ListOptions) -> Schedule {
    let (p, v) = (placement.stages(), placement.chunks());
    list_schedule(placement, m, costs, opts).unwrap_or_else(|e| panic!("p={p} v={v} m={m}: {e}"))
}

/// The ZB-H1-shaped list schedule: one chunk, split backward, 1F1B's and ZB-H1's memory.
fn list_zb(p: u32, m: u32, costs: &Costs) -> Schedule {
    list(
        &Placement::linear(p),
        m,
        costs,
        ListOptions::new(ScheduleKind::ZbH1, true),
    )
}

/// The 1F1B-shaped list schedule: one chunk, one B per part, 1F1B's memory.
fn list_1f1b(p: u32, m: u32, costs: &Costs) -> Schedule {
    list(
        &Placement::linear(p),
        m,
        costs,
        ListOptions::new(ScheduleKind::OneFOneB, false),
    )
}

fn zb_h1_closed_form(p: u32, m: u32) -> f64 {
    f64::from(p - 1) / f64::from(3 * m + p - 1)
}

fn one_f_one_b_closed_form(p: u32, m: u32) -> f64 {
    f64::from(p - 1) / f64::from(m + p - 1)
}

/// Every part's F, B/I and W run in micro-batch order 0, 1, 2, ... on its stage.
fn assert_accumulation_order(s: &Schedule) {
    for (stage, list) in s.actions.iter().enumerate() {
        for chunk in 0..s.chunks() {
            for ops in [&[Op::F][..], &[Op::B, Op::I], &[Op::W]] {
                let order: Vec<u32> = list
                    .iter()
                    .filter(|a| a.chunk == chunk && ops.contains(&a.op))
                    .map(|a| a.mb)
                    .collect();
                let expect: Vec<u32> = (0..order.len() as u32).collect();
                assert_eq!(order, expect, "stage {stage} chunk {chunk} {ops:?}");
            }
        }
    }
}

#[test]
fn split_list_schedule_meets_zb_h1_closed_form_for_every_m_from_p_to_8p() {
    for p in [2u32, 4, 8] {
        for m in p..=8 * p {
            let costs = unit(p);
            let s = list_zb(p, m, &costs);
            let val = validate(&s).unwrap();
            assert!(val
                .peak_inflight
                .iter()
                .zip(one_f_one_b_stash_cap(p, 1, m))
                .all(|(&a, c)| a <= c));
            assert!(val
                .peak_weight_stash
                .iter()
                .zip(zb_h1_weight_stash_cap(p, 1, m))
                .all(|(&a, c)| a <= c));
            assert!(s.actions.iter().flatten().all(|a| a.op != Op::B), "split: no B");
            let got = simulate(&s, &costs).unwrap().bubble;
            let expect = zb_h1_closed_form(p, m);
            assert!(
                close(got, expect),
                "p={p} m={m}: bubble {got}, ZB-H1's closed form {expect}"
            );
            let fixed = simulate(&zb_h1(p, m, 1).unwrap(), &costs).unwrap().bubble;
            assert!(got <= fixed + 1e-12, "p={p} m={m}: list {got} > zb-h1 {fixed}");
        }
    }
}

#[test]
fn unsplit_list_schedule_meets_1f1b_closed_form() {
    for p in [2u32, 4, 8] {
        for m in 1..=8 * p {
            let costs = unit(p);
            let s = list_1f1b(p, m, &costs);
            let val = validate(&s).unwrap();
            assert_eq!(val.peak_inflight, one_f_one_b_stash_cap(p, 1, m), "p={p} m={m}");
            assert!(s.actions.iter().flatten().all(|a| a.op == Op::F || a.op == Op::B));
            let got = simulate(&s, &costs).unwrap().bubble;
            let expect = one_f_one_b_closed_form(p, m);
            assert!(
                close(got, expect),
                "p={p} m={m}: bubble {got}, 1F1B's closed form {expect}"
            );
        }
    }
}

#[test]
fn interleaved_serves_every_m_from_p_and_beats_1f1b() {
    for p in [2u32, 3, 4, 8] {
        for v in 2..=4u32 {
            let costs = unit(p * v);
            for m in p..=8 * p {
                let s =
                    generate(ScheduleKind::Interleaved, p, m, v).unwrap_or_else(|e| panic!("p={p} v={v} m={m}: {e}"));
                assert_eq!(s.kind, ScheduleKind::Interleaved);
                assert_eq!(s.placement, Placement::looped(p, v));
                let val = validate(&s).unwrap();
                let cap = interleaved_stash_cap(p, v, m);
                assert!(
                    val.peak_inflight.iter().zip(&cap).all(|(a, c)| a <= c),
                    "p={p} v={v} m={m}: {val:?}"
                );
                assert!(s.kind.keeps_accumulation_order());
                assert_accumulation_order(&s);
                let got = simulate(&s, &costs).unwrap().bubble;
                let floor = f64::from(p - 1) / f64::from(v * m + p - 1);
                let ceiling = one_f_one_b_closed_form(p, m);
                assert!(
                    got >= floor - 1e-12,
                    "p={p} v={v} m={m}: {got} below the closed form {floor}"
                );
                assert!(
                    got <= ceiling + 1e-12,
                    "p={p} v={v} m={m}: {got} above 1F1B's {ceiling}"
                );
            }
        }
    }
}

#[test]
fn interleaved_keeps_megatrons_exact_order_where_it_exists() {
    // The fallback only serves what Megatron's order cannot: m a multiple of p is unchanged.
    let s = interleaved(2, 4, 2).unwrap();
    let text: Vec<String> = s.actions[0].iter().map(|a| a.to_string()).collect();
    assert_eq!(
        text.join(" "),
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    );
    let r = match interleaved(4, 3, 2).unwrap_err() {
        ScheduleError::Unsupported { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    assert!(r.contains("at least 4"), "{r}");
}

#[test]
fn list_matches_megatron_at_megatrons_memory() {
    for p in [2u32, 3, 4, 8] {
        for v in 2..=4u32 {
            let costs = unit(p * v);
            for m in (p..=8 * p).step_by(p as usize) {
                let fixed = interleaved(p, m, v).unwrap();
                let mut opts = ListOptions::new(ScheduleKind::Interleaved, false);
                opts.stash_cap = Some(validate(&fixed).unwrap().peak_inflight);
                let s = list(&Placement::looped(p, v), m, &costs, opts);
                let (got, theirs) = (
                    simulate(&s, &costs).unwrap().makespan,
                    simulate(&fixed, &costs).unwrap().makespan,
                );
                assert!(got <= theirs, "p={p} v={v} m={m}: list {got} > Megatron {theirs}");
            }
        }
    }
}

#[test]
fn list_matches_zb_v_at_zb_vs_memory() {
    for p in [2u32, 3, 4, 8] {
        let costs = unit(2 * p);
        for m in 1..=8 * p {
            let fixed = zb_v(p, m, 2).unwrap();
            let val = validate(&fixed).unwrap();
            let opts = ListOptions {
                split_backward: true,
                stash_cap: Some(val.peak_inflight.clone()),
                weight_stash_cap: Some(val.peak_weight_stash.clone()),
                kind: ScheduleKind::ZbV,
            };
            let s = list(&Placement::v_shape(p), m, &costs, opts);
            let mine = validate(&s).unwrap();
            assert!(mine.peak_inflight.iter().zip(&val.peak_inflight).all(|(a, b)| a <= b));
            assert!(mine
                .peak_weight_stash
                .iter()
                .zip(&val.peak_weight_stash)
                .all(|(a, b)| a <= b));
            let (got, theirs) = (
                simulate(&s, &costs).unwrap().makespan,
                simulate(&fixed, &costs).unwrap().makespan,
            );
            assert!(got <= theirs, "p={p} m={m}: list {got} > zb-v {theirs}");
        }
    }
}

#[test]
fn a_slower_stage_gets_a_schedule_no_slower_than_1f1b_or_zb_h1() {
    for p in [2u32, 4, 8] {
        for m in p..=8 * p {
            for slow in [0, p / 2, p - 1] {
                for factor in [1.5, 2.0] {
                    let mut costs = unit(p);
                    for table in [
                        &mut costs.forward,
                        &mut costs.backward,
                        &mut costs.backward_input,
                        &mut costs.backward_weight,
                    ] {
                        table[slow as usize] *= factor;
                    }
                    let step = |s: &Schedule| simulate(s, &costs).unwrap().makespan;
                    let (split, unsplit) = (step(&list_zb(p, m, &costs)), step(&list_1f1b(p, m, &costs)));
                    let zb = step(&zb_h1(p, m, 1).unwrap());
                    let ofob = step(&one_f_one_b(p, m, 1).unwrap());
                    let at = format!("p={p} m={m} stage {slow} x{factor}");
                    assert!(split <= zb, "{at}: list I+W {split} > zb-h1 {zb}");
                    assert!(split <= ofob, "{at}: list I+W {split} > 1f1b {ofob}");
                    assert!(unsplit <= ofob, "{at}: list B {unsplit} > 1f1b {ofob}");
                }
            }
        }
    }
}

#[test]
fn the_tightest_caps_are_respected_and_never_stall() {
    // Caps at their minimum: one stash per chunk, one weight-gradient stash.
    let placements = [
        Placement::linear(4),
        Placement::looped(3, 3),
        Placement::v_shape(4),
        Placement::new(vec![vec![5, 0], vec![2, 4], vec![1, 3]]).unwrap(),
    ];
    for placement in &placements {
        let (p, v) = (placement.stages(), placement.chunks());
        for split in [false, true] {
            for m in [1, 2, 5, 9] {
                let mut costs = Costs::uniform(p * v, 1.0, 2.0, 1.0, 1.0, 0.3);
                costs.forward[0] = 2.5;
                let opts = ListOptions {
                    split_backward: split,
                    stash_cap: Some(vec![v; p as usize]),
                    weight_stash_cap: Some(vec![1; p as usize]),
                    kind: ScheduleKind::Custom,
                };
                let s = list(placement, m, &costs, opts);
                let val = validate(&s).unwrap();
                assert!(val.peak_inflight.iter().all(|&x| x <= v), "{val:?}");
                if split {
                    assert!(val.peak_weight_stash.iter().all(|&x| x <= 1), "{val:?}");
                }
                assert_eq!(val.actions, (p * v * m * if split { 3 } else { 2 }) as usize);
            }
        }
    }
}

#[test]
fn bad_options_are_refused_naming_the_stage() {
    let placement = Placement::looped(3, 2);
    let costs = unit(6);
    let with = |stash: Option<Vec<u32>>, weight: Option<Vec<u32>>| ListOptions {
        split_backward: true,
        stash_cap: stash,
        weight_stash_cap: weight,
        kind: ScheduleKind::Interleaved,
    };
    let e = list_schedule(&placement, 4, &costs, with(Some(vec![4, 1, 4]), None)).unwrap_err();
    assert!(matches!(e, ScheduleError::ListScheduler { stage: 1, .. }), "{e}");
    assert!(
        e.to_string().contains("stash cap 1 is below the stage's 2 chunks"),
        "{e}"
    );
    let e = list_schedule(&placement, 4, &costs, with(Some(vec![4, 4]), None)).unwrap_err();
    assert!(e.to_string().contains("2 stash caps given for 3 stages"), "{e}");
    let e = list_schedule(&placement, 4, &costs, with(None, Some(vec![1, 1, 0]))).unwrap_err();
    assert!(matches!(e, ScheduleError::ListScheduler { stage: 2, .. }), "{e}");
    let e = list_schedule(&placement, 4, &unit(3), with(None, None)).unwrap_err();
    assert!(matches!(e, ScheduleError::Costs(_)), "{e}");
    let e = list_schedule(&placement, 0, &costs, with(None, None)).unwrap_err();
    assert!(e.to_string().contains("microbatches must be in"), "{e}");
    // Without a split backward the weight-gradient caps do not apply.
    let mut opts = with(None, Some(vec![0, 0, 0]));
    opts.split_backward = false;
    list_schedule(&placement, 4, &costs, opts).unwrap();
}

/// The table for the report: `cargo test -p baton-schedules --test list_scheduler -- --nocapture`.
#[test]
fn bubble_table_against_the_closed_forms() {
    println!("list scheduler, unit costs (F = I = W = 1, B = 2), 1F1B activation memory, one chunk");
    println!(
        "{:>2} {:>3} | {:>10} {:>10} {:>10} | {:>10} {:>10}",
        "p", "m", "list I+W", "ZB-H1 c.f.", "zb-h1", "list B", "1F1B c.f."
    );
    for p in [2u32, 4, 8] {
        for m in [p, 2 * p, 4 * p, 8 * p] {
            let costs = unit(p);
            let split = simulate(&list_zb(p, m, &costs), &costs).unwrap().bubble;
            let unsplit = simulate(&list_1f1b(p, m, &costs), &costs).unwrap().bubble;
            let fixed = simulate(&zb_h1(p, m, 1).unwrap(), &costs).unwrap().bubble;
            let (zb, ofob) = (zb_h1_closed_form(p, m), one_f_one_b_closed_form(p, m));
            println!("{p:>2} {m:>3} | {split:>10.5} {zb:>10.5} {fixed:>10.5} | {unsplit:>10.5} {ofob:>10.5}");
            assert!(close(split, zb) && close(unsplit, ofob));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any placement, costs, latency and caps: a valid schedule within its caps, in order.
    #[test]
    fn any_placement_and_costs_give_a_valid_schedule_within_its_caps(
        p in 1u32..=5, v in 1u32..=3, m in 1u32..=12, split in any::<bool>(),
        seed in any::<u64>(), latency in 0.0f64..2.0,
        extra in prop::collection::vec(0u32..4, 5), weight in prop::collection::vec(1u32..4, 5),
    ) {
        // A permutation of the parts from the seed (xorshift; Fisher-Yates).
        let mut parts: Vec<u32> = (0..p * v).collect();
        let mut x = seed | 1;
        for i in (1..parts.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            parts.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let rows = parts.chunks(v as usize).map(<[u32]>::to_vec).collect();
        let placement = Placement::new(rows).unwrap();
        let n = (p * v) as usize;
        let cost = |i: usize, scale: f64| 0.25 + scale * ((seed >> (i % 48)) & 7) as f64;
        let costs = Costs {
            forward: (0..n).map(|i| cost(i, 0.5)).collect(),
            backward: (0..n).map(|i| cost(i + 3, 1.0)).collect(),
            backward_input: (0..n).map(|i| cost(i + 5, 0.5)).collect(),
            backward_weight: (0..n).map(|i| cost(i + 7, 0.5)).collect(),
            latency,
        };
        let caps: Vec<u32> = (0..p as usize).map(|s| v + extra[s]).collect();
        let weight_caps: Vec<u32> = weight[..p as usize].to_vec();
        let opts = ListOptions {
            split_backward: split,
            stash_cap: Some(caps.clone()),
            weight_stash_cap: Some(weight_caps.clone()),
            kind: ScheduleKind::Custom,
        };
        let s = list_schedule(&placement, m, &costs, opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let val = validate(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for st in 0..p as usize {
            prop_assert!(val.peak_inflight[st] <= caps[st], "stage {st}: {:?} over {caps:?}", val.peak_inflight);
            if split {
                prop_assert!(val.peak_weight_stash[st] <= weight_caps[st]);
            }
        }
        assert_accumulation_order(&s);
        simulate(&s, &costs).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
