//! The validator catches missing, repeated and misplaced actions and reports deadlocks with the cycle.

use baton_schedules::{one_f_one_b, validate, zb_h1, Action, Op, ScheduleError};

#[test]
fn missing_backward_is_reported() {
    let mut s = one_f_one_b(2, 2, 1).unwrap();
    s.actions[1].retain(|a| !(a.op == Op::B && a.mb == 1));
    let e = validate(&s).unwrap_err();
    assert_eq!(
        e,
        ScheduleError::Coverage {
            part: 1,
            mb: 1,
            reason: "has no backward (neither B nor I+W)".into()
        }
    );
}

#[test]
fn repeated_forward_is_reported() {
    let mut s = one_f_one_b(2, 2, 1).unwrap();
    s.actions[0].push(Action::new(Op::F, 0, 0));
    let e = validate(&s).unwrap_err();
    assert!(matches!(e, ScheduleError::Coverage { part: 0, mb: 0, .. }), "{e}");
    assert!(e.to_string().contains("F appears twice"), "{e}");
}

#[test]
fn out_of_range_microbatch_and_chunk_are_reported() {
    let mut s = one_f_one_b(2, 2, 1).unwrap();
    s.actions[1][0] = Action::new(Op::F, 7, 0);
    assert!(validate(&s)
        .unwrap_err()
        .to_string()
        .contains("micro-batch 7 is out of range"));
    let mut s = one_f_one_b(2, 2, 1).unwrap();
    s.actions[0][0] = Action::new(Op::F, 0, 3);
    assert!(validate(&s)
        .unwrap_err()
        .to_string()
        .contains("chunk 3 is out of range"));
}

#[test]
fn mixing_full_and_split_backward_is_reported() {
    let mut s = zb_h1(2, 2, 1).unwrap();
    s.actions[1].push(Action::new(Op::B, 0, 0));
    assert!(validate(&s)
        .unwrap_err()
        .to_string()
        .contains("both B and a split backward"));
    let mut s = zb_h1(2, 2, 1).unwrap();
    s.actions[0].retain(|a| !(a.op == Op::W && a.mb == 1));
    assert!(validate(&s).unwrap_err().to_string().contains("has I but no W"));
}

#[test]
fn weight_grad_before_input_grad_is_a_deadlock() {
    let mut s = zb_h1(1, 1, 1).unwrap();
    s.actions[0] = vec![
        Action::new(Op::F, 0, 0),
        Action::new(Op::W, 0, 0),
        Action::new(Op::I, 0, 0),
    ];
    let ScheduleError::Deadlock { cycle } = validate(&s).unwrap_err() else {
        panic!("expected a deadlock")
    };
    assert_eq!(cycle, ["stage 0 W0 (part 0) waits for stage 0 I0 (part 0)"]);
}

#[test]
fn cross_stage_wait_cycle_is_a_deadlock() {
    // Stage 0 waits for B0 before it sends F1; stage 1 wants F1 before it runs B0.
    let mut s = one_f_one_b(2, 2, 1).unwrap();
    s.actions[0] = vec![
        Action::new(Op::F, 0, 0),
        Action::new(Op::B, 0, 0),
        Action::new(Op::F, 1, 0),
        Action::new(Op::B, 1, 0),
    ];
    s.actions[1] = vec![
        Action::new(Op::F, 0, 0),
        Action::new(Op::F, 1, 0),
        Action::new(Op::B, 0, 0),
        Action::new(Op::B, 1, 0),
    ];
    let e = validate(&s).unwrap_err();
    let ScheduleError::Deadlock { cycle } = &e else {
        panic!("expected a deadlock, got {e}")
    };
    assert_eq!(
        cycle,
        &[
            "stage 0 B0 (part 0) waits for stage 1 B0 (part 1)",
            "stage 1 F1 (part 1) waits for stage 0 F1 (part 0)"
        ],
        "{e}"
    );
    assert!(e.to_string().starts_with("deadlock: "), "{e}");
}
