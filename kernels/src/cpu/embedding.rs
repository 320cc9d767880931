//! Token + position embedding.

use super::Float;

/// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`.
///
/// Shapes: `out` (B, T, C), `tokens` (B, T), `wte` (V, C) for any vocabulary size V, `wpe` (maxT, C) with
/// maxT >= T. Every token must be `< V`.
pub fn embedding_forward<T: Float>(out: &mut [T], tokens: &[u32], wte: &[T], wpe: &[T], b: usize, t: usize, c: usize) {
    let v = check(
        out.len(),
        tokens,
        wte.len(),
        wpe.len(),
        b,
        t,
        c,
        "embedding_forward",
        "out",
    );
    for (bt, (row, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let tok = tok as usize;
        assert!(
            tok < v,
            "embedding_forward: token {tok} at position {bt} is out of the vocabulary ({v})"
        );
        let pos = bt % t;
        let (we, pe) = (&wte[tok * c..(tok + 1) * c], &wpe[pos * c..(pos + 1) * c]);
        for ((o, &w), &p) in row.iter_mut().zip(we).zip(pe) {
            *o = w + p;
        }
    }
}

/// Backward of [`embedding_forward`]: accumulates `dout[b, t, :]` into `dwte[tokens[b, t], :]` and into
/// `dwpe[t, :]`.
///
/// Shapes: `dwte` (V, C), `dwpe` (maxT, C) with maxT >= T, `dout` (B, T, C), `tokens` (B, T).
pub fn embedding_backward<T: Float>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dout: &[T],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    let v = check(
        dout.len(),
        tokens,
        dwte.len(),
        dwpe.len(),
        b,
        t,
        c,
        "embedding_backward",
        "dout",
    );
    for (bt, (row, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        let tok = tok as usize;
        assert!(
            tok < v,
            "embedding_backward: token {tok} at position {bt} is out of the vocabulary ({v})"
        );
        let pos = bt % t;
        for (dw, &d) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(row) {
            *dw += d;
        }
        for (dp, &d) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row) {
            *dp += d;
        }
    }
}

/// Checks the shared preconditions and returns the vocabulary size.
fn check(
    out_len: usize,
    tokens: &[u32],
    wte_len: usize,
    wpe_len: usize,
    b: usize,
    t: usize,
    c: usize,
    op: &str,
    out_name: &str,
) -> usize {
    assert!(c > 0, "{op}: c must be positive");
    assert_eq!(out_len, b * t * c, "{op}: {out_name} must have b*t*c elements");
    assert_eq!(tokens.len(), b * t, "{op}: tokens must have b*t elements");
    assert_eq!(wte_len % c, 0, "{op}: wte length must be a multiple of c");
    assert!(
        wpe_len >= t * c && wpe_len % c == 0,
        "{op}: wpe must be (maxT, C) with maxT >= t"
    );
    wte_len / c
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_op, OpCase, Rng};
    use super::*;

    struct Case {
        tokens: Vec<u32>,
        b: usize,
        t: usize,
        c: usize,
    }

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let (b, t, c) = (self.b, self.t, self.c);
            let mut out = vec![T::zero(); b * t * c];
            embedding_forward(&mut out, &self.tokens, &x[0], &x[1], b, t, c);
            if let Some(dout) = dout {
                let (dwte, dwpe) = g.split_at_mut(1);
                embedding_backward(&mut dwte[0], &mut dwpe[0], dout, &self.tokens, b, t, c);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        // v < b*t so tokens repeat (accumulation within a call); maxT > t; c = 7.
        let (b, t, c, v, max_t) = (2, 5, 7, 6, 8);
        let mut rng = Rng::new(11);
        let case = Case {
            tokens: rng.ints(b * t, v as u32),
            b,
            t,
            c,
        };
        check_op("embedding", &case, &[rng.vec(v * c), rng.vec(max_t * c)], &[0, 1], 1e-6);
    }

    #[test]
    fn forward_values() {
        let wte = [1.0f32, 2.0, 10.0, 20.0];
        let wpe = [0.5f32, 0.25, 0.125, 0.0625];
        let mut out = [0.0f32; 4];
        embedding_forward(&mut out, &[1, 0], &wte, &wpe, 1, 2, 2);
        assert_eq!(out, [10.5, 20.25, 1.125, 2.0625]);
    }

    #[test]
    #[should_panic(expected = "embedding_forward: token 3")]
    fn rejects_out_of_vocabulary_token() {
        let mut out = [0.0f32; 2];
        embedding_forward(&mut out, &[3], &[0.0; 6], &[0.0; 2], 1, 1, 2);
    }
}
