//! The planner: the partitioner against an exhaustive search over every split on small models (every family,
//! generated and list-scheduled orders, recomputation, latency, binding and infeasible budgets), the planned split
//! against the uniform one on a model with a wide head, the memory budget, the choice and its runner-up.

use std::ops::Range;

use baton_schedules::{
    evaluate_split, partition, plan, Candidate, Evaluation, LostBy, MemoryModel, Outcome, PlanInput, PlanSpace,
    ScheduleError, ScheduleKind, SearchLimits, ShapeProfile, UnitProfile,
};

/// A small deterministic generator (64-bit LCG, high bits): the cases replay from their seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// A cost in steps of 0.25 in `0.25..=4`: ties happen, as with measured costs rounded by a clock.
    fn cost(&mut self) -> f64 {
        self.range(1, 17) as f64 * 0.25
    }
}

/// A model of `n` units with random costs and bytes (`B = I + W`, as the engine runs it).
fn random_units(rng: &mut Lcg, n: usize) -> Vec<UnitProfile> {
    (0..n)
        .map(|u| {
            let f = rng.cost();
            let (i, w) = (rng.cost(), rng.cost());
            UnitProfile {
                costs: [f, i + w, i, w],
                activation_bytes: rng.range(1, 100) * 1000,
                weight_stash_bytes: rng.range(1, 100) * 500,
                output_bytes: if u + 1 == n { 0 } else { rng.range(1, 20) * 100 },
                param_bytes: rng.range(1, 100) * 2000,
                scratch_bytes: rng.range(0, 50) * 100,
            }
        })
        .collect()
}

/// Every split of `n` units into `parts` non-empty contiguous parts, in lexicographic order of the split points.
fn all_splits(n: usize, parts: usize) -> Vec<Vec<Range<usize>>> {
    fn go(start: usize, n: usize, left: usize, acc: &mut Vec<Range<usize>>, out: &mut Vec<Vec<Range<usize>>>) {
        if left == 1 {
            acc.push(start..n);
            out.push(acc.clone());
            acc.pop();
            return;
        }
        for end in start + 1..=n - (left - 1) {
            acc.push(start..end);
            go(end, n, left - 1, acc, out);
            acc.pop();
        }
    }
    let mut out = Vec::new();
    go(0, n, parts, &mut Vec::new(), &mut out);
    out
}

/// The exhaustive answer: the first split (lexicographically) with the least simulated time among those that
/// fit, or the least peak memory over all splits when none fits.
enum Brute {
    Best { ranges: Vec<Range<usize>>, time: f64 },
    NoFit { least_peak: u64 },
}

/// Every split simulated through the reference path (`evaluate_split`: generate or list-schedule, `simulate`).
fn evaluate_all(units: &[UnitProfile], latency: f64, p: u32, c: &Candidate) -> Vec<(Vec<Range<usize>>, Evaluation)> {
    all_splits(units.len(), c.parts(p) as usize)
        .into_iter()
        .map(|ranges| {
            let e = evaluate_split(units, latency, p, c, &ranges, &MemoryModel::default())
                .unwrap_or_else(|e| panic!("{c}: {e}"));
            (ranges, e)
        })
        .collect()
}

fn brute_force(all: &[(Vec<Range<usize>>, Evaluation)], memory: &MemoryModel) -> Brute {
    let mut best: Option<(f64, &Vec<Range<usize>>)> = None;
    let mut least_peak = u64::MAX;
    for (ranges, e) in all {
        least_peak = least_peak.min(e.peak_memory().1);
        if !e.fits(memory) {
            continue;
        }
        if best.is_none_or(|(t, _)| e.step_time < t) {
            best = Some((e.step_time, ranges));
        }
    }
    match best {
        Some((time, ranges)) => Brute::Best {
            ranges: ranges.clone(),
            time,
        },
        None => Brute::NoFit { least_peak },
    }
}

/// Candidates the shape can serve on `p` stages for `n` units.
fn candidates(n: usize, p: u32, m: u32) -> Vec<Candidate> {
    PlanSpace::default()
        .candidates(m)
        .into_iter()
        .filter(|c| c.parts(p) as usize <= n)
        .filter(|c| match c.kind {
            ScheduleKind::Interleaved if !c.list => m >= p,
            ScheduleKind::TwoBw => m + 1 >= p,
            _ => true,
        })
        .collect()
}

#[test]
fn partitioner_finds_the_brute_force_optimum_on_every_small_model() {
    let mut rng = Lcg(0x5eed_0016);
    let mut checked = 0usize;
    let mut bound = 0usize;
    let mut infeasible = 0usize;
    for case in 0..90 {
        let n = rng.range(2, 11) as usize;
        let p = rng.range(1, 5).min(n as u64) as u32;
        let m = [1u32, 2, 3, 4, 6][rng.range(0, 5) as usize];
        let latency = [0.0, 0.25, 1.5][rng.range(0, 3) as usize];
        let units = random_units(&mut rng, n);
        for c in candidates(n, p, m) {
            // Without a budget, then with one between the least and the largest peak (binding), then below all.
            let free = MemoryModel::default();
            let all = evaluate_all(&units, latency, p, &c);
            let Brute::Best { time, ranges } = brute_force(&all, &free) else {
                panic!("case {case} {c}: nothing fits without a budget");
            };
            let got = partition(&units, latency, p, &c, &free, &SearchLimits::default())
                .unwrap_or_else(|e| panic!("case {case} {c} p={p} n={n}: {e}"));
            assert!(got.exact, "case {case} {c}: the search stopped at its limits");
            assert_eq!(
                (got.evaluation.step_time, &got.ranges),
                (time, &ranges),
                "case {case} {c} p={p} n={n} latency={latency}"
            );
            checked += 1;
            // A budget just below the unconstrained optimum's peak: the optimum no longer fits.
            let peak = got.evaluation.peak_memory().1;
            for budget in [peak - 1, peak / 3] {
                let tight = MemoryModel::with_budget(budget);
                match (
                    brute_force(&all, &tight),
                    partition(&units, latency, p, &c, &tight, &SearchLimits::default()),
                ) {
                    (Brute::Best { time, ranges }, Ok(got)) => {
                        assert!(got.evaluation.fits(&tight));
                        assert_eq!(
                            (got.evaluation.step_time, &got.ranges),
                            (time, &ranges),
                            "case {case} {c} p={p} n={n} budget {budget}"
                        );
                        bound += 1;
                    }
                    (
                        Brute::NoFit { least_peak },
                        Err(ScheduleError::MemoryBudget {
                            needed_bytes,
                            budget_bytes,
                            ..
                        }),
                    ) => {
                        assert_eq!((needed_bytes, budget_bytes), (least_peak, budget), "case {case} {c}");
                        infeasible += 1;
                    }
                    (Brute::Best { time, .. }, Err(e)) => panic!("case {case} {c}: brute force found {time}, got {e}"),
                    (Brute::NoFit { .. }, Err(e)) => panic!("case {case} {c}: nothing fits, but the error is {e}"),
                    (Brute::NoFit { .. }, Ok(got)) => {
                        panic!(
                            "case {case} {c}: nothing fits, yet the partitioner returned {:?}",
                            got.ranges
                        )
                    }
                }
            }
        }
    }
    // The sweep covers every family, binding budgets and infeasible ones.
    eprintln!("{checked} candidates, {bound} with a binding budget, {infeasible} with none fitting");
    assert!(
        checked > 1000 && bound > 300 && infeasible > 100,
        "{checked} {bound} {infeasible}"
    );
}

/// Embedding, `blocks` blocks of cost 1 (F) and 2 (B), and a head `head` times a block (a wide vocabulary).
fn wide_head(blocks: usize, head: f64) -> Vec<UnitProfile> {
    let unit = |f: f64, params: u64| UnitProfile {
        costs: [f, 2.0 * f, f, f],
        activation_bytes: 1 << 20,
        weight_stash_bytes: 1 << 19,
        output_bytes: 1 << 16,
        param_bytes: params,
        scratch_bytes: 0,
    };
    let mut units = vec![unit(0.05, 4 << 20)];
    units.extend((0..blocks).map(|_| unit(1.0, 1 << 20)));
    let mut h = unit(head, 4 << 20);
    h.output_bytes = 0;
    units.push(h);
    units
}

/// The model's even split: earlier parts take the extra units.
fn uniform(n: usize, parts: usize) -> Vec<Range<usize>> {
    let mut start = 0;
    (0..parts)
        .map(|k| {
            let len = n / parts + usize::from(k < n % parts);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

#[test]
fn the_planned_split_beats_the_uniform_split_when_the_head_is_wide() {
    let units = wide_head(6, 4.0);
    let free = MemoryModel::default();
    for (p, kind) in [
        (2u32, ScheduleKind::OneFOneB),
        (4, ScheduleKind::OneFOneB),
        (4, ScheduleKind::ZbH1),
    ] {
        let c = Candidate {
            kind,
            chunks: 1,
            microbatches: 8,
            recompute: false,
            list: false,
        };
        let planned = partition(&units, 0.01, p, &c, &free, &SearchLimits::default()).unwrap();
        let even = evaluate_split(&units, 0.01, p, &c, &uniform(units.len(), p as usize), &free).unwrap();
        assert!(
            planned.evaluation.step_time < 0.9 * even.step_time,
            "p={p} {kind}: planned {:?} {} vs uniform {}",
            planned.ranges,
            planned.evaluation.step_time,
            even.step_time
        );
        // The head's stage takes fewer units than the busiest other stage.
        let last = planned.ranges.last().unwrap();
        let most = planned.ranges.iter().map(|r| r.len()).max().unwrap();
        assert!(last.len() < most, "{:?}", planned.ranges);
    }
}

fn shapes(units: &[UnitProfile], ms: &[u32]) -> Vec<ShapeProfile> {
    // A micro-batch of 1/m of the batch: costs and activations scale with its size, plus a fixed cost per action.
    ms.iter()
        .map(|&m| ShapeProfile {
            microbatches: m,
            units: units
                .iter()
                .map(|u| UnitProfile {
                    costs: u.costs.map(|c| 0.002 + c * 8.0 / f64::from(m)),
                    activation_bytes: u.activation_bytes * 8 / u64::from(m),
                    weight_stash_bytes: u.weight_stash_bytes * 8 / u64::from(m),
                    output_bytes: u.output_bytes * 8 / u64::from(m),
                    ..u.clone()
                })
                .collect(),
            latency: 0.01,
        })
        .collect()
}

#[test]
fn the_plan_is_the_fastest_candidate_that_fits_and_names_its_runner_up() {
    let units = wide_head(6, 3.0);
    let input = PlanInput {
        stages: 2,
        shapes: shapes(&units, &[1, 2, 4, 8]),
        memory: MemoryModel::default(),
        space: PlanSpace::default(),
        limits: SearchLimits::default(),
    };
    let got = plan(&input).unwrap();
    let t = got.best.evaluation.step_time;
    let mut served = 0;
    let runner = got.runner_up.as_ref().expect("a runner-up");
    assert!(runner.step_time >= t);
    for o in &got.candidates {
        match o.outcome {
            Outcome::Fits { step_time, .. } => {
                assert!(step_time >= t, "{} is faster than the choice", o.candidate);
                served += 1;
            }
            // Cut off against a runner-up at least as fast as the final one.
            Outcome::Slower { cutoff } => {
                assert!(cutoff >= runner.step_time, "{}", o.candidate);
                served += 1;
            }
            _ => {}
        }
    }
    assert!(served > 20, "{served}");
    assert!(matches!(runner.lost_by, LostBy::Time { .. } | LostBy::Tie));
    // Deterministic.
    let again = plan(&input).unwrap();
    assert_eq!(
        (again.best.candidate, &again.best.ranges),
        (got.best.candidate, &got.best.ranges)
    );
    // Among the flushing schedules, more micro-batches shrink the bubble: one micro-batch never wins.
    let flushing = PlanInput {
        space: PlanSpace {
            kinds: ScheduleKind::GENERATED
                .into_iter()
                .filter(|&k| k != ScheduleKind::TwoBw)
                .collect(),
            ..PlanSpace::default()
        },
        ..input
    };
    let got = plan(&flushing).unwrap();
    assert!(got.best.candidate.microbatches > 1, "{}", got.best.candidate);
}

#[test]
fn the_plan_equals_partitioning_every_candidate_fully() {
    let mut rng = Lcg(0x00c0_ffee);
    for case in 0..12 {
        let n = rng.range(4, 10) as usize;
        let p = rng.range(2, 4) as u32;
        let units = random_units(&mut rng, n);
        let ms = [2u32, 4, 8];
        let input = PlanInput {
            stages: p,
            shapes: shapes(&units, &ms),
            memory: MemoryModel::default(),
            space: PlanSpace::default(),
            limits: SearchLimits::default(),
        };
        let got = plan(&input).unwrap();
        // Every candidate partitioned without cutoffs, in the plan's order: the first fastest, then the next.
        let mut full: Vec<(f64, Candidate, Vec<Range<usize>>)> = Vec::new();
        for shape in &input.shapes {
            for c in input.space.candidates(shape.microbatches) {
                if let Ok(part) = partition(&shape.units, shape.latency, p, &c, &input.memory, &input.limits) {
                    full.push((part.evaluation.step_time, c, part.ranges));
                }
            }
        }
        let first = |skip: Option<usize>| {
            (0..full.len())
                .filter(|&i| Some(i) != skip)
                .fold(None::<usize>, |b, i| match b {
                    Some(j) if full[j].0 <= full[i].0 => Some(j),
                    _ => Some(i),
                })
                .unwrap()
        };
        let b = first(None);
        assert_eq!(
            (got.best.candidate, &got.best.ranges, got.best.evaluation.step_time),
            (full[b].1, &full[b].2, full[b].0),
            "case {case}"
        );
        let r = first(Some(b));
        let runner = got.runner_up.unwrap();
        assert_eq!(
            (runner.candidate, runner.step_time),
            (full[r].1, full[r].0),
            "case {case}"
        );
    }
}

#[test]
fn the_budget_is_respected_and_a_faster_candidate_that_does_not_fit_is_the_runner_up() {
    // ZB-H1 is faster than 1F1B, but its weight-gradient stashes are large here.
    let mut units = wide_head(6, 1.0);
    for u in &mut units {
        u.weight_stash_bytes = 8 << 20;
    }
    let space = PlanSpace {
        kinds: vec![ScheduleKind::OneFOneB, ScheduleKind::ZbH1],
        interleaved_chunks: vec![],
        recompute: vec![false],
        list_orders: false,
    };
    let free = PlanInput {
        stages: 4,
        shapes: shapes(&units, &[8]),
        memory: MemoryModel::default(),
        space: space.clone(),
        limits: SearchLimits::default(),
    };
    let unconstrained = plan(&free).unwrap();
    assert_eq!(unconstrained.best.candidate.kind, ScheduleKind::ZbH1);
    let zb_peak = unconstrained.best.evaluation.peak_memory().1;
    let f1b_peak = match unconstrained.candidates[0].outcome {
        Outcome::Fits { peak, .. } => peak.1,
        ref other => panic!("{other:?}"),
    };
    assert!(f1b_peak < zb_peak, "{f1b_peak} {zb_peak}");
    // A budget that 1F1B's best split fits and no ZB-H1 split does.
    let budget = f1b_peak;
    let tight = PlanInput {
        memory: MemoryModel::with_budget(budget),
        ..free
    };
    let got = plan(&tight).unwrap();
    assert_eq!(got.best.candidate.kind, ScheduleKind::OneFOneB);
    for stage in &got.best.evaluation.memory {
        assert!(stage.total_bytes() <= budget);
    }
    let runner = got.runner_up.expect("ZB-H1 is the runner-up");
    assert_eq!(runner.candidate.kind, ScheduleKind::ZbH1);
    match runner.lost_by {
        LostBy::Memory {
            needed_bytes,
            budget_bytes,
            ..
        } => assert!(needed_bytes > budget_bytes && budget_bytes == budget),
        other => panic!("{other:?}"),
    }
    assert!(runner.step_time < got.best.evaluation.step_time);
}

#[test]
fn an_infeasible_budget_is_an_error_naming_the_stage_and_its_bytes() {
    let units = wide_head(4, 2.0);
    let input = PlanInput {
        stages: 2,
        shapes: shapes(&units, &[2, 4]),
        memory: MemoryModel::with_budget(1 << 20),
        space: PlanSpace::default(),
        limits: SearchLimits::default(),
    };
    let err = plan(&input).unwrap_err();
    let ScheduleError::MemoryBudget {
        stage,
        needed_bytes,
        budget_bytes,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(*needed_bytes > *budget_bytes && *stage < 2, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("stage {stage}")) && text.contains(&needed_bytes.to_string()),
        "{text}"
    );
}

#[test]
fn recomputation_is_chosen_when_only_it_fits() {
    // Activations dominate the memory.
    let mut units = wide_head(6, 1.0);
    for u in &mut units {
        u.activation_bytes = 16 << 20;
    }
    let space = |recompute: Vec<bool>| PlanSpace {
        kinds: vec![ScheduleKind::OneFOneB],
        interleaved_chunks: vec![],
        recompute,
        list_orders: false,
    };
    let input = |recompute: Vec<bool>, memory: MemoryModel| PlanInput {
        stages: 2,
        shapes: shapes(&units, &[8]),
        memory,
        space: space(recompute),
        limits: SearchLimits::default(),
    };
    let free = plan(&input(vec![false, true], MemoryModel::default())).unwrap();
    assert!(!free.best.candidate.recompute, "recomputing only costs time");
    let with = plan(&input(vec![true], MemoryModel::default())).unwrap();
    let budget = with.best.evaluation.peak_memory().1;
    let got = plan(&input(vec![false, true], MemoryModel::with_budget(budget))).unwrap();
    assert!(got.best.candidate.recompute, "{}", got.best.candidate);
    assert!(got.best.evaluation.peak_memory().1 <= budget);
    assert!(matches!(got.candidates[0].outcome, Outcome::TooBig { .. }));
}

#[test]
fn a_search_stopped_by_its_limits_says_so() {
    let units = wide_head(10, 2.0);
    let c = Candidate {
        kind: ScheduleKind::OneFOneB,
        chunks: 1,
        microbatches: 4,
        recompute: false,
        list: false,
    };
    let limits = SearchLimits {
        evaluations_max: 3,
        nodes_max: 1000,
    };
    let got = partition(&units, 0.0, 4, &c, &MemoryModel::default(), &limits).unwrap();
    assert!(!got.exact && got.evaluations <= 3);
    let full = partition(&units, 0.0, 4, &c, &MemoryModel::default(), &SearchLimits::default()).unwrap();
    assert!(full.exact);
    assert!(full.evaluation.step_time <= got.evaluation.step_time);
    // The bound prunes: far fewer splits simulated than exist (C(11, 3) = 165).
    assert!(full.evaluations < 100, "{}", full.evaluations);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let units = wide_head(2, 1.0);
    let c = Candidate {
        kind: ScheduleKind::Interleaved,
        chunks: 2,
        microbatches: 4,
        recompute: false,
        list: false,
    };
    // 3 stages × 2 chunks = 6 parts for 4 units.
    let err = partition(&units, 0.0, 3, &c, &MemoryModel::default(), &SearchLimits::default()).unwrap_err();
    assert!(matches!(err, ScheduleError::Unsupported { .. }), "{err}");
    let mut nan = units.clone();
    nan[1].costs[0] = f64::NAN;
    let err = partition(&nan, 0.0, 2, &c, &MemoryModel::default(), &SearchLimits::default()).unwrap_err();
    assert!(err.to_string().contains("unit 1"), "{err}");
    let err = evaluate_split(&units, 0.0, 2, &c, &[0..1, 2..4, 4..4, 1..2], &MemoryModel::default()).unwrap_err();
    assert!(matches!(err, ScheduleError::Planner(_)), "{err}");
    let err = plan(&PlanInput {
        stages: 2,
        shapes: vec![],
        memory: MemoryModel::default(),
        space: PlanSpace::default(),
        limits: SearchLimits::default(),
    })
    .unwrap_err();
    assert!(matches!(err, ScheduleError::Planner(_)), "{err}");
}
