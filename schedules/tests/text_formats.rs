//! PyTorch action strings and per-rank CSV, both ways, and the comm-lowering pass.

use baton_schedules::{
    check_comms, from_csv, generate, lower_with_comms, schedule_from_rank_actions, to_csv, to_rank_actions, CommOp, Op,
    PipeAction, ScheduleKind,
};

#[test]
fn action_strings_round_trip() {
    for text in [
        "0F3",
        "1I0",
        "2W5",
        "3B1",
        "12F104",
        "1RECV_F3",
        "0SEND_F3",
        "2SEND_B7",
        "3RECV_B0",
        "0UNSHARD",
        "4RESHARD",
        "2REDUCE_GRAD",
        "2WAIT_REDUCE_GRAD",
        "0WAIT_SEND_F3",
        "5WAIT_SEND_B0",
        "(0F1;3I0)OVERLAP_F_B",
    ] {
        let action: PipeAction = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(action.to_string(), text);
    }
    assert_eq!(
        "2W5".parse::<PipeAction>().unwrap(),
        PipeAction::Compute {
            part: 2,
            op: Op::W,
            mb: 5
        }
    );
    assert_eq!(
        "1RECV_F3".parse::<PipeAction>().unwrap(),
        PipeAction::Comm {
            op: CommOp::RecvF,
            part: 1,
            mb: 3
        }
    );
}

#[test]
fn bad_action_strings_are_refused() {
    for (text, needle) in [
        ("F3", "starts with the part"),
        ("0X3", "unknown action"),
        ("0F", "missing micro-batch"),
        ("0F99999999999", "32-bit"),
        ("0SEND_Q1", "unknown action"),
    ] {
        let e = text.parse::<PipeAction>().unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
    }
}

#[test]
fn csv_round_trips_every_generated_schedule() {
    for kind in ScheduleKind::GENERATED {
        let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
            2
        } else {
            1
        };
        for (p, m) in [(1, 1), (2, 4), (4, 8), (3, 6)] {
            let s = generate(kind, p, m, v).unwrap();
            let csv = to_csv(&to_rank_actions(&s).unwrap());
            let back = schedule_from_rank_actions(&from_csv(&csv).unwrap(), p).unwrap();
            assert_eq!(back.actions, s.actions, "{kind} p={p} m={m}");
            assert_eq!(back.placement, s.placement, "{kind} p={p} m={m}");
            assert_eq!(back.microbatches, m);
        }
    }
}

#[test]
fn csv_rows_carry_idle_cells_like_pytorch() {
    let s = generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
    assert_eq!(
        to_csv(&to_rank_actions(&s).unwrap()),
        "0F0,0F1,,0B0,,0B1\n,1F0,1B0,1F1,1B1\n"
    );
}

#[test]
fn lowering_adds_matching_sends_and_receives() {
    let s = generate(ScheduleKind::OneFOneB, 2, 1, 1).unwrap();
    let rows = lower_with_comms(&s).unwrap();
    let text: Vec<String> = rows
        .iter()
        .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    // PyTorch's own lowering: UNSHARD/RESHARD around the compute, the gradient reduction after the
    // last backward, each forward send waited for after the local backward, the rest at the end.
    assert_eq!(
        text,
        [
            "0UNSHARD 0F0 0SEND_F0 0RECV_B0 0B0 0WAIT_SEND_F0 0REDUCE_GRAD 0WAIT_REDUCE_GRAD 0RESHARD",
            "1UNSHARD 1RECV_F0 1F0 1B0 1SEND_B0 1REDUCE_GRAD 1WAIT_REDUCE_GRAD 1RESHARD 1WAIT_SEND_B0"
        ]
    );
    for kind in ScheduleKind::GENERATED {
        let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
            2
        } else {
            1
        };
        let s = generate(kind, 4, 8, v).unwrap();
        let rows: Vec<Vec<Option<PipeAction>>> = lower_with_comms(&s)
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(Some).collect())
            .collect();
        check_comms(&s.placement, &rows).unwrap_or_else(|e| panic!("{kind}: {e}"));
        // A lowered CSV imports back to the same compute schedule.
        let back = schedule_from_rank_actions(&from_csv(&to_csv(&rows)).unwrap(), 4).unwrap();
        assert_eq!(back.actions, s.actions, "{kind}");
    }
}

#[test]
fn zb_v_turn_exchanges_nothing() {
    // Parts p-1 and p sit on the last stage: no comm between them.
    let s = generate(ScheduleKind::ZbV, 2, 3, 2).unwrap();
    let rows = lower_with_comms(&s).unwrap();
    assert!(!rows[1].iter().any(|a| matches!(
        a,
        PipeAction::Comm {
            part: 1,
            op: CommOp::SendF,
            ..
        }
    )));
    assert!(!rows[1].iter().any(|a| matches!(
        a,
        PipeAction::Comm {
            part: 2,
            op: CommOp::RecvF,
            ..
        }
    )));
}

#[test]
fn unmatched_comm_is_refused() {
    let csv = "0F0,0SEND_F0,0RECV_B0,0B0\n1F0,1B0,1SEND_B0\n";
    let e = schedule_from_rank_actions(&from_csv(csv).unwrap(), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0SEND_F0") && e.contains("1RECV_F0"), "{e}");
}

#[test]
fn bad_csv_is_refused_with_its_location() {
    let e = from_csv("0F0,0B0\n1F0,1Q0\n").unwrap_err().to_string();
    assert!(e.contains("row 2, column 2"), "{e}");
    let e = schedule_from_rank_actions(&from_csv("0F0,0B0\n").unwrap(), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 rank rows, but --stages is 2"), "{e}");
    let e = schedule_from_rank_actions(&from_csv("0F0,1F0\n1B0,0B0\n").unwrap(), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("held twice"), "{e}");
    // A schedule that parses but deadlocks.
    let e = schedule_from_rank_actions(&from_csv("0B0,0F0\n1F0,1B0\n").unwrap(), 2)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("deadlock"), "{e}");
}

#[test]
fn pytorch_style_interleaved_dump_imports() {
    // Two ranks, two chunks each (parts 0..4 looped), as torch.distributed.pipelining dumps it.
    let csv = "0F0,2F0,,,,2B0,0B0\n,1F0,3F0,3B0,1B0,,\n";
    let s = schedule_from_rank_actions(&from_csv(csv).unwrap(), 2).unwrap();
    assert_eq!(s.placement.as_rows(), &[vec![0, 2], vec![1, 3]]);
    assert_eq!(s.chunks(), 2);
    assert_eq!(s.microbatches, 1);
}
