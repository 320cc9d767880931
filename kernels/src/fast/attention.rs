//! Causal attention on the pool: the reference op of [`crate::cpu::attention`] on chunks of whole batch rows
//! (each batch row's heads, scores and outputs are independent of the others'), so bitwise the reference's.

use super::pool::{chunk_rows, for_chunks};
use crate::cpu;

/// Forward: `out` (B, T, C), `att` (B, NH, T, T), `qkv` (B, T, 3C).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    assert_eq!(out.len(), b * t * c, "attention_forward: out must have b*t*c elements");
    assert_eq!(
        att.len(),
        b * nh * t * t,
        "attention_forward: att must have b*nh*t*t elements"
    );
    assert_eq!(
        qkv.len(),
        b * t * 3 * c,
        "attention_forward: qkv must have b*t*3c elements"
    );
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    // Both outputs are cut at the same batch rows: split `att` first, then give each task its rows of `out`.
    let per = chunk_rows(b, 4 * t * t * c, 1, 1);
    let att_row = nh * t * t;
    let out_row = t * c;
    let mut outs: Vec<&mut [f32]> = out.chunks_mut(per * out_row).collect();
    let mut atts: Vec<&mut [f32]> = att.chunks_mut(per * att_row).collect();
    let tasks: Vec<(usize, &mut [f32], &mut [f32])> = outs
        .drain(..)
        .zip(atts.drain(..))
        .enumerate()
        .map(|(i, (o, a))| (i * per, o, a))
        .collect();
    let mut tasks = tasks;
    super::pool::pool().install(|| {
        use rayon::prelude::*;
        tasks.par_iter_mut().for_each(|(b0, o, a)| {
            let rows = o.len() / out_row;
            let x = &qkv[*b0 * t * 3 * c..(*b0 + rows) * t * 3 * c];
            cpu::attention_forward(o, a, x, rows, t, c, nh);
        })
    });
}

/// Backward: accumulates into `dqkv` (B, T, 3C) from `dout` (B, T, C), `qkv` and the stash `att`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert_eq!(
        dqkv.len(),
        b * t * 3 * c,
        "attention_backward: dqkv must have b*t*3c elements"
    );
    assert_eq!(
        dout.len(),
        b * t * c,
        "attention_backward: dout must have b*t*c elements"
    );
    assert_eq!(
        att.len(),
        b * nh * t * t,
        "attention_backward: att must have b*nh*t*t elements"
    );
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    let per = chunk_rows(b, 8 * t * t * c, 1, 1);
    let row = t * 3 * c;
    for_chunks(dqkv, per * row, |start, d| {
        let (b0, rows) = (start / row, d.len() / row);
        cpu::attention_backward(
            d,
            &dout[b0 * t * c..(b0 + rows) * t * c],
            &qkv[start..start + d.len()],
            &att[b0 * nh * t * t..(b0 + rows) * nh * t * t],
            rows,
            t,
            c,
            nh,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_chunks_equal_the_reference_bitwise() {
        let (b, t, c, nh) = (5, 33, 24, 3);
        let mut s = 7u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 2001) as f32 - 1000.0) / 1000.0
        };
        let qkv: Vec<f32> = (0..b * t * 3 * c).map(|_| next()).collect();
        let dout: Vec<f32> = (0..b * t * c).map(|_| next()).collect();
        let (mut o1, mut a1) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        let (mut o2, mut a2) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        cpu::attention_forward(&mut o1, &mut a1, &qkv, b, t, c, nh);
        attention_forward(&mut o2, &mut a2, &qkv, b, t, c, nh);
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same(&o1, &o2) && same(&a1, &a2));
        let (mut d1, mut d2) = (vec![0.5; b * t * 3 * c], vec![0.5; b * t * 3 * c]);
        cpu::attention_backward(&mut d1, &dout, &qkv, &a1, b, t, c, nh);
        attention_backward(&mut d2, &dout, &qkv, &a1, b, t, c, nh);
        assert!(same(&d1, &d2));
    }
}
