//! AdamW optimizer step on f32 master parameters.

/// AdamW hyperparameters (decoupled weight decay, as PyTorch's `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// Decay rate of the first-moment estimate.
    pub beta1: f32,
    /// Decay rate of the second-moment estimate.
    pub beta2: f32,
    /// Added to `sqrt(vhat)` in the denominator.
    pub eps: f32,
    /// Decoupled weight decay coefficient (multiplied by `lr`).
    pub weight_decay: f32,
}

/// One AdamW update, elementwise over `params`, `grads`, `m` and `v` (all the same length); `step` is the
/// 1-based index of this update, used for the bias corrections:
///
/// `m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m / (1-b1^step);  vhat = v / (1-b2^step);`
/// `p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)`.
///
/// `m` and `v` are updated in place (start them at zero).
pub fn adamw_step(cfg: &AdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: u32) {
    assert!(step >= 1, "adamw_step: step is 1-based");
    assert_eq!(
        grads.len(),
        params.len(),
        "adamw_step: grads must have the length of params"
    );
    assert_eq!(m.len(), params.len(), "adamw_step: m must have the length of params");
    assert_eq!(v.len(), params.len(), "adamw_step: v must have the length of params");
    let AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    } = *cfg;
    let bc1 = 1.0 - beta1.powf(step as f32);
    let bc2 = 1.0 - beta2.powf(step as f32);
    for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = beta1 * *m + (1.0 - beta1) * g;
        *v = beta2 * *v + (1.0 - beta2) * g * g;
        let (mhat, vhat) = (*m / bc1, *v / bc2);
        *p -= lr * (mhat / (vhat.sqrt() + eps) + weight_decay * *p);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::assert_rel_close;
    use super::*;

    const CFG: AdamW = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    /// The update written out in f64, step by step.
    fn reference(params: &mut [f64], grads: &[f64], m: &mut [f64], v: &mut [f64], step: i32) {
        let (lr, b1, b2, eps, wd) = (
            f64::from(CFG.lr),
            f64::from(CFG.beta1),
            f64::from(CFG.beta2),
            f64::from(CFG.eps),
            f64::from(CFG.weight_decay),
        );
        for i in 0..params.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * grads[i];
            v[i] = b2 * v[i] + (1.0 - b2) * grads[i] * grads[i];
            let mhat = m[i] / (1.0 - b1.powi(step));
            let vhat = v[i] / (1.0 - b2.powi(step));
            params[i] -= lr * (mhat / (vhat.sqrt() + eps) + wd * params[i]);
        }
    }

    #[test]
    fn matches_formula_over_three_steps() {
        let mut p = vec![0.5f32, -1.25, 2.0, 0.0, 3.0];
        let grads = [
            [0.1f32, -0.2, 0.0, 1.5, -3.0],
            [0.3, 0.2, -0.1, 1.0, 0.5],
            [-0.05, 0.0, 0.4, -2.0, 0.25],
        ];
        let (mut m, mut v) = (vec![0.0f32; 5], vec![0.0f32; 5]);
        let mut p64: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
        let (mut m64, mut v64) = (vec![0.0f64; 5], vec![0.0f64; 5]);
        for (s, g) in grads.iter().enumerate() {
            adamw_step(&CFG, &mut p, g, &mut m, &mut v, s as u32 + 1);
            let g64: Vec<f64> = g.iter().map(|&x| f64::from(x)).collect();
            reference(&mut p64, &g64, &mut m64, &mut v64, s as i32 + 1);
            let got: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
            assert_rel_close(&format!("adamw params after step {}", s + 1), &got, &p64, 1e-6);
        }
    }

    #[test]
    fn first_step_by_hand() {
        // Step 1: mhat = g and vhat = g^2, so the update is lr * (g / (|g| + eps) + wd * p).
        let (mut p, mut m, mut v) = ([1.0f32, -2.0, 0.5], [0.0f32; 3], [0.0f32; 3]);
        adamw_step(&CFG, &mut p, &[0.5, -0.25, 0.0], &mut m, &mut v, 1);
        let want = [
            1.0 - 0.01 * (1.0 + 0.1),
            -2.0 - 0.01 * (-1.0 + 0.1 * -2.0),
            0.5 - 0.01 * (0.1 * 0.5),
        ];
        for (g, w) in p.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_rel_close("adamw m", &m.map(f64::from), &[0.05, -0.025, 0.0], 1e-6);
        assert_rel_close("adamw v", &v.map(f64::from), &[0.0125, 0.003125, 0.0], 1e-6);
    }

    #[test]
    fn deterministic() {
        let run = || {
            let (mut p, mut m, mut v) = (vec![0.3f32, -0.7, 1.1], vec![0.0f32; 3], vec![0.0f32; 3]);
            for step in 1..=4 {
                adamw_step(&CFG, &mut p, &[0.2, -0.1, 0.05], &mut m, &mut v, step);
            }
            p.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
