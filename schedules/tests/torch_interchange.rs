//! Schedule interchange with PyTorch 2.15's `torch.distributed.pipelining`. The CSVs under
//! `tests/golden/torch/` were dumped by real PyTorch (`scripts/torch-schedules.sh`, see the README
//! there): Baton imports them, finds the comms it re-derives, reproduces PyTorch's lowering cell for
//! cell, and round-trips its own generators through both exports.

use std::path::PathBuf;

use baton_schedules::{
    check_comms, from_csv, generate, lower_with_comms, schedule_from_csv, simulate, to_csv, to_rank_actions, validate,
    CommOp, Costs, ParamOp, PipeAction, Placement, Schedule, ScheduleError, ScheduleKind,
};

const M: u32 = 8;
const V: u32 = 2;

/// One PyTorch dump pair: file stem, ranks, the placement PyTorch uses, Baton's generator of the
/// same order (if any), and the unit-cost makespan.
struct Golden {
    name: &'static str,
    p: u32,
    v_shape: bool,
    baton: Option<ScheduleKind>,
    makespan: f64,
}

const GOLDENS: [Golden; 6] = [
    Golden {
        name: "interleaved-1f1b",
        p: 2,
        v_shape: false,
        baton: Some(ScheduleKind::Interleaved),
        makespan: 34.0,
    },
    Golden {
        name: "interleaved-1f1b",
        p: 4,
        v_shape: false,
        baton: Some(ScheduleKind::Interleaved),
        makespan: 38.0,
    },
    Golden {
        name: "interleaved-zb",
        p: 2,
        v_shape: false,
        baton: None,
        makespan: 49.0,
    },
    Golden {
        name: "interleaved-zb",
        p: 4,
        v_shape: false,
        baton: None,
        makespan: 51.0,
    },
    Golden {
        name: "zbv",
        p: 2,
        v_shape: true,
        baton: Some(ScheduleKind::ZbV),
        makespan: 49.0,
    },
    Golden {
        name: "zbv",
        p: 4,
        v_shape: true,
        baton: Some(ScheduleKind::ZbV),
        makespan: 51.0,
    },
];

impl Golden {
    fn read(&self, format: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/torch")
            .join(format!("{}_p{}_m{M}_v{V}.{format}.csv", self.name, self.p));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn label(&self) -> String {
        format!("{} p={}", self.name, self.p)
    }
}

fn comms_csv(rows: Vec<Vec<PipeAction>>) -> String {
    to_csv(
        &rows
            .into_iter()
            .map(|r| r.into_iter().map(Some).collect())
            .collect::<Vec<_>>(),
    )
}

fn import(text: &str) -> Schedule {
    schedule_from_csv(text).unwrap_or_else(|e| panic!("{e}"))
}

fn import_err(text: &str) -> String {
    schedule_from_csv(text).unwrap_err().to_string()
}

#[test]
fn pytorch_goldens_import_validate_and_simulate() {
    for g in &GOLDENS {
        let label = g.label();
        let compute = import(&g.read("compute"));
        let lowered = import(&g.read("comms"));
        assert_eq!(compute, lowered, "{label}: the two dumps hold one compute order");
        assert_eq!(compute.kind, ScheduleKind::Custom, "{label}");
        assert_eq!(
            (compute.stages(), compute.chunks(), compute.microbatches),
            (g.p, V, M),
            "{label}"
        );
        let placement = if g.v_shape {
            Placement::v_shape(g.p)
        } else {
            Placement::looped(g.p, V)
        };
        assert_eq!(compute.placement, placement, "{label}");
        validate(&compute).unwrap_or_else(|e| panic!("{label}: {e}"));

        let parts = g.p * V;
        let sim = simulate(&compute, &Costs::unit(parts)).unwrap();
        let busy = compute.actions[0].len() as f64; // unit costs: every action takes 1
        assert_eq!(sim.makespan, g.makespan, "{label}");
        assert!(
            (sim.bubble - (sim.makespan - busy) / sim.makespan).abs() < 1e-12,
            "{label}: {}",
            sim.bubble
        );
        // Plausible: some bubble, and less than plain 1F1B's at the same p and m.
        let one_f_one_b = simulate(&generate(ScheduleKind::OneFOneB, g.p, M, 1).unwrap(), &Costs::unit(g.p)).unwrap();
        assert!(
            sim.bubble > 0.0 && sim.bubble < one_f_one_b.bubble,
            "{label}: bubble {} vs 1f1b {}",
            sim.bubble,
            one_f_one_b.bubble
        );
        println!(
            "{label}: unit-cost makespan {} bubble {:.4} (1f1b {:.4})",
            sim.makespan, sim.bubble, one_f_one_b.bubble
        );

        if let Some(kind) = g.baton {
            let ours = generate(kind, g.p, M, V).unwrap();
            assert_eq!(
                ours.actions, compute.actions,
                "{label}: Baton's {kind} generates PyTorch's order"
            );
            assert_eq!(ours.placement, compute.placement, "{label}");
            let our_sim = simulate(&ours, &Costs::unit(parts)).unwrap();
            assert_eq!(our_sim.bubble, sim.bubble, "{label}");
            assert_eq!(our_sim.makespan, sim.makespan, "{label}");
        }
    }
}

#[test]
fn pytorch_lowering_is_reproduced_cell_for_cell() {
    for g in &GOLDENS {
        let schedule = import(&g.read("compute"));
        let ours = comms_csv(lower_with_comms(&schedule).unwrap());
        // PyTorch's csv.writer ends rows with CRLF.
        assert_eq!(ours, g.read("comms").replace("\r\n", "\n"), "{}", g.label());
    }
}

#[test]
fn golden_comms_are_the_rederived_ones() {
    for g in &GOLDENS {
        let label = g.label();
        let rows = from_csv(&g.read("comms")).unwrap();
        let schedule = import(&g.read("compute"));
        check_comms(&schedule.placement, &rows).unwrap_or_else(|e| panic!("{label}: {e}"));
        // Counted independently of the checker: every boundary between neighbouring parts on
        // different ranks carries M activations and M gradients; the V's turn (parts p-1 and p,
        // both on the last rank) carries nothing.
        let boundaries = 2 * g.p - 1 - u32::from(g.v_shape);
        let transfers = (2 * boundaries * M) as usize;
        let count = |f: &dyn Fn(&PipeAction) -> bool| rows.iter().flatten().flatten().filter(|a| f(a)).count();
        let sends = count(&|a| {
            matches!(
                a,
                PipeAction::Comm {
                    op: CommOp::SendF | CommOp::SendB,
                    ..
                }
            )
        });
        let recvs = count(&|a| {
            matches!(
                a,
                PipeAction::Comm {
                    op: CommOp::RecvF | CommOp::RecvB,
                    ..
                }
            )
        });
        let waits = count(&|a| matches!(a, PipeAction::WaitSend { .. }));
        let reductions = count(&|a| {
            matches!(
                a,
                PipeAction::Param {
                    op: ParamOp::ReduceGrad,
                    ..
                }
            )
        });
        assert_eq!((sends, recvs, waits), (transfers, transfers, transfers), "{label}");
        assert_eq!(reductions, (g.p * V) as usize, "{label}: one reduction per part");
        // Nothing crosses the V's turn.
        if g.v_shape {
            let turn = g.p - 1;
            assert!(
                !rows.iter().flatten().flatten().any(|a| matches!(
                    a,
                    PipeAction::Comm { op: CommOp::SendF, part, .. } if *part == turn
                )),
                "{label}"
            );
        }
    }
}

#[test]
fn baton_generators_round_trip_through_both_exports() {
    let mut checked = 0;
    for kind in ScheduleKind::GENERATED {
        let v = if matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
            2
        } else {
            1
        };
        for p in 1..=4 {
            for m in [1, 3, 4, 8, 12] {
                let Ok(s) = generate(kind, p, m, v) else {
                    continue;
                };
                let label = format!("{kind} p={p} m={m}");
                let compute = to_csv(&to_rank_actions(&s).unwrap());
                let lowered = comms_csv(lower_with_comms(&s).unwrap());
                for (format, text) in [("compute", &compute), ("comms", &lowered)] {
                    let back = schedule_from_csv(text).unwrap_or_else(|e| panic!("{label} {format}: {e}"));
                    assert_eq!(back.actions, s.actions, "{label} {format}");
                    assert_eq!(back.placement, s.placement, "{label} {format}");
                    assert_eq!(back.microbatches, m, "{label} {format}");
                }
                check_comms(&s.placement, &from_csv(&lowered).unwrap()).unwrap_or_else(|e| panic!("{label}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "only {checked} shapes were generated");
}

#[test]
fn earlier_baton_comms_without_waits_still_import() {
    // What `baton schedule --comms` wrote before it followed PyTorch's lowering: sends and
    // receives only.
    let s = generate(ScheduleKind::ZbV, 4, 8, 2).unwrap();
    let bare: Vec<Vec<PipeAction>> = lower_with_comms(&s)
        .unwrap()
        .into_iter()
        .map(|row| {
            row.into_iter()
                .filter(|a| matches!(a, PipeAction::Compute { .. } | PipeAction::Comm { .. }))
                .collect()
        })
        .collect();
    assert_eq!(import(&comms_csv(bare)).actions, s.actions);
}

/// Edits one golden's rows: `f(rank, row)`.
fn edited(text: &str, f: impl Fn(usize, &mut Vec<String>)) -> String {
    let mut out = String::new();
    for (r, line) in text.lines().enumerate() {
        let mut cells: Vec<String> = line.split(',').map(str::to_string).collect();
        f(r, &mut cells);
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn position(row: &[String], cell: &str) -> usize {
    row.iter()
        .position(|c| c == cell)
        .unwrap_or_else(|| panic!("no {cell} in {row:?}"))
}

#[test]
fn unknown_action_is_refused_with_its_cell() {
    let e = import_err("0F0,0SEND_Q0\n");
    assert!(
        e.contains("row 1, column 2") && e.contains("unknown action `SEND_Q`"),
        "{e}"
    );
    let e = import_err("0F0,0F1x\n");
    assert!(e.contains("unexpected `x`"), "{e}");
    let e = import_err("0F0,0UNSHARD3\n");
    assert!(e.contains("takes no micro-batch"), "{e}");
    let e = import_err("0F0,(0F1;1B0)OVERLAP\n");
    assert!(e.contains("followed by OVERLAP_F_B"), "{e}");
}

#[test]
fn a_part_on_two_ranks_is_refused() {
    let e = import_err("0F0,1F0,1B0,0B0\n1F0,1B0\n");
    assert_eq!(
        e,
        "bad placement: part 1 is held twice: by rank 0 (`1F0` at rank 0 (row 1), column 2) and by rank 1 \
         (`1F0` at rank 1 (row 2), column 1)"
    );
    let e = import_err("0F0,2F0,2B0,0B0\n1F0,1B0\n");
    assert!(
        e.contains("rank 1 computes parts [1] but rank 0 computes [0, 2]"),
        "{e}"
    );
    let e = import_err("0F0,0B0\n5F0,5B0\n");
    assert!(e.contains("part 5") && e.contains("out of range"), "{e}");
    let e = import_err("0F0,0B0\n,\n");
    assert!(e.contains("rank 1 (row 2) computes nothing"), "{e}");
}

#[test]
fn comms_mismatches_are_refused_naming_rank_cell_and_action() {
    let zbv = GOLDENS[4].read("comms");
    assert_eq!(GOLDENS[4].name, "zbv");
    // A receive dropped: rank 0 holds part 3, which receives part 2's activations.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            row.remove(position(row, "3RECV_F2"));
        }
    });
    let e = import_err(&text);
    assert!(
        e.starts_with("communication mismatch: `2SEND_F2` at rank 1 (row 2), column ")
            && e.ends_with("has no matching `3RECV_F2`: rank 0 never receives it"),
        "{e}"
    );
    // The receive on the wrong rank.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            row.remove(position(row, "3RECV_F2"));
        } else {
            let at = position(row, "2F2");
            row.insert(at, "3RECV_F2".into());
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("rank 1 (row 2), column ")
            && e.contains("`3RECV_F2` names part 3, but part 3 is on rank 0, not rank 1"),
        "{e}"
    );
    // A send across the V's turn, where PyTorch hands the activation over locally.
    let text = edited(&zbv, |r, row| {
        if r == 1 {
            let at = position(row, "1F0") + 1;
            row.insert(at, "1SEND_F0".into());
        }
    });
    let e = import_err(&text);
    assert!(e.contains("`1SEND_F0`: parts 1 and 2 are both on rank 1"), "{e}");
    // A send that is never waited for.
    let text = edited(&zbv, |r, row| {
        if r == 1 {
            row.remove(position(row, "1WAIT_SEND_B3"));
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("`1SEND_B3` at rank 1 (row 2), column ") && e.contains("never waited for"),
        "{e}"
    );
    // A send issued before the action that computes it.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            let send = row.remove(position(row, "0SEND_F1"));
            let at = position(row, "0F1");
            row.insert(at, send);
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("`0SEND_F1` at rank 0 (row 1), column 5 comes before `0F1`"),
        "{e}"
    );
    // A receive posted after the action that needs it.
    let text = edited(&zbv, |r, row| {
        if r == 1 {
            let recv = row.remove(position(row, "1RECV_F1"));
            let at = position(row, "1F1") + 1;
            row.insert(at, recv);
        }
    });
    let e = import_err(&text);
    assert!(e.contains("`1RECV_F1`") && e.contains("comes after `1F1`"), "{e}");
    // A duplicated send.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            let at = position(row, "0SEND_F0");
            row.insert(at, "0SEND_F0".into());
        }
    });
    let e = import_err(&text);
    assert!(e.contains("`0SEND_F0` appears twice"), "{e}");
    // A send for a micro-batch nothing computes.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            row.push("0SEND_F9".into());
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("`0SEND_F9`") && e.contains("matches no compute action"),
        "{e}"
    );
    // A reduction never waited for.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            row.remove(position(row, "0WAIT_REDUCE_GRAD"));
        }
    });
    let e = import_err(&text);
    assert!(e.contains("`0REDUCE_GRAD`") && e.contains("never waited for"), "{e}");
    // Housekeeping for a part the rank does not hold.
    let text = edited(&zbv, |r, row| {
        if r == 0 {
            row[0] = "1UNSHARD".into();
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("`1UNSHARD` names part 1, but part 1 is on rank 1, not rank 0"),
        "{e}"
    );
}

#[test]
fn receives_out_of_send_order_are_refused() {
    // Rank 0 receives part 1's activations for part 2: swapping its first two receives from
    // rank 1 keeps each before its consumer, but NCCL would hand over the wrong tensor.
    let golden = GOLDENS[0].read("comms");
    assert_eq!(GOLDENS[0].name, "interleaved-1f1b");
    let text = edited(&golden, |r, row| {
        if r == 0 {
            let (a, b) = (position(row, "2RECV_F0"), position(row, "2RECV_F1"));
            assert!(b < position(row, "2F0"));
            row.swap(a, b);
        }
    });
    let e = import_err(&text);
    assert!(
        e.contains("rank 0 posts its receives from rank 1 out of order: its receive #1 is `2RECV_F1`")
            && e.contains("rank 1's send #1 is `1SEND_F0`"),
        "{e}"
    );
}

#[test]
fn a_deadlocking_comm_order_is_refused_with_the_cycle() {
    // Rank 0 posts its gradient receive before its activation send: on NCCL the receive holds the
    // pair's stream until rank 1 sends, and rank 1 first waits for that activation.
    let text = "0F0,0RECV_B0,0SEND_F0,0B0,0WAIT_SEND_F0\n1RECV_F0,1F0,1B0,1SEND_B0,1WAIT_SEND_B0\n";
    let e = schedule_from_csv(text).unwrap_err();
    let ScheduleError::Deadlock { cycle } = &e else {
        panic!("{e}");
    };
    assert_eq!(
        cycle,
        &[
            "rank 0 (row 1), column 2 `0RECV_B0` (waits for `1SEND_B0` at rank 1 (row 2), column 4)",
            "rank 1 (row 2), column 1 `1RECV_F0` (waits for `0SEND_F0` at rank 0 (row 1), column 3)",
        ],
        "{e}"
    );
    // The same file in the right order imports.
    let good = "0F0,0SEND_F0,0RECV_B0,0B0,0WAIT_SEND_F0\n1RECV_F0,1F0,1B0,1SEND_B0,1WAIT_SEND_B0\n";
    assert_eq!(import(good).microbatches, 1);
}

#[test]
fn overlapped_pairs_run_in_their_order() {
    // `(a;b)OVERLAP_F_B` is one step of two actions, run in order.
    let a = import("0F0,0F1,0B0,0B1\n,1F0,1B0,1F1,1B1\n");
    let b = import("0F0,0F1,0B0,0B1\n,1F0,(1B0;1F1)OVERLAP_F_B,1B1\n");
    assert_eq!(a, b);
    // The pair's order is the order: swapped, 1F1 runs before 1B0 (another valid schedule).
    let c = import("0F0,0F1,0B0,0B1\n,1F0,(1F1;1B0)OVERLAP_F_B,1B1\n");
    assert_ne!(a.actions, c.actions);
}

/// Random legal orders, not just the generators': a random topological order of the dependency
/// graph (looped or V placement, 1 or 2 chunks, full or split backward), projected onto the ranks.
/// Its lowering must import back to it and pass the comm checks (no false deadlock or order error).
#[test]
fn random_legal_orders_round_trip_through_the_lowering() {
    use baton_schedules::{Action, Op};
    use std::collections::HashSet;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| -> usize {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    for case in 0..200u32 {
        let p = 2 + case % 2;
        let m = 1 + (case / 2) % 3;
        let placement = match (case / 6) % 3 {
            0 => Placement::linear(p),
            1 => Placement::looped(p, 2),
            _ => Placement::v_shape(p),
        };
        let parts = placement.num_parts();
        let split = case % 5 < 2;
        let back = if split { Op::I } else { Op::B };
        let mut nodes: Vec<(Op, u32, u32)> = Vec::new();
        for part in 0..parts {
            for mb in 0..m {
                nodes.push((Op::F, part, mb));
                if split {
                    nodes.extend([(Op::I, part, mb), (Op::W, part, mb)]);
                } else {
                    nodes.push((Op::B, part, mb));
                }
            }
        }
        let deps = |&(op, part, mb): &(Op, u32, u32)| -> Vec<(Op, u32, u32)> {
            match op {
                Op::F if part > 0 => vec![(Op::F, part - 1, mb)],
                Op::F => vec![],
                Op::B | Op::I if part + 1 < parts => vec![(Op::F, part, mb), (back, part + 1, mb)],
                Op::B | Op::I => vec![(Op::F, part, mb)],
                Op::W => vec![(Op::I, part, mb)],
            }
        };
        let mut done: HashSet<(Op, u32, u32)> = HashSet::new();
        let mut actions: Vec<Vec<Action>> = vec![Vec::new(); p as usize];
        while done.len() < nodes.len() {
            let ready: Vec<_> = nodes
                .iter()
                .filter(|n| !done.contains(n) && deps(n).iter().all(|d| done.contains(d)))
                .copied()
                .collect();
            let (op, part, mb) = ready[next(ready.len())];
            let (stage, chunk) = placement.owner(part).unwrap();
            actions[stage as usize].push(Action::new(op, mb, chunk));
            done.insert((op, part, mb));
        }
        let s = Schedule {
            kind: ScheduleKind::Custom,
            microbatches: m,
            placement: placement.clone(),
            actions,
        };
        validate(&s).unwrap_or_else(|e| panic!("case {case}: {e}"));
        let lowered = comms_csv(lower_with_comms(&s).unwrap_or_else(|e| panic!("case {case}: {e}")));
        assert_eq!(import(&lowered), s, "case {case}: {lowered}");
        assert_eq!(import(&to_csv(&to_rank_actions(&s).unwrap())), s, "case {case}");
    }
}
