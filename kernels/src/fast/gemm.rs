//! Matrix products on the pool: the single-threaded `matrixmultiply` kernel on shape-determined blocks of the
//! output (rows when the right operand is the smaller one to re-pack, else columns). Each task preloads the bias
//! into its block and, in the MLP's GELU forms, applies the vectorised GELU (or its derivative) to the block it
//! has just computed, while it is in that core's cache.
//!
//! `matrixmultiply` accumulates every output element over `k` in the same blocks and order however the output is
//! cut, so a blocked product is bitwise the single call for any cut (tested on many shapes): the cut follows the
//! number of pool threads (one block each, since every block re-packs the other operand) without changing a bit.

use super::gelu;
use super::pool::{chunk_rows, for_each};
use super::vector::{multiversion, Isa};

/// Smallest block edge (rows or columns of the output) worth a task: each block re-packs the other operand, so
/// blocks are few and large.
const BLOCK_MIN: usize = 64;

/// A raw pointer that may cross to pool threads; every task writes a disjoint block (see `gemm`'s `SAFETY`).
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks only write disjoint blocks of the output through it while the caller holds the `&mut` borrow and
// waits for every task.
unsafe impl Send for Out {}
// SAFETY: as above; tasks share the pointer value, never the same elements.
unsafe impl Sync for Out {}
impl Out {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Number of elements spanned by a `rows × cols` matrix with strides `rs`, `cs`.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Work a task does on each row of its block of `C` before or after the product: called with the row's index,
/// the block's first column and the block's part of the row.
type RowHook<'h> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'h;

/// `C = A·B + beta·C`, `C` row-major `m × n` (`beta` 0 or 1), `A` `m × k` and `B` `k × n` with any strides.
/// Each task runs `before` on its block's rows, the product, then `after` (both elementwise per row, so the
/// result is the same bits however C is cut), while the block is in its core's cache.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    before: Option<&RowHook>,
    after: Option<&RowHook>,
) {
    assert!(a.len() >= extent(m, k, rsa, csa), "gemm: A is shorter than its shape");
    assert!(b.len() >= extent(k, n, rsb, csb), "gemm: B is shorter than its shape");
    assert_eq!(c.len(), m * n, "gemm: C must hold m·n elements");
    if m == 0 || n == 0 {
        return;
    }
    // Cut the side whose other operand is cheaper to pack again per block: rows re-pack B (k·n), columns A (m·k).
    let by_rows = m >= n;
    let edge = if by_rows { m } else { n };
    // One block per pool thread (each block re-packs the other operand, so no more than can run at once). The
    // cut never changes a bit of the result (see the module docs), so it may follow the thread count.
    let blocks_max = super::pool::threads().min(edge.div_ceil(BLOCK_MIN)).max(1);
    let per = edge.div_ceil(blocks_max).div_ceil(16) * 16;
    let blocks = edge.div_ceil(per);
    let out = Out(c.as_mut_ptr());
    let (ap, bp) = (a.as_ptr() as usize, b.as_ptr() as usize);
    for_each(blocks, |i| {
        let start = i * per;
        let len = per.min(edge - start);
        let (r0, c0, rows, cols) = if by_rows {
            (start, 0, len, n)
        } else {
            (0, start, m, len)
        };
        let hook = |f: &RowHook| {
            for r in r0..r0 + rows {
                // SAFETY: row `r`'s columns `c0..c0 + cols` lie inside C (`r < m`, `c0 + cols ≤ n`) and inside
                // this task's block, which no other task touches (see below); no other reference to them lives.
                let row = unsafe { std::slice::from_raw_parts_mut(out.at(r * n + c0), cols) };
                f(r, c0, row);
            }
        };
        if let Some(f) = before {
            hook(f);
        }
        // SAFETY: the asserts above bound every element of A, B and C that (m, k, n) and the strides address;
        // block (r0, c0, rows, cols) lies inside C, and blocks of distinct `i` are disjoint (they cut one side of
        // C into non-overlapping ranges), so each element of C is written by one task; A and B are only read.
        // `matrixmultiply` is built without its `threading` feature: it runs on this pool thread.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                cols,
                1.0,
                (ap as *const f32).add(r0 * rsa),
                rsa as isize,
                csa as isize,
                (bp as *const f32).add(c0 * csb),
                rsb as isize,
                csb as isize,
                beta,
                out.at(r0 * n + c0),
                n as isize,
                1,
            );
        }
        if let Some(f) = after {
            hook(f);
        }
    });
}

/// `out = inp · weightᵀ + bias`: `out` (N, OC), `inp` (N, C), `weight` (OC, C), `bias` (OC).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    forward(out, inp, weight, bias, n, c, oc, None, "matmul_forward");
}

/// `out = inp · weightᵀ + bias` with the bias preloaded into each task's block (β = 1) and `after` run on it;
/// `op` names the caller in the shape checks.
#[allow(clippy::too_many_arguments)]
fn forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    after: Option<&RowHook>,
    op: &str,
) {
    assert_eq!(out.len(), n * oc, "{op}: out must have n*oc elements");
    assert_eq!(inp.len(), n * c, "{op}: inp must have n*c elements");
    assert_eq!(weight.len(), oc * c, "{op}: weight must have oc*c elements");
    match bias {
        Some(bias) => {
            assert_eq!(bias.len(), oc, "{op}: bias must have oc elements");
            let preload = |_: usize, c0: usize, row: &mut [f32]| row.copy_from_slice(&bias[c0..c0 + row.len()]);
            gemm(n, c, oc, inp, (c, 1), weight, (1, c), 1.0, out, Some(&preload), after);
        }
        None => gemm(n, c, oc, inp, (c, 1), weight, (1, c), 0.0, out, None, after),
    }
}

/// `out = gelu(pre)`, `pre = inp · weightᵀ + bias` (both (N, OC), overwritten): the MLP's up-projection with the
/// GELU applied to each block of the product as it is finished.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_forward(
    out: &mut [f32],
    pre: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    // `forward` checks `pre` (its output), `inp` and `weight`.
    assert_eq!(out.len(), n * oc, "matmul_gelu_forward: out must have n*oc elements");
    assert_eq!(pre.len(), n * oc, "matmul_gelu_forward: pre must have n*oc elements");
    let (isa, dst) = (Isa::best(), Out(out.as_mut_ptr()));
    let act = |r: usize, c0: usize, pre_row: &mut [f32]| {
        // SAFETY: `out` has the shape of `pre` (asserted) and this row segment of it belongs to this task's
        // block alone, as the segment of `pre` it is computed from.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * oc + c0), pre_row.len()) };
        gelu::forward_chunk(isa, o, pre_row);
    };
    forward(pre, inp, weight, bias, n, c, oc, Some(&act), "matmul_gelu_forward");
}

/// `dinp += dout · weight`: `dinp` (N, C), `dout` (N, OC), `weight` (OC, C).
pub fn matmul_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], n: usize, c: usize, oc: usize) {
    input_grad(dinp, dout, weight, n, c, oc, 1.0, None, "matmul_backward_input");
}

/// `dinp = dout · weight`, overwriting `dinp` (whatever it held; no zeroing pass): the same bits as zeroing it
/// and then [`matmul_backward_input`], but for the sign of an exact zero (`+0 + −0` is `+0`).
pub fn matmul_backward_input_overwrite(dinp: &mut [f32], dout: &[f32], weight: &[f32], n: usize, c: usize, oc: usize) {
    input_grad(
        dinp,
        dout,
        weight,
        n,
        c,
        oc,
        0.0,
        None,
        "matmul_backward_input_overwrite",
    );
}

/// `dinp = dout · weight + beta · dinp` with `after` run on each task's block; `op` names the caller in the shape
/// checks.
#[allow(clippy::too_many_arguments)]
fn input_grad(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
    beta: f32,
    after: Option<&RowHook>,
    op: &str,
) {
    assert_eq!(dinp.len(), n * c, "{op}: dinp must have n*c elements");
    assert_eq!(dout.len(), n * oc, "{op}: dout must have n*oc elements");
    assert_eq!(weight.len(), oc * c, "{op}: weight must have oc*c elements");
    gemm(n, oc, c, dout, (oc, 1), weight, (c, 1), beta, dinp, None, after);
}

/// `dinp = gelu'(pre) ∘ (dout · weight)` (overwritten): `dinp`, `pre` (N, C), `dout` (N, OC), `weight` (OC, C).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_input_gelu(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    pre: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    // `input_grad` checks `dinp`, `dout` and `weight`.
    assert_eq!(
        pre.len(),
        n * c,
        "matmul_backward_input_gelu: pre must have n*c elements"
    );
    // The product overwrites `dinp` (beta 0), then the GELU's derivative scales each block in place.
    let isa = Isa::best();
    let act = |r: usize, c0: usize, d: &mut [f32]| {
        gelu::backward_in_place_chunk(isa, d, &pre[r * c + c0..r * c + c0 + d.len()]);
    };
    input_grad(
        dinp,
        dout,
        weight,
        n,
        c,
        oc,
        0.0,
        Some(&act),
        "matmul_backward_input_gelu",
    );
}

multiversion! {
    /// `db[j] += Σ_rows dout[row, start + j]`, rows in order.
    fn bias_sums(db: &mut [f32], dout: &[f32], start: usize, oc: usize) {
        let end = start + db.len();
        for row in dout.chunks_exact(oc) {
            for (d, &g) in db.iter_mut().zip(&row[start..end]) {
                *d += g;
            }
        }
    }
}

/// `dweight += doutᵀ · inp` and `dbias += Σ_rows dout`: `dweight` (OC, C), `dbias` (OC), `dout` (N, OC),
/// `inp` (N, C). The bias sums run over rows in order 0..N for each column, as in the reference.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_weight(
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(
        dweight.len(),
        oc * c,
        "matmul_backward_weight: dweight must have oc*c elements"
    );
    assert_eq!(
        dout.len(),
        n * oc,
        "matmul_backward_weight: dout must have n*oc elements"
    );
    assert_eq!(inp.len(), n * c, "matmul_backward_weight: inp must have n*c elements");
    gemm(oc, n, c, dout, (1, oc), inp, (c, 1), 1.0, dweight, None, None);
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), oc, "matmul_backward_weight: dbias must have oc elements");
        let per = chunk_rows(oc, n, 64, 16);
        let isa = Isa::best();
        super::pool::for_chunks(dbias, per, |start, db| bias_sums(isa, db, dout, start, oc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;
    use crate::fast::testutil::values;

    /// The bias sums compiled for each instruction set are the reference's row-ordered sums, bit for bit.
    #[test]
    fn bias_sums_are_the_same_on_every_instruction_set() {
        let (n, oc) = (53, 70);
        let dout = values(n * oc, 8, 300.0);
        let mut want = values(oc, 9, 300.0);
        for row in dout.chunks_exact(oc) {
            for (d, &g) in want.iter_mut().zip(row) {
                *d += g;
            }
        }
        for isa in crate::fast::vector::Isa::available() {
            let mut got = values(oc, 9, 300.0);
            bias_sums(isa, &mut got[..40], &dout, 0, oc);
            bias_sums(isa, &mut got[40..], &dout, 40, oc);
            assert_eq!(bits(&got), bits(&want), "{isa:?}");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Blocked and threaded products are bitwise the reference's single `matrixmultiply` call, for shapes cut by
    /// rows, by columns, ragged, tiny, and with k beyond one of the kernel's k-blocks.
    #[test]
    fn blocked_products_equal_the_reference_bitwise() {
        // Every thread count cuts the outputs differently; none may change a bit.
        let _pool = crate::fast::testutil::pool_lock();
        for threads in [1, 2, 3, 5] {
            crate::fast::set_threads(threads);
            products_equal_the_reference_bitwise();
        }
    }

    fn products_equal_the_reference_bitwise() {
        for (n, c, oc) in [
            (1024, 128, 384),
            (64, 300, 2048),
            (37, 513, 19),
            (1, 5, 3),
            (200, 1000, 64),
            (0, 4, 4),
        ] {
            let (inp, w, b) = (
                values(n * c, 1, 1000.0),
                values(oc * c, 2, 1000.0),
                values(oc, 3, 1000.0),
            );
            let dout = values(n * oc, 4, 1000.0);
            let mut want = vec![f32::NAN; n * oc];
            cpu::matmul_forward(&mut want, &inp, &w, Some(&b), n, c, oc);
            let mut got = vec![f32::NAN; n * oc];
            matmul_forward(&mut got, &inp, &w, Some(&b), n, c, oc);
            assert_eq!(bits(&got), bits(&want), "forward n={n} c={c} oc={oc}");
            let (mut want_di, mut got_di) = (values(n * c, 5, 1000.0), values(n * c, 5, 1000.0));
            cpu::matmul_backward_input(&mut want_di, &dout, &w, n, c, oc);
            matmul_backward_input(&mut got_di, &dout, &w, n, c, oc);
            assert_eq!(bits(&got_di), bits(&want_di), "backward input n={n} c={c} oc={oc}");
            // The GELU forms apply the GELU to each task's block: bitwise the product, then the GELU pass.
            let (mut pre, mut act) = (vec![f32::NAN; n * oc], vec![f32::NAN; n * oc]);
            matmul_gelu_forward(&mut act, &mut pre, &inp, &w, Some(&b), n, c, oc);
            let mut want_act = vec![f32::NAN; n * oc];
            gelu::gelu_forward(&mut want_act, &want);
            assert_eq!(bits(&pre), bits(&want), "gelu forward's pre n={n} c={c} oc={oc}");
            assert_eq!(bits(&act), bits(&want_act), "gelu forward n={n} c={c} oc={oc}");
            let pre_in = values(n * c, 8, 300.0);
            let mut got_g = vec![f32::NAN; n * c];
            matmul_backward_input_gelu(&mut got_g, &dout, &w, &pre_in, n, c, oc);
            let mut want_g = vec![0.0; n * c];
            cpu::matmul_backward_input(&mut want_g, &dout, &w, n, c, oc);
            gelu::gelu_backward_in_place(&mut want_g, &pre_in);
            assert_eq!(bits(&got_g), bits(&want_g), "gelu backward input n={n} c={c} oc={oc}");
            // Overwriting ignores what the output held (NaN here) and equals zeroing then accumulating.
            let (mut want_over, mut got_over) = (vec![0.0; n * c], vec![f32::NAN; n * c]);
            cpu::matmul_backward_input(&mut want_over, &dout, &w, n, c, oc);
            matmul_backward_input_overwrite(&mut got_over, &dout, &w, n, c, oc);
            assert_eq!(
                bits(&got_over),
                bits(&want_over),
                "overwriting input n={n} c={c} oc={oc}"
            );
            let (mut want_dw, mut got_dw) = (values(oc * c, 6, 1000.0), values(oc * c, 6, 1000.0));
            let (mut want_db, mut got_db) = (values(oc, 7, 1000.0), values(oc, 7, 1000.0));
            cpu::matmul_backward_weight(&mut want_dw, Some(&mut want_db), &dout, &inp, n, c, oc);
            matmul_backward_weight(&mut got_dw, Some(&mut got_db), &dout, &inp, n, c, oc);
            assert_eq!(bits(&got_dw), bits(&want_dw), "backward weight n={n} c={c} oc={oc}");
            assert_eq!(bits(&got_db), bits(&want_db), "backward bias n={n} c={c} oc={oc}");
        }
    }
}
