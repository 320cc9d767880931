//! PipeDream-2BW: the flush-free stream, its weight versions (delay, reads, versions alive) and its
//! steady state against 1F1B with a flush.

use baton_schedules::{
    generate, one_f_one_b, simulate_two_bw, two_bw_delay, two_bw_stream, validate, weight_versions, Action, Costs, Op,
    Placement, Schedule, ScheduleError, ScheduleKind, WEIGHT_VERSIONS_MAX,
};

/// The shapes every test walks: p in 1..=8, m in {p, 2p, 3p+1}.
fn shapes() -> impl Iterator<Item = (u32, u32)> {
    (1..=8u32).flat_map(|p| [p, 2 * p, 3 * p + 1].into_iter().map(move |m| (p, m)))
}

#[test]
fn the_stream_is_1f1b_without_a_flush_and_validates() {
    for (p, m) in shapes() {
        let s = two_bw_stream(p, m, 4).unwrap();
        assert_eq!((s.kind, s.stages(), s.microbatches), (ScheduleKind::TwoBw, p, 4 * m));
        let v = validate(&s).unwrap_or_else(|e| panic!("p={p} m={m}: {e}"));
        assert_eq!(v.actions, (2 * p * 4 * m) as usize);
        assert_eq!(s.actions, one_f_one_b(p, 4 * m, 1).unwrap().actions, "p={p} m={m}");
        // No flush: the warm-up is paid once, so stage s holds p - s activations however many windows run.
        assert_eq!(
            v.peak_inflight,
            (0..p).map(|st| p - st).collect::<Vec<_>>(),
            "p={p} m={m}"
        );
    }
}

#[test]
fn the_per_window_order_is_1f1b_s_and_refuses_other_chunk_counts() {
    for (p, m) in shapes() {
        let s = generate(ScheduleKind::TwoBw, p, m, 1).unwrap();
        assert_eq!((s.kind, s.microbatches), (ScheduleKind::TwoBw, m));
        assert_eq!(s.actions, one_f_one_b(p, m, 1).unwrap().actions, "p={p} m={m}");
    }
    assert_eq!(ScheduleKind::from_name("2bw"), Ok(ScheduleKind::TwoBw));
    assert_eq!(ScheduleKind::TwoBw.name(), "2bw");
    assert!(ScheduleKind::GENERATED.contains(&ScheduleKind::TwoBw));
    match generate(ScheduleKind::TwoBw, 4, 8, 2).unwrap_err() {
        ScheduleError::Unsupported {
            kind, chunks, reason, ..
        } => {
            assert_eq!((kind, chunks), ("2bw", 2));
            assert!(reason.contains("--chunks 1"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn one_stage_runs_with_delay_0_and_one_version_like_plain_1f1b() {
    for m in 1..=6u32 {
        assert_eq!(two_bw_delay(1, m), Ok(0), "m={m}");
        let s = two_bw_stream(1, m, 4).unwrap();
        let v = weight_versions(&s, m).unwrap();
        assert_eq!((v.delay, v.window), (0, m));
        assert_eq!(v.peak_alive, vec![1]);
        // Every micro-batch of window w sees W_w: the weights after all earlier windows, as with a flush.
        let want: Vec<u32> = s.actions[0].iter().map(|a| a.mb / m).collect();
        assert_eq!(v.reads[0], want, "m={m}");
    }
}

#[test]
fn pipelines_run_with_delay_1_reading_the_version_before_the_newest() {
    for (p, m) in shapes().filter(|&(p, _)| p >= 2) {
        assert_eq!(two_bw_delay(p, m), Ok(1), "p={p} m={m}");
        let s = two_bw_stream(p, m, 4).unwrap();
        let v = weight_versions(&s, m).unwrap();
        assert_eq!(v.delay, 1);
        for (st, list) in s.actions.iter().enumerate() {
            let want: Vec<u32> = list.iter().map(|a| (a.mb / m).saturating_sub(1)).collect();
            assert_eq!(v.reads[st], want, "p={p} m={m} stage {st}");
        }
    }
}

#[test]
fn every_backward_reads_its_forward_s_version() {
    for (p, m) in shapes() {
        let s = two_bw_stream(p, m, 4).unwrap();
        let v = weight_versions(&s, m).unwrap();
        for (st, list) in s.actions.iter().enumerate() {
            assert_eq!(v.reads[st].len(), list.len());
            let mut forward = vec![None; s.microbatches as usize];
            let mut backwards = 0;
            for (a, &read) in list.iter().zip(&v.reads[st]) {
                match a.op {
                    Op::F => forward[a.mb as usize] = Some(read),
                    _ => {
                        assert_eq!(forward[a.mb as usize], Some(read), "p={p} m={m} stage {st} {a}");
                        backwards += 1;
                    }
                }
            }
            assert_eq!(backwards, s.microbatches);
        }
    }
}

#[test]
fn at_most_two_versions_are_alive_and_pipelines_need_both() {
    for (p, m) in shapes() {
        let v = weight_versions(&two_bw_stream(p, m, 4).unwrap(), m).unwrap();
        let want = if p == 1 { 1 } else { WEIGHT_VERSIONS_MAX };
        // Every stage of a pipeline holds two at some point: in-flight micro-batches of window w+1 still
        // read W_w after its own backward of window w's last micro-batch produced W_{w+1}.
        assert_eq!(v.peak_alive, vec![want; p as usize], "p={p} m={m}");
    }
}

#[test]
fn the_closed_form_m_at_least_p_minus_1_matches_the_action_by_action_check() {
    for p in 1..=8u32 {
        for m in 1..=12u32 {
            let feasible = m + 1 >= p;
            let stream = Schedule {
                kind: ScheduleKind::Custom,
                ..one_f_one_b(p, 3 * m, 1).unwrap()
            };
            let checked = weight_versions(&stream, m);
            assert_eq!(checked.is_ok(), feasible, "p={p} m={m}: {checked:?}");
            assert_eq!(generate(ScheduleKind::TwoBw, p, m, 1).is_ok(), feasible, "p={p} m={m}");
            assert_eq!(two_bw_stream(p, m, 3).is_ok(), feasible, "p={p} m={m}");
            assert_eq!(two_bw_delay(p, m).is_ok(), feasible, "p={p} m={m}");
        }
    }
}

#[test]
fn a_window_too_small_for_the_pipeline_is_refused_naming_the_forward() {
    // 4 stages, windows of 2: stage 0 runs F0 F1 F2 F3 B0 F4 B1 ...; F4 (window 2) reads W_1, which
    // needs B1, the backward of window 0's last micro-batch.
    let stream = one_f_one_b(4, 6, 1).unwrap();
    match weight_versions(&stream, 2).unwrap_err() {
        ScheduleError::WeightVersion {
            stage,
            index,
            action,
            reason,
        } => {
            assert_eq!((stage, index, action.as_str()), (0, 5, "F4"));
            assert!(
                reason.contains("reads weight version 1 with delay 1") && reason.contains("#6 `B1`"),
                "{reason}"
            );
        }
        other => panic!("expected WeightVersion, got {other:?}"),
    }
    for e in [
        generate(ScheduleKind::TwoBw, 4, 2, 1).unwrap_err(),
        two_bw_delay(4, 2).unwrap_err(),
        simulate_two_bw(4, 2, &Costs::unit(4), 4).unwrap_err(),
    ] {
        let text = e.to_string();
        assert!(
            text.starts_with("2bw cannot serve stages=4, microbatches=")
                && text.contains("microbatches >= stages - 1 = 3"),
            "{text}"
        );
    }
}

#[test]
fn a_hand_built_stream_that_runs_ahead_of_its_update_is_refused() {
    // One stage, windows of one micro-batch: F0 F1 B0 B1. With delay 1, F1 (window 1) reads W_0: fine.
    // With F0 F1 F2 B0 B1 B2, F2 (window 2) reads W_1, which appears only after B0.
    let one = |ops: &[(Op, u32)]| Schedule {
        kind: ScheduleKind::Custom,
        microbatches: ops.len() as u32 / 2,
        placement: Placement::linear(1),
        actions: vec![ops.iter().map(|&(op, mb)| Action::new(op, mb, 0)).collect()],
    };
    let ok = weight_versions(&one(&[(Op::F, 0), (Op::F, 1), (Op::B, 0), (Op::B, 1)]), 1).unwrap();
    assert_eq!(ok.delay, 1);
    assert_eq!(ok.reads, vec![vec![0, 0, 0, 0]]);
    assert_eq!(ok.peak_alive, vec![2]);
    let bad = one(&[(Op::F, 0), (Op::F, 1), (Op::F, 2), (Op::B, 0), (Op::B, 1), (Op::B, 2)]);
    let e = weight_versions(&bad, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stage 0 action #2 `F2`: micro-batch 2 (window 2) reads weight version 1 with delay 1, but the stage \
         produces it only after its action #3 `B0`"
    );
    // A window longer than the stream, or empty, is refused.
    for window in [0, 7] {
        let e = weight_versions(&bad, window).unwrap_err().to_string();
        assert!(e.contains(&format!("not {window}")), "{e}");
    }
}

#[test]
fn updates_apply_in_window_order() {
    // One stage, windows of one micro-batch, delay 1: micro-batch k reads W_{k-1}. B1 runs before B0, so
    // g_1 is complete at #2, but W_2 = W_1 - g_1 needs W_1 = W_0 - g_0, i.e. B0 at #4: F3 at #3 is too early.
    let stream = Schedule {
        kind: ScheduleKind::Custom,
        microbatches: 4,
        placement: Placement::linear(1),
        actions: vec![[
            (Op::F, 0),
            (Op::F, 1),
            (Op::B, 1),
            (Op::F, 3),
            (Op::B, 0),
            (Op::F, 2),
            (Op::B, 2),
            (Op::B, 3),
        ]
        .iter()
        .map(|&(op, mb)| Action::new(op, mb, 0))
        .collect()],
    };
    validate(&stream).unwrap();
    assert_eq!(
        weight_versions(&stream, 1).unwrap_err().to_string(),
        "stage 0 action #3 `F3`: micro-batch 3 (window 3) reads weight version 2 with delay 1, but the stage \
         produces it only after its action #4 `B0`"
    );
    // With F3 after B0 it runs: F2 and F3 read W_1 and W_2.
    let mut fixed = stream.clone();
    fixed.actions[0].swap(3, 4);
    let v = weight_versions(&fixed, 1).unwrap();
    assert_eq!(v.reads, vec![vec![0, 0, 0, 0, 2, 1, 1, 2]]);
    assert_eq!(v.peak_alive, vec![2]);
}

#[test]
fn steady_state_window_time_is_m_times_f_plus_b_against_1f1b_s_m_plus_p_minus_1() {
    // Unit costs F = 1, B = 2, no latency: after the fill the stream keeps every stage busy, so a window
    // takes m (F + B) = 3m; 1F1B with a flush takes (m + p - 1)(F + B) per window.
    for (p, m) in shapes().chain((2..=8).map(|p| (p, p - 1))) {
        let costs = Costs::uniform(p, 1.0, 2.0, 1.0, 1.0, 0.0);
        let r = simulate_two_bw(p, m, &costs, 4).unwrap();
        let label = format!("p={p} m={m}");
        assert_eq!(r.window_time, f64::from(3 * m), "{label}");
        assert_eq!(r.flush_window_time, f64::from(3 * (m + p - 1)), "{label}");
        assert_eq!(r.speedup, f64::from(m + p - 1) / f64::from(m), "{label}");
        assert_eq!(r.bubble, 0.0, "{label}");
        assert!(
            (r.flush_bubble - f64::from(p - 1) / f64::from(m + p - 1)).abs() < 1e-12,
            "{label}"
        );
        if p >= 2 {
            assert!(r.window_time < r.flush_window_time, "{label}");
        }
        assert_eq!(
            (r.delay, r.weight_copies, r.flush_weight_copies),
            (u32::from(p > 1), 1 + u32::from(p > 1), 1)
        );
        assert_eq!(r.peak_weight_versions.len(), p as usize);
        assert_eq!(r.peak_inflight, (0..p).map(|s| p - s).collect::<Vec<_>>(), "{label}");
        assert_eq!(
            r.flush_peak_inflight,
            (0..p).map(|s| (p - s).min(m)).collect::<Vec<_>>(),
            "{label}"
        );
        assert_eq!((r.stages, r.window, r.windows), (p, m, 4));
        // Stage 0's B(i) ends at 3p + 3i: the fill (F down, B back) once, then one F + B per micro-batch.
        let ends: Vec<f64> = (1..=3).map(|w| f64::from(3 * p + 3 * (w * m - 1))).collect();
        assert_eq!(r.window_ends[..3], ends[..], "{label}");
        assert_eq!(
            r.stream.spans.iter().map(Vec::len).sum::<usize>(),
            (2 * p * 4 * m) as usize
        );
    }
}

#[test]
fn latency_adds_the_round_trip_through_the_pipeline_per_p_micro_batches() {
    // Stage 0's B(i) -> F(i+p) -> forwards down the pipe -> backwards back -> B(i+p): p (F + B) + 2 (p-1) L
    // for p micro-batches, the stream's cycle; per window m (F + B) + 2 m (p-1) L / p. Within a cycle the
    // micro-batches' gaps differ, so window gaps alternate when p does not divide m: p + 2 windows average
    // over p gaps, m whole cycles.
    for (p, m) in shapes() {
        for lat in [0.5, 1.0, 3.0] {
            let r = simulate_two_bw(p, m, &Costs::uniform(p, 1.0, 2.0, 1.0, 1.0, lat), p + 2).unwrap();
            let want = f64::from(3 * m) + 2.0 * f64::from(m * (p - 1)) * lat / f64::from(p);
            assert!(
                (r.window_time - want).abs() < 1e-9,
                "p={p} m={m} L={lat}: {} vs {want}",
                r.window_time
            );
            assert!(p == 1 || r.window_time < r.flush_window_time, "p={p} m={m} L={lat}");
            let busy = 1.0 - f64::from(3 * m) / want;
            assert!(
                (r.bubble - busy).abs() < 1e-9,
                "p={p} m={m} L={lat}: bubble {}",
                r.bubble
            );
        }
    }
}

#[test]
fn with_uneven_stages_the_slowest_one_sets_the_pace() {
    // No latency: the stream's period per micro-batch is the slowest stage's F + B.
    let costs = Costs {
        forward: vec![1.0, 2.0, 0.5, 1.0],
        backward: vec![2.0, 3.0, 1.0, 2.5],
        backward_input: vec![1.0; 4],
        backward_weight: vec![1.0; 4],
        latency: 0.0,
    };
    for m in [4u32, 8, 9] {
        let r = simulate_two_bw(4, m, &costs, 5).unwrap();
        assert!(
            (r.window_time - 5.0 * f64::from(m)).abs() < 1e-9,
            "m={m}: {}",
            r.window_time
        );
        assert!(r.window_time < r.flush_window_time);
        // Busy time per window over 4 stages: m (3 + 5 + 1.5 + 3.5) = 13m; the bubble is 1 - 13 / 20.
        assert!((r.bubble - (1.0 - 13.0 / 20.0)).abs() < 1e-9, "m={m}: {}", r.bubble);
    }
}

#[test]
fn stream_and_simulation_limits_are_refused() {
    let e = two_bw_stream(2, 4, 0).unwrap_err().to_string();
    assert!(e.contains("1 or more windows"), "{e}");
    let e = two_bw_stream(2, 1 << 20, 2).unwrap_err().to_string();
    assert!(e.contains("at most 1048576 micro-batches"), "{e}");
    let e = simulate_two_bw(2, 4, &Costs::unit(2), 2).unwrap_err().to_string();
    assert!(e.contains("simulate 3 or more windows, not 2"), "{e}");
    let e = simulate_two_bw(2, 4, &Costs::unit(3), 4).unwrap_err();
    assert!(matches!(e, ScheduleError::Costs(_)), "{e:?}");
}
