//! Simulated bubbles against the published closed forms, with zero latency.

use baton_schedules::{generate, simulate, Costs, ScheduleKind};

fn bubble(kind: ScheduleKind, p: u32, m: u32, v: u32, f: f64, b: f64, i: f64, w: f64) -> f64 {
    let s = generate(kind, p, m, v).unwrap_or_else(|e| panic!("{kind} p={p} m={m} v={v}: {e}"));
    simulate(&s, &Costs::uniform(p * v, f, b, i, w, 0.0))
        .expect("valid")
        .bubble
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

/// GPipe and 1F1B: (p-1)/(m+p-1) for any m (also m < p) and any F:B ratio.
#[test]
fn gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1() {
    for p in 1..=8u32 {
        for m in 1..=24u32 {
            let expect = f64::from(p - 1) / f64::from(m + p - 1);
            for (f, b) in [(1.0, 1.0), (1.0, 2.0), (0.7, 1.9)] {
                for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                    let got = bubble(kind, p, m, 1, f, b, 0.0, 0.0);
                    assert!(
                        close(got, expect),
                        "{kind} p={p} m={m} F={f} B={b}: bubble {got}, expected {expect}"
                    );
                }
            }
        }
    }
}

/// Interleaved 1F1B with v chunks: (p-1)/(v·m+p-1), i.e. about 1/v of 1F1B's bubble.
#[test]
fn interleaved_bubble_is_one_over_v_of_1f1b() {
    for p in 1..=8u32 {
        for v in 2..=4u32 {
            for groups in 1..=4u32 {
                let m = groups * p;
                let expect = f64::from(p - 1) / f64::from(v * m + p - 1);
                for (f, b) in [(1.0, 1.0), (1.0, 2.0)] {
                    let got = bubble(ScheduleKind::Interleaved, p, m, v, f, b, 0.0, 0.0);
                    assert!(
                        close(got, expect),
                        "p={p} m={m} v={v} F={f} B={b}: bubble {got}, expected {expect}"
                    );
                }
            }
        }
    }
}

/// ZB-H1 with F = I = W: (p-1)/(3m+p-1), a third of 1F1B's (p-1)/(m+p-1) in idle time.
#[test]
fn zb_h1_bubble_is_a_third_of_1f1b_when_f_i_w_are_equal() {
    for p in 1..=8u32 {
        for m in p..=32u32 {
            let expect = f64::from(p - 1) / f64::from(3 * m + p - 1);
            let got = bubble(ScheduleKind::ZbH1, p, m, 1, 1.0, 2.0, 1.0, 1.0);
            assert!(close(got, expect), "p={p} m={m}: bubble {got}, expected {expect}");
            // Idle time per stage: p-1 units against 1F1B's 3(p-1) with B = I + W.
            let one_f_one_b = bubble(ScheduleKind::OneFOneB, p, m, 1, 1.0, 2.0, 0.0, 0.0);
            let idle_ratio = (got / (1.0 - got)) / (one_f_one_b / (1.0 - one_f_one_b)).max(f64::MIN_POSITIVE);
            if p > 1 {
                assert!(close(idle_ratio, 1.0 / 3.0), "p={p} m={m}: idle ratio {idle_ratio}");
            }
        }
    }
}

/// ZB-V with F = I = W per chunk: (p-1)/(6m+p-1) once m >= 2p-1 — only the unavoidable
/// start-up of the last stage; about a sixth of 1F1B's bubble at the same activation memory.
#[test]
fn zb_v_bubble_is_near_zero() {
    for p in 1..=8u32 {
        for m in (2 * p - 1)..=40u32 {
            let expect = f64::from(p - 1) / f64::from(6 * m + p - 1);
            let got = bubble(ScheduleKind::ZbV, p, m, 2, 1.0, 2.0, 1.0, 1.0);
            assert!(close(got, expect), "p={p} m={m}: bubble {got}, expected {expect}");
        }
    }
}
