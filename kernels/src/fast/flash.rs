//! Fused causal attention for the CPU, flash-style: no `T × T` matrix is kept between forward and backward. The
//! forward keeps per row only the log-sum-exp of the scaled scores (the stash, `B · NH · T` values, as the GPU's
//! flash kernels do); the backward recomputes the probabilities from it. Queries go in blocks of [`QUERY_BLOCK`]
//! rows, each against the keys up to its last row, so the blocks above the diagonal are never computed; a block's
//! score rows are complete, so its softmax is exact (no running rescale is needed). The products are the
//! single-threaded `matrixmultiply` kernel.
//!
//! Work is one task per batch row (its heads in turn): each writes its own slices, every row reduction runs in a
//! fixed 16-lane pattern, and `dK`/`dV` accumulate over the query blocks in order, so the results are bitwise the
//! same for any thread count. Within a few ulp of the reference [`crate::cpu::attention`] (tested in f64).

use super::pool::{for_chunks, for_each, Chunks};
use super::vector::{exp, lane_max, lane_sum, multiversion, Isa};

/// Elements of the forward's stash for `b` batch rows, `t` tokens and `nh` heads: one log-sum-exp per row.
pub fn stash_len(b: usize, t: usize, nh: usize) -> usize {
    b * nh * t
}

/// Query rows per block: scores are computed block by block against the keys up to the block's last row, so the
/// blocks above the diagonal (about half of the `T × T` scores) are never computed.
pub const QUERY_BLOCK: usize = 64;

use crate::cpu::Float;

multiversion! {
    /// Softmax of one block's score rows in place (row `r` is query `i0 + r`; keys `0..n`, those past the query
    /// masked to 0), writing each row's log-sum-exp.
    fn softmax_rows(s: &mut [f32], lse: &mut [f32], i0: usize, n: usize) {
        for (r, (row, l)) in s.chunks_exact_mut(n).zip(lse.iter_mut()).enumerate() {
            let live = i0 + r + 1;
            let m = lane_max(&row[..live]);
            for x in row[..live].iter_mut() {
                *x = exp(*x - m);
            }
            row[live..].fill(0.0);
            let sum = lane_sum(&row[..live]);
            let inv = 1.0 / sum;
            for x in row[..live].iter_mut() {
                *x *= inv;
            }
            *l = m + sum.ln();
        }
    }
}

multiversion! {
    /// The probabilities of one block again, from the stashed log-sum-exp: `p = exp(s − lse)` (0 past the query).
    fn probabilities(s: &mut [f32], lse: &[f32], i0: usize, n: usize) {
        for (r, (row, &l)) in s.chunks_exact_mut(n).zip(lse).enumerate() {
            let live = i0 + r + 1;
            for x in row[..live].iter_mut() {
                *x = exp(*x - l);
            }
            row[live..].fill(0.0);
        }
    }
}

multiversion! {
    /// `dS = P ∘ (dP − rowsum(P ∘ dP))` in place in `dp`, row by row (the row sums in the fixed lane pattern).
    fn softmax_backward_rows(dp: &mut [f32], p: &[f32], n: usize, tmp: &mut [f32]) {
        for (drow, prow) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            for ((t, &a), &b) in tmp[..n].iter_mut().zip(prow).zip(drow.iter()) {
                *t = a * b;
            }
            let dot = lane_sum(&tmp[..n]);
            for (d, &a) in drow.iter_mut().zip(prow) {
                *d = a * (*d - dot);
            }
        }
    }
}

/// One head's forward: `x` is the batch row's `qkv` (T, 3C) (the head's q, k, v at `h·hs`, `C + h·hs`,
/// `2C + h·hs`), `o` the batch row's output (T, C), `lse` the head's T stash values, `s` scratch of
/// `QUERY_BLOCK · T`.
#[allow(clippy::too_many_arguments)]
fn head_forward(
    isa: Isa,
    x: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    s: &mut [f32],
    t: usize,
    c: usize,
    h: usize,
    hs: usize,
) {
    let c3 = 3 * c;
    let scale = 1.0 / (hs as f32).sqrt();
    let (q, k, v) = (&x[h * hs..], &x[c + h * hs..], &x[2 * c + h * hs..]);
    for i0 in (0..t).step_by(QUERY_BLOCK) {
        let (rows, n) = (QUERY_BLOCK.min(t - i0), (i0 + QUERY_BLOCK).min(t));
        let blk = &mut s[..rows * n];
        // Scores of the block's queries against keys 0..n (scale · Q Kᵀ).
        f32::gemm(rows, hs, n, scale, &q[i0 * c3..], c3, 1, k, 1, c3, 0.0, blk, n, 1);
        softmax_rows(isa, blk, &mut lse[i0..i0 + rows], i0, n);
        f32::gemm(
            rows,
            n,
            hs,
            1.0,
            blk,
            n,
            1,
            v,
            c3,
            1,
            0.0,
            &mut o[i0 * c + h * hs..],
            c,
            1,
        );
    }
}

/// One head's backward: accumulates into `dx` (the batch row's dqkv, (T, 3C)); `s`, `dp` are scratch of
/// `QUERY_BLOCK · T`, `tmp` of T. `dK` and `dV` accumulate over the query blocks in order.
#[allow(clippy::too_many_arguments)]
fn head_backward(
    isa: Isa,
    x: &[f32],
    dx: &mut [f32],
    dout: &[f32],
    lse: &[f32],
    s: &mut [f32],
    dp: &mut [f32],
    tmp: &mut [f32],
    t: usize,
    c: usize,
    h: usize,
    hs: usize,
) {
    let c3 = 3 * c;
    let scale = 1.0 / (hs as f32).sqrt();
    let (q, k, v) = (&x[h * hs..], &x[c + h * hs..], &x[2 * c + h * hs..]);
    let d = &dout[h * hs..];
    for i0 in (0..t).step_by(QUERY_BLOCK) {
        let (rows, n) = (QUERY_BLOCK.min(t - i0), (i0 + QUERY_BLOCK).min(t));
        let (p, g) = (&mut s[..rows * n], &mut dp[..rows * n]);
        f32::gemm(rows, hs, n, scale, &q[i0 * c3..], c3, 1, k, 1, c3, 0.0, p, n, 1);
        probabilities(isa, p, &lse[i0..i0 + rows], i0, n);
        // dP = dO Vᵀ; dV += Pᵀ dO.
        f32::gemm(rows, hs, n, 1.0, &d[i0 * c..], c, 1, v, 1, c3, 0.0, g, n, 1);
        f32::gemm(
            n,
            rows,
            hs,
            1.0,
            p,
            1,
            n,
            &d[i0 * c..],
            c,
            1,
            1.0,
            &mut dx[2 * c + h * hs..],
            c3,
            1,
        );
        softmax_backward_rows(isa, g, p, n, tmp);
        // dQ += scale · dS K; dK += scale · dSᵀ Q.
        f32::gemm(
            rows,
            n,
            hs,
            scale,
            g,
            n,
            1,
            k,
            c3,
            1,
            1.0,
            &mut dx[i0 * c3 + h * hs..],
            c3,
            1,
        );
        f32::gemm(
            n,
            rows,
            hs,
            scale,
            g,
            1,
            n,
            &q[i0 * c3..],
            c3,
            1,
            1.0,
            &mut dx[c + h * hs..],
            c3,
            1,
        );
    }
}

thread_local! {
    /// Each pool thread's score blocks, kept between calls (grown, never shrunk) so a step allocates none.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` elements of this thread's scratch (contents unspecified: every user writes before it reads;
/// nothing inside calls back into the pool, so a thread never borrows it twice).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

fn check(c: usize, nh: usize, op: &str) -> usize {
    assert!(
        nh > 0 && c % nh == 0,
        "{op}: c ({c}) must be a positive multiple of nh ({nh})"
    );
    c / nh
}

/// Forward: `out` (B, T, C) and the stash `lse` ([`stash_len`]) from `qkv` (B, T, 3C).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hs = check(c, nh, "flash attention_forward");
    assert_eq!(
        out.len(),
        b * t * c,
        "flash attention_forward: out must have b*t*c elements"
    );
    assert_eq!(
        lse.len(),
        stash_len(b, t, nh),
        "flash attention_forward: the stash must have b*nh*t elements"
    );
    assert_eq!(
        qkv.len(),
        b * t * 3 * c,
        "flash attention_forward: qkv must have b*t*3c elements"
    );
    if b * t * c == 0 {
        return;
    }
    let isa = Isa::best();
    // One task per batch row (its heads write disjoint columns of the row's output, in turn).
    let (outs, lses) = (Chunks::new(out, t * c), Chunks::new(lse, nh * t));
    for_each(b, |bi| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (o, l) = unsafe { (outs.get(bi), lses.get(bi)) };
        let x = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
        with_scratch(QUERY_BLOCK.min(t) * t, |s| {
            for (h, lh) in l.chunks_mut(t).enumerate() {
                head_forward(isa, x, o, lh, s, t, c, h, hs);
            }
        })
    });
}

/// Backward: accumulates into `dqkv` (B, T, 3C), given `dout` and the forward's `qkv` and stash (`out` is
/// checked for shape only: the probabilities come back from the stash).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    backward(dqkv, dout, qkv, out, lse, b, t, c, nh, false)
}

/// [`attention_backward`] into a `dqkv` whose contents are ignored: each task zeroes its batch row just before
/// accumulating into it (in cache, on the pool), bitwise zeroing `dqkv` and then [`attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_overwrite(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    backward(dqkv, dout, qkv, out, lse, b, t, c, nh, true)
}

#[allow(clippy::too_many_arguments)]
fn backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    overwrite: bool,
) {
    let hs = check(c, nh, "flash attention_backward");
    assert_eq!(
        dqkv.len(),
        b * t * 3 * c,
        "flash attention_backward: dqkv must have b*t*3c elements"
    );
    assert_eq!(
        qkv.len(),
        b * t * 3 * c,
        "flash attention_backward: qkv must have b*t*3c elements"
    );
    assert_eq!(
        dout.len(),
        b * t * c,
        "flash attention_backward: dout must have b*t*c elements"
    );
    assert_eq!(
        out.len(),
        b * t * c,
        "flash attention_backward: out must have b*t*c elements"
    );
    assert_eq!(
        lse.len(),
        stash_len(b, t, nh),
        "flash attention_backward: the stash must have b*nh*t elements"
    );
    if b * t * c == 0 {
        return;
    }
    let isa = Isa::best();
    for_chunks(dqkv, t * 3 * c, |start, dx| {
        if overwrite {
            dx.fill(0.0);
        }
        let bi = start / (t * 3 * c);
        let x = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
        let g = &dout[bi * t * c..(bi + 1) * t * c];
        let block = QUERY_BLOCK.min(t) * t;
        with_scratch(2 * block + t, |scratch| {
            let (s, rest) = scratch.split_at_mut(block);
            let (dp, tmp) = rest.split_at_mut(block);
            for h in 0..nh {
                let l = &lse[(bi * nh + h) * t..(bi * nh + h + 1) * t];
                head_backward(isa, x, dx, g, l, s, dp, tmp, t, c, h, hs);
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;
    use crate::fast::testutil::{rel, values};

    #[test]
    fn matches_the_f64_reference_and_is_the_same_on_every_isa_and_thread_count() {
        for (b, t, c, nh) in [(3, 37, 24, 3), (2, 64, 64, 2), (1, 1, 8, 1)] {
            let qkv = values(b * t * 3 * c, 5 + t as u64, 400.0);
            let dout = values(b * t * c, 7 + c as u64, 400.0);
            let q64: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
            let d64: Vec<f64> = dout.iter().map(|&v| f64::from(v)).collect();
            let (mut o64, mut a64) = (vec![0.0f64; b * t * c], vec![0.0f64; b * nh * t * t]);
            cpu::attention_forward(&mut o64, &mut a64, &q64, b, t, c, nh);
            let mut dx64 = vec![0.0f64; b * t * 3 * c];
            cpu::attention_backward(&mut dx64, &d64, &q64, &a64, b, t, c, nh);

            let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
            let _pool = crate::fast::testutil::pool_lock();
            for threads in [1, 3] {
                crate::fast::set_threads(threads);
                let (mut o, mut l) = (vec![f32::NAN; b * t * c], vec![f32::NAN; stash_len(b, t, nh)]);
                attention_forward(&mut o, &mut l, &qkv, b, t, c, nh);
                assert!(rel(&o, &o64) < 1e-6, "forward b={b} t={t}: {}", rel(&o, &o64));
                let mut dx = vec![0.0f32; b * t * 3 * c];
                attention_backward(&mut dx, &dout, &qkv, &o, &l, b, t, c, nh);
                let mut dx_over = vec![f32::NAN; b * t * 3 * c];
                attention_backward_overwrite(&mut dx_over, &dout, &qkv, &o, &l, b, t, c, nh);
                assert!(
                    dx_over.iter().zip(&dx).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "overwriting differs from zeroing then accumulating"
                );
                assert!(rel(&dx, &dx64) < 1e-5, "backward b={b} t={t}: {}", rel(&dx, &dx64));
                match &first {
                    None => first = Some((o, dx)),
                    Some((o0, dx0)) => {
                        assert!(
                            o0.iter().zip(&o).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{threads} threads"
                        );
                        assert!(
                            dx0.iter().zip(&dx).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{threads} threads"
                        );
                    }
                }
            }
            // Every instruction set gives the same bits (one head, one row of the batch).
            let hs = c / nh;
            let x = &qkv[..t * 3 * c];
            let mut outs = Vec::new();
            for isa in Isa::available() {
                let (mut o, mut l) = (vec![0.0f32; t * c], vec![0.0f32; t]);
                let mut s = vec![0.0f32; QUERY_BLOCK.min(t) * t];
                head_forward(isa, x, &mut o, &mut l, &mut s, t, c, 0, hs);
                outs.push((o, l));
            }
            for (o, l) in &outs[1..] {
                assert!(o.iter().zip(&outs[0].0).all(|(p, q)| p.to_bits() == q.to_bits()));
                assert!(l.iter().zip(&outs[0].1).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
    }
}
