//! The row-wise ops on the pool, on shape-determined chunks of independent rows (or, for sums over rows, on
//! chunks of columns with the rows in order), so the results are the same bits for any thread count. Most run the
//! reference op of [`crate::cpu`] compiled for the instruction set, bitwise the reference; the layer norm's and
//! the cross-entropy's row sums go in the fixed lane pattern of [`LANES`] instead of one long chain (vectorised,
//! within a few ulp of the reference, the same bits on every instruction set; tested against the reference in
//! f64).

use super::pool::{chunk_rows, for_chunks, for_each, Chunks};
use super::vector::{exp, lane_combine, lane_max, lane_sum, lane_sum_of, multiversion, Isa, LANES};
use crate::cpu;

/// Elements per partial sum of [`sum_squares`] (fixed: the sum's association depends on nothing else).
pub const SUM_CHUNK: usize = 16 * 1024;

multiversion! {
    /// `Σ x²` of one chunk in f64: eight interleaved accumulators (lane `j` takes the elements `≡ j (mod 8)`),
    /// combined pairwise.
    fn chunk_sum_squares(x: &[f32], out: &mut f64) {
        let mut acc = [0.0f64; 8];
        let mut lanes = x.chunks_exact(8);
        for group in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(group) {
                let v = f64::from(v);
                *a = v.mul_add(v, *a);
            }
        }
        for (a, &v) in acc.iter_mut().zip(lanes.remainder()) {
            let v = f64::from(v);
            *a = v.mul_add(v, *a);
        }
        *out = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

/// The layer norm's ε in `f32` (the reference's [`cpu::LAYERNORM_EPS`]).
const LN_EPS: f32 = cpu::LAYERNORM_EPS as f32;

/// Layer norm of rows `inp` (each `c` long) into `out`, with each row's mean and `1/σ`: the formula of
/// [`cpu::layernorm_forward`], its two row sums (of `x` and of `(x − mean)²`) in the fixed lane pattern.
#[inline(always)]
fn ln_rows(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], c: usize) {
    let cf = c as f32;
    let rows = inp.chunks_exact(c).zip(out.chunks_exact_mut(c));
    for ((x, o), (mean, rstd)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        let m = lane_sum(x) / cf;
        let var = lane_sum_of(x, |v| (v - m) * (v - m)) / cf;
        let r = 1.0 / (var + LN_EPS).sqrt();
        for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (v - m) * r * w + b;
        }
        *mean = m;
        *rstd = r;
    }
}

multiversion! {
    /// [`ln_rows`] compiled for the instruction set (the rows of one task).
    fn ln_forward(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        c: usize,
    ) {
        ln_rows(out, mean, rstd, inp, weight, bias, c)
    }
}

multiversion! {
    /// [`cpu::residual_forward`] then [`ln_rows`] of the sum, compiled for the instruction set.
    fn residual_ln_forward(
        sum: &mut [f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        a: &[f32],
        b: &[f32],
        weight: &[f32],
        bias: &[f32],
        c: usize,
    ) {
        cpu::residual_forward(sum, a, b);
        ln_rows(out, mean, rstd, sum, weight, bias, c)
    }
}

multiversion! {
    /// `dinp += ∂L/∂inp` of rows of the layer norm, after `dinp = dres` when a residual gradient is given: the
    /// formula of [`cpu::layernorm_backward_input`], its two row sums (of `g = dout·w` and of `g·x̂`) in the fixed
    /// lane pattern.
    fn ln_backward_input(
        dinp: &mut [f32],
        dres: Option<&[f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        let cf = c as f32;
        for (i, (&m, &r)) in mean.iter().zip(rstd).enumerate() {
            let row = i * c..(i + 1) * c;
            let (x, d, di) = (&inp[row.clone()], &dout[row.clone()], &mut dinp[row.clone()]);
            let (mut gs, mut gxs) = ([0.0f32; LANES], [0.0f32; LANES]);
            // Adds one group of up to LANES elements (element k to lane k) to both sums.
            let mut lanes = |xs: &[f32], ds: &[f32], ws: &[f32]| {
                for (k, ((&v, &dv), &w)) in xs.iter().zip(ds).zip(ws).enumerate() {
                    let g = dv * w;
                    gs[k] += g;
                    gxs[k] += g * (v - m) * r;
                }
            };
            let (mut xg, mut dg, mut wg) = (x.chunks_exact(LANES), d.chunks_exact(LANES), weight.chunks_exact(LANES));
            for ((xs, ds), ws) in (&mut xg).zip(&mut dg).zip(&mut wg) {
                lanes(xs, ds, ws);
            }
            lanes(xg.remainder(), dg.remainder(), wg.remainder());
            let (g_mean, gx_mean) = (lane_combine(gs) / cf, lane_combine(gxs) / cf);
            if let Some(res) = dres {
                di.copy_from_slice(&res[row]);
            }
            for (((o, &v), &dv), &w) in di.iter_mut().zip(x).zip(d).zip(weight) {
                *o += (dv * w - g_mean - (v - m) * r * gx_mean) * r;
            }
        }
    }
}

multiversion! {
    /// The columns `j0..j0 + dw.len()` of [`cpu::layernorm_backward_weight`] (rows in order 0..N).
    fn ln_backward_weight_columns(
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        j0: usize,
        c: usize,
    ) {
        for (i, (&m, &r)) in mean.iter().zip(rstd).enumerate() {
            let (x, d) = (&inp[i * c + j0..], &dout[i * c + j0..]);
            for (((w, b), &v), &dv) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(d) {
                *w += dv * (v - m) * r;
                *b += dv;
            }
        }
    }
}

multiversion! {
    /// `out = a + b` elementwise ([`cpu::residual_forward`]) compiled for the instruction set.
    fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
        cpu::residual_forward(out, a, b)
    }
}

multiversion! {
    /// `dst += src` elementwise.
    fn add_in_place(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

multiversion! {
    /// `x *= alpha` elementwise.
    fn scale_in_place(x: &mut [f32], alpha: f32) {
        for v in x.iter_mut() {
            *v *= alpha;
        }
    }
}

/// `Σ x²` in f64, in a fixed order: partial sums of [`SUM_CHUNK`]-element chunks (each in a fixed lane pattern),
/// added in chunk order. The same for any thread count; threaded and vectorised.
pub fn sum_squares(x: &[f32]) -> f64 {
    let isa = Isa::best();
    let partials: Vec<f64> = if x.len() <= SUM_CHUNK {
        let mut s = 0.0;
        chunk_sum_squares(isa, x, &mut s);
        vec![s]
    } else {
        let mut partials = vec![0.0f64; x.len().div_ceil(SUM_CHUNK)];
        for_chunks(&mut partials, 1, |i, s| {
            let chunk = &x[i * SUM_CHUNK..((i + 1) * SUM_CHUNK).min(x.len())];
            chunk_sum_squares(isa, chunk, &mut s[0]);
        });
        partials
    };
    partials.iter().sum()
}

/// `x *= alpha`.
pub fn scale(x: &mut [f32], alpha: f32) {
    let isa = Isa::best();
    for_chunks(x, chunk_rows(x.len(), 1, 16 * 1024, 64), |_, c| {
        scale_in_place(isa, c, alpha)
    });
}

/// Layer norm: `out`, `inp` (N, C); `mean`, `rstd` (N); `weight`, `bias` (C). The row sums go in the fixed lane
/// pattern (within a few ulp of [`cpu::layernorm_forward`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_forward: c must be positive");
    assert_eq!(out.len(), n * c, "layernorm_forward: out must have n*c elements");
    assert_eq!(inp.len(), n * c, "layernorm_forward: inp must have n*c elements");
    assert_eq!(
        (mean.len(), rstd.len()),
        (n, n),
        "layernorm_forward: mean and rstd must have n elements"
    );
    let per = chunk_rows(n, 8 * c, 1, 1);
    let isa = Isa::best();
    let (outs, means, rstds) = (
        Chunks::new(out, per * c),
        Chunks::new(mean, per),
        Chunks::new(rstd, per),
    );
    for_each(means.count(), |i| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (o, m, r) = unsafe { (outs.get(i), means.get(i), rstds.get(i)) };
        let rows = m.len();
        let x = &inp[i * per * c..(i * per + rows) * c];
        ln_forward(isa, o, m, r, x, weight, bias, c);
    });
}

/// `sum = a + b` and the layer norm of `sum`, chunk by chunk of rows, each row in cache for both: bitwise
/// [`residual_forward`] then [`layernorm_forward`] (tested).
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    sum: &mut [f32],
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    a: &[f32],
    b: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    assert!(c > 0, "residual_layernorm_forward: c must be positive");
    assert_eq!(
        (sum.len(), out.len(), a.len(), b.len()),
        (n * c, n * c, n * c, n * c),
        "residual_layernorm_forward: sum, out, a and b must have n*c elements"
    );
    assert_eq!(
        (mean.len(), rstd.len()),
        (n, n),
        "residual_layernorm_forward: mean and rstd must have n elements"
    );
    let per = chunk_rows(n, 9 * c, 1, 1);
    let isa = Isa::best();
    let (sums, outs) = (Chunks::new(sum, per * c), Chunks::new(out, per * c));
    let (means, rstds) = (Chunks::new(mean, per), Chunks::new(rstd, per));
    for_each(means.count(), |i| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (s, o, m, r) = unsafe { (sums.get(i), outs.get(i), means.get(i), rstds.get(i)) };
        let range = i * per * c..i * per * c + s.len();
        residual_ln_forward(isa, s, o, m, r, &a[range.clone()], &b[range], weight, bias, c);
    });
}

/// `dinp += ∂L/∂inp` of the layer norm (rows independent; the row sums in the fixed lane pattern, within a few
/// ulp of [`cpu::layernorm_backward_input`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_input(
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    ln_backward_input_rows(
        dinp,
        None,
        dout,
        inp,
        weight,
        mean,
        rstd,
        n,
        c,
        "layernorm_backward_input",
    );
}

/// `dinp = dres + ∂L/∂inp` of the layer norm, overwriting `dinp`: the gradient of a residual stream whose branch
/// starts with this layer norm. Bitwise `dinp = dres` then [`layernorm_backward_input`], with each row copied
/// while it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_input_residual(
    dinp: &mut [f32],
    dres: &[f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    let op = "layernorm_backward_input_residual";
    assert_eq!(dres.len(), n * c, "{op}: dres must have n*c elements");
    ln_backward_input_rows(dinp, Some(dres), dout, inp, weight, mean, rstd, n, c, op);
}

#[allow(clippy::too_many_arguments)]
fn ln_backward_input_rows(
    dinp: &mut [f32],
    dres: Option<&[f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
    op: &str,
) {
    assert!(c > 0, "{op}: c must be positive");
    assert_eq!(
        (dinp.len(), dout.len(), inp.len()),
        (n * c, n * c, n * c),
        "{op}: dinp, dout and inp must have n*c elements"
    );
    assert_eq!(weight.len(), c, "{op}: weight must have c elements");
    assert_eq!(
        (mean.len(), rstd.len()),
        (n, n),
        "{op}: mean and rstd must have n elements"
    );
    let per = chunk_rows(n, 10 * c, 1, 1);
    let isa = Isa::best();
    for_chunks(dinp, per * c, |start, di| {
        let (r0, rows) = (start / c, di.len() / c);
        let range = start..start + di.len();
        ln_backward_input(
            isa,
            di,
            dres.map(|r| &r[range.clone()]),
            &dout[range.clone()],
            &inp[range],
            weight,
            &mean[r0..r0 + rows],
            &rstd[r0..r0 + rows],
            c,
        );
    });
}

/// `dweight += Σ_i dout[i]·xhat[i]`, `dbias += Σ_i dout[i]`: chunks of columns, rows in order 0..N (the
/// reference's order for each element).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_weight(
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert_eq!(
        (dweight.len(), dbias.len()),
        (c, c),
        "layernorm_backward_weight: dweight and dbias must have c elements"
    );
    assert_eq!(
        dout.len(),
        n * c,
        "layernorm_backward_weight: dout must have n*c elements"
    );
    assert_eq!(
        inp.len(),
        n * c,
        "layernorm_backward_weight: inp must have n*c elements"
    );
    assert_eq!(
        (mean.len(), rstd.len()),
        (n, n),
        "layernorm_backward_weight: mean and rstd must have n elements"
    );
    let per = chunk_rows(c, 4 * n, 64, 16);
    let isa = Isa::best();
    let (dws, dbs) = (Chunks::new(dweight, per), Chunks::new(dbias, per));
    for_each(dws.count(), |k| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (dw, db) = unsafe { (dws.get(k), dbs.get(k)) };
        ln_backward_weight_columns(isa, dw, db, dout, inp, mean, rstd, k * per, c);
    });
}

/// `out = a + b`.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert_eq!(
        (a.len(), b.len()),
        (out.len(), out.len()),
        "residual_forward: a and b must have the length of out"
    );
    let isa = Isa::best();
    for_chunks(out, chunk_rows(out.len(), 1, 4096, 64), |start, o| {
        let r = start..start + o.len();
        add(isa, o, &a[r.clone()], &b[r]);
    });
}

/// Fewest elements per chunk of [`fill`] and [`copy`] (4 MiB of f32). A smaller buffer is filled or copied inline
/// by the calling thread without waiting for one of the pool's compute tokens, as a plain copy would: transports
/// and reducers copy small buffers while the stages compute, and must not queue behind them.
pub const COPY_CHUNK_MIN: usize = 1 << 20;

/// `dst = value` everywhere; on the pool for buffers past [`COPY_CHUNK_MIN`] (a fill is bound by memory
/// bandwidth, which one core does not saturate).
pub fn fill(dst: &mut [f32], value: f32) {
    for_chunks(dst, chunk_rows(dst.len(), 1, COPY_CHUNK_MIN, 64), |_, d| d.fill(value));
}

/// `dst = src`; on the pool for buffers past [`COPY_CHUNK_MIN`] (as [`fill`]).
pub fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(src.len(), dst.len(), "copy: src must have the length of dst");
    for_chunks(dst, chunk_rows(src.len(), 1, COPY_CHUNK_MIN, 64), |start, d| {
        d.copy_from_slice(&src[start..start + d.len()])
    });
}

/// `dst += src`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(src.len(), dst.len(), "add_assign: src must have the length of dst");
    let isa = Isa::best();
    for_chunks(dst, chunk_rows(src.len(), 1, 4096, 64), |start, d| {
        add_in_place(isa, d, &src[start..start + d.len()])
    });
}

/// Token + position embedding: chunks of whole sequences.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    assert_eq!(out.len(), b * t * c, "embedding_forward: out must have b*t*c elements");
    assert_eq!(tokens.len(), b * t, "embedding_forward: tokens must have b*t elements");
    if t == 0 || c == 0 {
        return;
    }
    let per = chunk_rows(b, t * c, 1, 1);
    for_chunks(out, per * t * c, |start, o| {
        let (s0, seqs) = (start / (t * c), o.len() / (t * c));
        cpu::embedding_forward(o, &tokens[s0 * t..(s0 + seqs) * t], wte, wpe, seqs, t, c);
    });
}

/// `(max, Σ e^{x − max})` of one row, in the fixed lane pattern.
#[inline(always)]
fn row_max_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = lane_max(row);
    (max, lane_sum_of(row, |x| exp(x - max)))
}

multiversion! {
    /// Losses of a chunk of rows.
    fn ce_forward_rows(losses: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
        for ((loss, row), &t) in losses.iter_mut().zip(logits.chunks_exact(v)).zip(targets) {
            let (max, sum) = row_max_sum_exp(row);
            *loss = sum.ln() - (row[t as usize] - max);
        }
    }
}

multiversion! {
    /// `dlogits += scale · (softmax − onehot)` on a chunk of rows, the softmax recomputed from the logits (each
    /// row zeroed first when `overwrite`, while it is in cache).
    fn ce_backward_rows(dlogits: &mut [f32], logits: &[f32], targets: &[u32], scale: f32, v: usize, overwrite: bool) {
        for ((drow, row), &t) in dlogits.chunks_exact_mut(v).zip(logits.chunks_exact(v)).zip(targets) {
            if overwrite {
                drow.fill(0.0);
            }
            let (max, sum) = row_max_sum_exp(row);
            let k = scale / sum;
            for (d, &x) in drow.iter_mut().zip(row) {
                *d = exp(x - max).mul_add(k, *d);
            }
            drow[t as usize] -= scale;
        }
    }
}

fn check_targets(targets: &[u32], v: usize, op: &str) {
    if let Some((i, &t)) = targets.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        panic!("{op}: target {t} of row {i} is out of the vocabulary ({v})");
    }
}

/// Cross-entropy of `softmax(logits)` per row: `losses` (N), `logits` (N, V). The softmax is never stored. Within
/// a few ulp of the reference (vectorised `exp`, sums in a fixed 16-lane pattern).
pub fn cross_entropy_forward(losses: &mut [f32], logits: &[f32], targets: &[u32], n: usize, v: usize) {
    assert!(v > 0, "cross_entropy_forward: v must be positive");
    assert_eq!(losses.len(), n, "cross_entropy_forward: losses must have n elements");
    assert_eq!(
        logits.len(),
        n * v,
        "cross_entropy_forward: logits must have n*v elements"
    );
    assert_eq!(targets.len(), n, "cross_entropy_forward: targets must have n elements");
    check_targets(targets, v, "cross_entropy_forward");
    let isa = Isa::best();
    for_chunks(losses, chunk_rows(n, 4 * v, 1, 1), |r0, l| {
        let rows = l.len();
        ce_forward_rows(isa, l, &logits[r0 * v..(r0 + rows) * v], &targets[r0..r0 + rows], v);
    });
}

/// `dlogits += scale · (softmax(logits) − onehot(targets))` per row, recomputing the softmax.
pub fn cross_entropy_backward(dlogits: &mut [f32], logits: &[f32], targets: &[u32], scale: f32, n: usize, v: usize) {
    ce_backward(dlogits, logits, targets, scale, n, v, false)
}

/// [`cross_entropy_backward`] into a `dlogits` whose contents are ignored: each row is zeroed just before it is
/// accumulated into (in cache, on the pool), bitwise zeroing `dlogits` first.
pub fn cross_entropy_backward_overwrite(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    scale: f32,
    n: usize,
    v: usize,
) {
    ce_backward(dlogits, logits, targets, scale, n, v, true)
}

fn ce_backward(dlogits: &mut [f32], logits: &[f32], targets: &[u32], scale: f32, n: usize, v: usize, overwrite: bool) {
    assert!(v > 0, "cross_entropy_backward: v must be positive");
    assert_eq!(
        dlogits.len(),
        n * v,
        "cross_entropy_backward: dlogits must have n*v elements"
    );
    assert_eq!(
        logits.len(),
        n * v,
        "cross_entropy_backward: logits must have n*v elements"
    );
    assert_eq!(targets.len(), n, "cross_entropy_backward: targets must have n elements");
    check_targets(targets, v, "cross_entropy_backward");
    let isa = Isa::best();
    let per = chunk_rows(n, 6 * v, 1, 1);
    for_chunks(dlogits, per * v, |start, d| {
        let (r0, rows) = (start / v, d.len() / v);
        ce_backward_rows(
            isa,
            d,
            &logits[start..start + d.len()],
            &targets[r0..r0 + rows],
            scale,
            v,
            overwrite,
        );
    });
}

/// One element of [`cpu::adamw_step`]'s loop, the same operations in the same order (no fused multiply-adds), so
/// bitwise the reference's.
#[inline(always)]
fn adamw_update(cfg: &cpu::AdamW, (bc1, bc2): (f32, f32), p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    let cpu::AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    } = *cfg;
    *m = beta1 * *m + (1.0 - beta1) * g;
    *v = beta2 * *v + (1.0 - beta2) * g * g;
    let (mhat, vhat) = (*m / bc1, *v / bc2);
    *p -= lr * (mhat / (vhat.sqrt() + eps) + weight_decay * *p);
}

/// The bias corrections `(1 − β₁^step, 1 − β₂^step)` as the reference computes them, after checking the lengths.
fn adamw_setup(cfg: &cpu::AdamW, len: usize, others: (usize, usize, usize), step: u32) -> (f32, f32) {
    assert!(step >= 1, "adamw: step is 1-based");
    assert_eq!(
        others,
        (len, len, len),
        "adamw: grads, m and v must have the length of params"
    );
    (1.0 - cfg.beta1.powf(step as f32), 1.0 - cfg.beta2.powf(step as f32))
}

/// Elements per chunk of the optimizer's passes.
fn adamw_chunk_len(len: usize) -> usize {
    chunk_rows(len, 12, 4096, 64)
}

multiversion! {
    /// One chunk of [`cpu::adamw_step`].
    fn adamw_chunk(cfg: &cpu::AdamW, bc: (f32, f32), params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            adamw_update(cfg, bc, p, g, m, v);
        }
    }
}

multiversion! {
    /// [`adamw_chunk`] with the gradient scaled first (`g · scale`, as `Backend::scale` would) and cleared after.
    fn adamw_fused_chunk(
        cfg: &cpu::AdamW,
        bc: (f32, f32),
        scale: Option<f32>,
        params: &mut [f32],
        grads: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for (((p, g), m), v) in params.iter_mut().zip(grads.iter_mut()).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g0 = match scale {
                Some(s) => *g * s,
                None => *g,
            };
            *g = 0.0;
            adamw_update(cfg, bc, p, g0, m, v);
        }
    }
}

/// `grads *= clip_scale` (when given), one AdamW step, `grads = 0`, in one pass over the four arrays: bitwise the
/// three separate ops.
#[allow(clippy::too_many_arguments)]
pub fn adamw_fused(
    cfg: &cpu::AdamW,
    params: &mut [f32],
    grads: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u32,
    clip_scale: Option<f32>,
) {
    let bc = adamw_setup(cfg, params.len(), (grads.len(), m.len(), v.len()), step);
    let (per, isa) = (adamw_chunk_len(params.len()), Isa::best());
    let (ps, gs) = (Chunks::new(params, per), Chunks::new(grads, per));
    let (ms, vs) = (Chunks::new(m, per), Chunks::new(v, per));
    for_each(ps.count(), |i| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (p, g, m, v) = unsafe { (ps.get(i), gs.get(i), ms.get(i), vs.get(i)) };
        adamw_fused_chunk(isa, cfg, bc, clip_scale, p, g, m, v);
    });
}

/// One AdamW step (1-based `step`), elementwise on chunks; bitwise [`cpu::adamw_step`].
pub fn adamw(cfg: &cpu::AdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: u32) {
    let bc = adamw_setup(cfg, params.len(), (grads.len(), m.len(), v.len()), step);
    let (per, isa) = (adamw_chunk_len(params.len()), Isa::best());
    let (ps, ms, vs) = (Chunks::new(params, per), Chunks::new(m, per), Chunks::new(v, per));
    for_each(ps.count(), |i| {
        // SAFETY: `for_each` runs each index once; the chunks stay in this task.
        let (p, m, v) = unsafe { (ps.get(i), ms.get(i), vs.get(i)) };
        let start = i * per;
        adamw_chunk(isa, cfg, bc, p, &grads[start..start + p.len()], m, v);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::testutil::{rel, same, values};

    /// The pooled fill and copy write every element, across chunk edges and for any thread count.
    #[test]
    fn fill_and_copy_cover_every_element() {
        let _pool = crate::fast::testutil::pool_lock();
        for threads in [1, 3] {
            crate::fast::set_threads(threads);
            for len in [0, 1, 16 * 1024 + 3, 3 * COPY_CHUNK_MIN + 5] {
                let src = values(len, 21, 300.0);
                let mut dst = vec![f32::NAN; len];
                copy(&mut dst, &src);
                assert!(same(&dst, &src), "copy of {len} on {threads} threads");
                fill(&mut dst, -0.5);
                assert!(dst.iter().all(|&x| x == -0.5), "fill of {len} on {threads} threads");
            }
        }
    }

    /// The reference ops compiled for each instruction set (residual, sums, the layer norm's weight gradient)
    /// give the reference's bits; the layer norm's lane-pattern rows give the portable build's bits on every
    /// instruction set.
    #[test]
    fn every_instruction_set_runs_the_reference_arithmetic() {
        let (n, c) = (37, 100);
        let (inp, w, b, dout) = (
            values(n * c, 11, 300.0),
            values(c, 12, 900.0),
            values(c, 13, 900.0),
            values(n * c, 14, 300.0),
        );
        let p = Isa::Portable;
        let (mut o0, mut m0, mut r0) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        ln_forward(p, &mut o0, &mut m0, &mut r0, &inp, &w, &b, c);
        let mut s0 = vec![0.0; n * c];
        cpu::residual_forward(&mut s0, &inp, &dout);
        let (mut so0, mut sm0, mut sr0) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        ln_forward(p, &mut so0, &mut sm0, &mut sr0, &s0, &w, &b, c);
        let mut d0 = values(n * c, 15, 300.0);
        ln_backward_input(p, &mut d0, None, &dout, &inp, &w, &m0, &r0, c);
        let (mut dw0, mut db0) = (values(c, 16, 300.0), values(c, 17, 300.0));
        cpu::layernorm_backward_weight(&mut dw0, &mut db0, &dout, &inp, &m0, &r0, n, c);
        let plus: Vec<f32> = inp.iter().zip(&dout).map(|(x, y)| x + y).collect();
        let times: Vec<f32> = inp.iter().map(|x| x * 0.37).collect();
        for isa in Isa::available() {
            let (mut o, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            ln_forward(isa, &mut o, &mut m, &mut r, &inp, &w, &b, c);
            assert!(same(&o, &o0) && same(&m, &m0) && same(&r, &r0), "{isa:?} layer norm");
            let (mut s, mut so, mut sm, mut sr) = (vec![0.0; n * c], vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            residual_ln_forward(isa, &mut s, &mut so, &mut sm, &mut sr, &inp, &dout, &w, &b, c);
            assert!(
                same(&s, &s0) && same(&so, &so0) && same(&sm, &sm0) && same(&sr, &sr0),
                "{isa:?} residual + ln"
            );
            let mut d = values(n * c, 15, 300.0);
            ln_backward_input(isa, &mut d, None, &dout, &inp, &w, &m0, &r0, c);
            assert!(same(&d, &d0), "{isa:?} layer norm backward input");
            // With a residual gradient: `dinp = dres` first, whatever `dinp` held.
            let mut d = vec![f32::NAN; n * c];
            ln_backward_input(
                isa,
                &mut d,
                Some(&values(n * c, 15, 300.0)),
                &dout,
                &inp,
                &w,
                &m0,
                &r0,
                c,
            );
            assert!(same(&d, &d0), "{isa:?} layer norm backward input with a residual");
            let (mut dw, mut db) = (values(c, 16, 300.0), values(c, 17, 300.0));
            ln_backward_weight_columns(isa, &mut dw[..64], &mut db[..64], &dout, &inp, &m0, &r0, 0, c);
            ln_backward_weight_columns(isa, &mut dw[64..], &mut db[64..], &dout, &inp, &m0, &r0, 64, c);
            assert!(same(&dw, &dw0) && same(&db, &db0), "{isa:?} layer norm backward weight");
            let mut o = vec![0.0; n * c];
            add(isa, &mut o, &inp, &dout);
            assert!(same(&o, &plus), "{isa:?} add");
            let mut o = inp.clone();
            add_in_place(isa, &mut o, &dout);
            assert!(same(&o, &plus), "{isa:?} add in place");
            let mut o = inp.clone();
            scale_in_place(isa, &mut o, 0.37);
            assert!(same(&o, &times), "{isa:?} scale");
        }
    }

    /// The layer norm's forward and input gradient (plain and with a residual gradient) are within a few ulp of
    /// the reference in f64, and the same bits for any thread count.
    #[test]
    fn layer_norm_is_close_to_the_f64_reference_and_the_same_for_any_thread_count() {
        let f64s = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        let _pool = crate::fast::testutil::pool_lock();
        for (n, c) in [(301, 96), (64, 768), (5, 7), (1, 1)] {
            // Rows with a large common offset: a variance that one long f32 chain would lose digits of.
            let inp: Vec<f32> = values(n * c, 1, 500.0).iter().map(|x| x + 3.0).collect();
            let (w, b, dout, dres) = (
                values(c, 2, 500.0),
                values(c, 3, 500.0),
                values(n * c, 4, 500.0),
                values(n * c, 5, 500.0),
            );
            let (mut o64, mut m64, mut r64) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            cpu::layernorm_forward(&mut o64, &mut m64, &mut r64, &f64s(&inp), &f64s(&w), &f64s(&b), n, c);
            let mut first: Option<Vec<Vec<f32>>> = None;
            for threads in [1, 2, 3] {
                crate::fast::set_threads(threads);
                let (mut o, mut m, mut r) = (vec![f32::NAN; n * c], vec![f32::NAN; n], vec![f32::NAN; n]);
                layernorm_forward(&mut o, &mut m, &mut r, &inp, &w, &b, n, c);
                assert!(rel(&o, &o64) < 1e-6, "forward {n}x{c}: {}", rel(&o, &o64));
                assert!(rel(&m, &m64) < 1e-6 && rel(&r, &r64) < 1e-6, "statistics {n}x{c}");
                // The input gradient at the f32 statistics, against the reference at the same statistics.
                let mut want = f64s(&dres);
                cpu::layernorm_backward_input(
                    &mut want,
                    &f64s(&dout),
                    &f64s(&inp),
                    &f64s(&w),
                    &f64s(&m),
                    &f64s(&r),
                    n,
                    c,
                );
                let mut d = dres.clone();
                layernorm_backward_input(&mut d, &dout, &inp, &w, &m, &r, n, c);
                assert!(rel(&d, &want) < 1e-5, "backward {n}x{c}: {}", rel(&d, &want));
                let mut dr = vec![f32::NAN; n * c];
                layernorm_backward_input_residual(&mut dr, &dres, &dout, &inp, &w, &m, &r, n, c);
                assert!(
                    same(&dr, &d),
                    "the residual form is bitwise a copy then the accumulation"
                );
                let got = vec![o, m, r, d];
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(f.iter().zip(&got).all(|(x, y)| same(x, y)), "{threads} threads {n}x{c}"),
                }
            }
        }
    }

    #[test]
    fn row_ops_equal_the_reference_bitwise() {
        let (n, c, v) = (301, 96, 257);
        let (inp, w, b, dout) = (
            values(n * c, 1, 500.0),
            values(c, 2, 500.0),
            values(c, 3, 500.0),
            values(n * c, 4, 500.0),
        );
        // The layer norm statistics the weight gradient is taken with (any valid ones).
        let (mut o1, mut m1, mut r1) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        cpu::layernorm_forward(&mut o1, &mut m1, &mut r1, &inp, &w, &b, n, c);
        let (mut w1, mut b1, mut w2, mut b2) = (
            values(c, 6, 500.0),
            values(c, 7, 500.0),
            values(c, 6, 500.0),
            values(c, 7, 500.0),
        );
        cpu::layernorm_backward_weight(&mut w1, &mut b1, &dout, &inp, &m1, &r1, n, c);
        layernorm_backward_weight(&mut w2, &mut b2, &dout, &inp, &m1, &r1, n, c);
        assert!(same(&w1, &w2) && same(&b1, &b2), "layernorm backward weight");

        let (mut s1, mut s2) = (vec![0.0; n * c], vec![0.0; n * c]);
        cpu::residual_forward(&mut s1, &inp, &dout);
        residual_forward(&mut s2, &inp, &dout);
        assert!(same(&s1, &s2), "residual");
        let (mut o3, mut m3, mut r3) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        let mut s3 = vec![0.0; n * c];
        residual_layernorm_forward(&mut s3, &mut o3, &mut m3, &mut r3, &inp, &dout, &w, &b, n, c);
        let (mut o4, mut m4, mut r4) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut o4, &mut m4, &mut r4, &s1, &w, &b, n, c);
        assert!(
            same(&s3, &s1) && same(&o3, &o4) && same(&m3, &m4) && same(&r3, &r4),
            "residual + layernorm"
        );

        let (bs, t) = (7, 43);
        let tokens: Vec<u32> = (0..bs * t).map(|i| (i * 31 % v) as u32).collect();
        let (wte, wpe) = (values(v * c, 8, 500.0), values(t * c, 9, 500.0));
        let (mut e1, mut e2) = (vec![0.0; bs * t * c], vec![0.0; bs * t * c]);
        cpu::embedding_forward(&mut e1, &tokens, &wte, &wpe, bs, t, c);
        embedding_forward(&mut e2, &tokens, &wte, &wpe, bs, t, c);
        assert!(same(&e1, &e2), "embedding");

        let logits = values(n * v, 10, 500.0);
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        // The cross-entropy against the reference in f64: within a few ulp, on every instruction set alike.
        let l64: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        let mut want = vec![0.0f64; n];
        cpu::softmax_cross_entropy_forward(&mut want, &l64, &targets, n, v);
        let mut want_g = values(n * v, 11, 500.0)
            .iter()
            .map(|&x| f64::from(x))
            .collect::<Vec<_>>();
        cpu::softmax_cross_entropy_backward(&mut want_g, &l64, &targets, &vec![0.3; n], n, v);
        let mut firsts: Option<(Vec<f32>, Vec<f32>)> = None;
        for isa in Isa::available() {
            let mut l = vec![0.0f32; n];
            ce_forward_rows(isa, &mut l, &logits, &targets, v);
            for (got, want) in l.iter().zip(&want) {
                assert!(
                    (f64::from(*got) - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{isa:?} loss {got} vs {want}"
                );
            }
            let mut g = values(n * v, 11, 500.0);
            ce_backward_rows(isa, &mut g, &logits, &targets, 0.3, v, false);
            for (got, want) in g.iter().zip(&want_g) {
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{isa:?} dlogit {got} vs {want}"
                );
            }
            match &firsts {
                None => firsts = Some((l, g)),
                Some((l0, g0)) => assert!(same(l0, &l) && same(g0, &g), "{isa:?} differs from the first ISA"),
            }
        }
        let (mut l2, mut g2) = (vec![0.0; n], values(n * v, 11, 500.0));
        cross_entropy_forward(&mut l2, &logits, &targets, n, v);
        cross_entropy_backward(&mut g2, &logits, &targets, 0.3, n, v);
        let (l0, g0) = firsts.unwrap();
        assert!(same(&l0, &l2) && same(&g0, &g2), "threaded rows differ from one call");
        // Overwriting is bitwise zeroing first, whatever the buffer held.
        let (mut g3, mut g4) = (vec![f32::NAN; n * v], vec![0.0; n * v]);
        cross_entropy_backward_overwrite(&mut g3, &logits, &targets, 0.3, n, v);
        cross_entropy_backward(&mut g4, &logits, &targets, 0.3, n, v);
        assert!(same(&g3, &g4), "overwriting differs from zeroing then accumulating");

        let cfg = cpu::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let len = 100_003;
        let (mut p1, g, mut ma, mut va) = (
            values(len, 12, 500.0),
            values(len, 13, 500.0),
            values(len, 14, 500.0),
            values(len, 15, 500.0),
        );
        let (mut p2, mut mb, mut vb) = (p1.clone(), ma.clone(), vb_abs(&va));
        let va_abs = vb_abs(&va);
        va = va_abs;
        cpu::adamw_step(&cfg, &mut p1, &g, &mut ma, &mut va, 3);
        adamw(&cfg, &mut p2, &g, &mut mb, &mut vb, 3);
        assert!(same(&p1, &p2) && same(&ma, &mb) && same(&va, &vb), "adamw");
    }

    #[test]
    fn fused_optimizer_step_is_bitwise_scale_then_adamw_then_zero() {
        let cfg = cpu::AdamW {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let len = 70_001;
        for clip in [None, Some(0.37f32)] {
            let (mut p1, mut g1, mut m1) = (values(len, 31, 500.0), values(len, 32, 500.0), values(len, 33, 500.0));
            let mut v1: Vec<f32> = values(len, 34, 500.0).iter().map(|x| x.abs()).collect();
            let (mut p2, mut g2, mut m2, mut v2) = (p1.clone(), g1.clone(), m1.clone(), v1.clone());
            if let Some(s) = clip {
                scale(&mut g1, s);
            }
            cpu::adamw_step(&cfg, &mut p1, &g1, &mut m1, &mut v1, 5);
            g1.fill(0.0);
            adamw_fused(&cfg, &mut p2, &mut g2, &mut m2, &mut v2, 5, clip);
            assert!(
                same(&p1, &p2) && same(&m1, &m2) && same(&v1, &v2) && same(&g1, &g2),
                "{clip:?}"
            );
        }
    }

    #[test]
    fn sum_of_squares_is_fixed_order_and_close_to_the_exact_sum() {
        let x = values(3 * SUM_CHUNK + 123, 21, 500.0);
        let exact: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let got = sum_squares(&x);
        assert!((got - exact).abs() <= 1e-12 * exact, "{got} vs {exact}");
        let _pool = crate::fast::testutil::pool_lock();
        for threads in [1, 2, 3] {
            crate::fast::set_threads(threads);
            assert_eq!(sum_squares(&x).to_bits(), got.to_bits(), "{threads} threads");
        }
        for isa in Isa::available() {
            let mut s = 0.0;
            chunk_sum_squares(isa, &x[..SUM_CHUNK], &mut s);
            let mut want = 0.0;
            chunk_sum_squares(Isa::Portable, &x[..SUM_CHUNK], &mut want);
            assert_eq!(s.to_bits(), want.to_bits(), "{isa:?}");
        }
        let mut y = x.clone();
        scale(&mut y, 0.5);
        assert!(y.iter().zip(&x).all(|(a, b)| a.to_bits() == (b * 0.5).to_bits()));
    }

    fn vb_abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }
}
