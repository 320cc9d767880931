//! Per-generator tests: shapes, orders, peaks, and the errors for shapes a family cannot serve.

use baton_schedules::{
    generate, gpipe, interleaved, one_f_one_b, validate, zb_h1, zb_v, Action, Op, ScheduleError, ScheduleKind,
};

fn ops(list: &[Action]) -> String {
    list.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
}

#[test]
fn gpipe_runs_all_forwards_then_all_backwards() {
    let s = gpipe(3, 4, 1).unwrap();
    for list in &s.actions {
        assert_eq!(ops(list), "F0 F1 F2 F3 B0 B1 B2 B3");
    }
    assert_eq!(validate(&s).unwrap().peak_inflight, vec![4, 4, 4]);
}

#[test]
fn one_f_one_b_matches_pipedream_flush() {
    let s = one_f_one_b(4, 6, 1).unwrap();
    assert_eq!(ops(&s.actions[0]), "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
    assert_eq!(ops(&s.actions[2]), "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5");
    assert_eq!(ops(&s.actions[3]), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
    assert_eq!(validate(&s).unwrap().peak_inflight, vec![4, 3, 2, 1]);
}

#[test]
fn one_f_one_b_with_fewer_microbatches_than_stages() {
    let s = one_f_one_b(4, 2, 1).unwrap();
    assert_eq!(ops(&s.actions[0]), "F0 F1 B0 B1");
    assert_eq!(ops(&s.actions[3]), "F0 B0 F1 B1");
    assert_eq!(validate(&s).unwrap().peak_inflight, vec![2, 2, 2, 1]);
}

#[test]
fn interleaved_follows_megatron_order() {
    // p=2, v=2, m=4: groups of p micro-batches per chunk; stage 0 warms up 2(p-1)+(v-1)p = 4.
    let s = interleaved(2, 4, 2).unwrap();
    assert_eq!(
        ops(&s.actions[0]),
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    );
    assert_eq!(
        ops(&s.actions[1]),
        "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3"
    );
    assert_eq!(s.placement.as_rows(), &[vec![0, 2], vec![1, 3]]);
    validate(&s).unwrap();
}

#[test]
fn zb_h1_splits_backward_and_defers_weight_grads() {
    let s = zb_h1(3, 4, 1).unwrap();
    assert_eq!(ops(&s.actions[0]), "F0 F1 F2 I0 W0 F3 I1 W1 I2 W2 I3 W3");
    assert_eq!(ops(&s.actions[1]), "F0 F1 I0 F2 I1 W0 F3 I2 W1 I3 W2 W3");
    assert_eq!(ops(&s.actions[2]), "F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3");
    let v = validate(&s).unwrap();
    assert_eq!(v.peak_inflight, vec![3, 2, 1], "the same activation peak as 1F1B");
}

#[test]
fn zb_v_uses_the_v_placement_and_keeps_1f1b_memory() {
    let s = zb_v(4, 12, 2).unwrap();
    assert_eq!(s.placement.as_rows(), &[vec![0, 7], vec![1, 6], vec![2, 5], vec![3, 4]]);
    let v = validate(&s).unwrap();
    // Each chunk holds half a stage's layers: 2p chunk activations = 1F1B's p stage activations.
    assert!(v.peak_inflight.iter().all(|&x| x <= 8), "{:?}", v.peak_inflight);
    assert_eq!(v.peak_inflight[0], 8);
    // Every action is split: no B.
    assert!(s.actions.iter().flatten().all(|a| a.op != Op::B));
}

#[test]
fn zb_v_serves_few_microbatches() {
    for m in 1..8 {
        let s = zb_v(4, m, 2).unwrap();
        validate(&s).unwrap();
        assert_eq!(s.num_actions(), 3 * 2 * 4 * m as usize);
    }
}

#[test]
fn every_generated_schedule_accumulates_weight_grads_in_microbatch_order() {
    for kind in ScheduleKind::GENERATED {
        let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
            2
        } else {
            1
        };
        let s = generate(kind, 4, 8, v).unwrap();
        for list in &s.actions {
            for chunk in 0..v {
                let order: Vec<u32> = list
                    .iter()
                    .filter(|a| a.chunk == chunk && matches!(a.op, Op::B | Op::W))
                    .map(|a| a.mb)
                    .collect();
                assert_eq!(order, (0..8).collect::<Vec<_>>(), "{kind} chunk {chunk}");
            }
        }
    }
}

fn unsupported_reason(e: ScheduleError) -> String {
    match e {
        ScheduleError::Unsupported { reason, .. } => reason,
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn shapes_a_family_cannot_serve_are_refused_with_a_suggestion() {
    let r = unsupported_reason(interleaved(4, 3, 2).unwrap_err());
    assert!(r.contains("at least 4") && r.contains("1f1b"), "{r}");
    let r = unsupported_reason(interleaved(4, 8, 1).unwrap_err());
    assert!(r.contains("chunks >= 2"), "{r}");
    let r = unsupported_reason(zb_v(4, 8, 3).unwrap_err());
    assert!(r.contains("--chunks 2"), "{r}");
    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::ZbH1] {
        let r = unsupported_reason(generate(kind, 4, 8, 2).unwrap_err());
        assert!(r.contains("--chunks 1"), "{kind}: {r}");
    }
    for kind in ScheduleKind::GENERATED {
        assert!(unsupported_reason(generate(kind, 0, 8, 1).unwrap_err()).contains("stages"));
        assert!(unsupported_reason(generate(kind, 2, 0, 1).unwrap_err()).contains("microbatches"));
        assert!(unsupported_reason(generate(kind, 2, 4, 0).unwrap_err()).contains("chunks"));
    }
    let e = generate(ScheduleKind::Custom, 2, 2, 1).unwrap_err();
    assert!(e.to_string().contains("imported"), "{e}");
    assert!(ScheduleKind::from_name("pipedream")
        .unwrap_err()
        .to_string()
        .contains("zb-h1"));
}
