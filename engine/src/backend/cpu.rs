//! The CPU backend: `Vec<f32>` buffers (possibly lent by a stage's receive pool) and the fast ops of
//! `baton_kernels::fast` — the reference maths of `baton_kernels::cpu` on one process-wide thread pool
//! (`baton_kernels::fast::set_threads`), vectorised, cut into work by shape only.
//! Synchronous (every op has finished when it returns) and bitwise deterministic for any thread count.

use baton_kernels::cpu as k;
use baton_kernels::fast as f;

use std::sync::Arc;

use super::op_profile::Timer;
use super::pool::{Homed, Pooled, RecvPool};
use super::Backend;
use crate::error::{EngineError, Result};

/// A CPU buffer: a `Vec<f32>`, which goes back to its receive pool when dropped if it came from one.
pub type CpuBuf = Homed<Vec<f32>>;

/// The CPU backend. Cheap to clone; stateless.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu;

fn check(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::Backend {
            backend: "cpu".into(),
            op,
            reason: format!("{what} holds {got} elements, expected {want}"),
            source: None,
        })
    }
}

/// The cross-entropy's shapes (`out` is `losses` or `dlogits`, of `out_len` elements) and its targets: every one
/// inside the vocabulary of `v` (the fast op would otherwise panic).
fn check_cross_entropy(
    op: &'static str,
    out: (&str, usize, usize),
    logits: usize,
    targets: &[u32],
    n: usize,
    v: usize,
) -> Result<()> {
    check(op, out.0, out.1, out.2)?;
    check(op, "logits", logits, n * v)?;
    check(op, "targets", targets.len(), n)?;
    match targets.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        Some((row, &t)) => Err(EngineError::Backend {
            backend: "cpu".into(),
            op,
            reason: format!("target {t} of row {row} is out of the vocabulary ({v})"),
            source: None,
        }),
        None => Ok(()),
    }
}

/// The layer norm input gradient's shapes (both the accumulating and the residual form).
#[allow(clippy::too_many_arguments)]
fn check_layernorm_backward_input(
    op: &'static str,
    dinp: &CpuBuf,
    dout: &CpuBuf,
    inp: &CpuBuf,
    weight: &CpuBuf,
    mean: &CpuBuf,
    rstd: &CpuBuf,
    (n, c): (usize, usize),
) -> Result<()> {
    for (name, len, want) in [
        ("dinp", dinp.len(), n * c),
        ("dout", dout.len(), n * c),
        ("inp", inp.len(), n * c),
        ("weight", weight.len(), c),
        ("mean", mean.len(), n),
        ("rstd", rstd.len(), n),
    ] {
        check(op, name, len, want)?;
    }
    Ok(())
}

/// The input-gradient product's shapes (both the accumulating and the overwriting form).
fn check_matmul_backward_input(
    op: &'static str,
    dinp: &CpuBuf,
    dout: &CpuBuf,
    weight: &CpuBuf,
    (n, c, oc): (usize, usize, usize),
) -> Result<()> {
    check(op, "dout", dout.len(), n * oc)?;
    check(op, "weight", weight.len(), oc * c)?;
    check(op, "dinp", dinp.len(), n * c)
}

/// The attention backward's shapes.
#[allow(clippy::too_many_arguments)]
fn check_attention_backward(
    op: &'static str,
    dqkv: &CpuBuf,
    dout: &CpuBuf,
    qkv: &CpuBuf,
    out: &CpuBuf,
    att: &CpuBuf,
    (b, t, c, nh): (usize, usize, usize, usize),
) -> Result<()> {
    check(op, "dout", dout.len(), b * t * c)?;
    check(op, "out", out.len(), b * t * c)?;
    check(op, "stash", att.len(), f::flash::stash_len(b, t, nh))?;
    check(op, "dqkv", dqkv.len(), b * t * 3 * c)?;
    check(op, "qkv", qkv.len(), b * t * 3 * c)
}

impl Backend for Cpu {
    type Buf = CpuBuf;
    type Recv = Vec<f32>;
    type Tokens = Vec<u32>;

    fn name(&self) -> String {
        "cpu".into()
    }
    fn zeros(&self, len: usize) -> Result<CpuBuf> {
        let _time = Timer::start("zeros");
        let mut buf = super::scratch::scratch().take(len);
        f::ops::fill(&mut buf, 0.0);
        Ok(buf)
    }
    fn scratch(&self, len: usize) -> Result<CpuBuf> {
        Ok(super::scratch::scratch().take(len))
    }
    fn upload(&self, data: &[f32]) -> Result<CpuBuf> {
        let _time = Timer::start("upload");
        let mut buf = super::scratch::scratch().take(data.len());
        f::ops::copy(&mut buf, data);
        Ok(buf)
    }
    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn upload_tokens(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(tokens.to_vec())
    }
    fn len(&self, buf: &CpuBuf) -> usize {
        buf.len()
    }
    fn duplicate(&self, buf: &CpuBuf) -> Result<CpuBuf> {
        let _time = Timer::start("duplicate");
        self.upload(buf)
    }
    fn concat(&self, parts: &[&CpuBuf]) -> Result<CpuBuf> {
        let _time = Timer::start("concat");
        if parts.is_empty() {
            return Err(EngineError::backend("cpu", "concat", "no parts to concatenate"));
        }
        let mut out = super::scratch::scratch().take(parts.iter().map(|p| p.len()).sum());
        let mut at = 0;
        for part in parts {
            f::ops::copy(&mut out[at..at + part.len()], part);
            at += part.len();
        }
        Ok(out)
    }
    fn transfer(&self, buf: CpuBuf, _dst: &Self) -> Result<CpuBuf> {
        Ok(buf)
    }
    fn transfer_pooled(&self, buf: CpuBuf, _dst: &Self, pool: &Arc<RecvPool<Vec<f32>>>) -> Result<CpuBuf> {
        let _time = Timer::start("transfer_pooled");
        // A copy into the receiving stage's buffer, as on a device (a move would make the pool pointless here and
        // leave its sizing untested); bitwise exact.
        let mut out = pool.lease(buf.key(), || Ok::<_, EngineError>(vec![0.0; buf.len()]))?;
        f::ops::copy(&mut out, &buf);
        Ok(out)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn host_reads_are_free(&self) -> bool {
        true
    }
    fn reads_buffers_of(&self, _other: &Self) -> bool {
        true
    }
    fn bind_stage(&self, stage: usize) {
        baton_kernels::fast::bind_stage(stage);
    }
    type Mark = std::time::Instant;
    fn mark(&self) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }
    fn seconds_between(&self, from: &std::time::Instant, to: &std::time::Instant) -> Result<f64> {
        Ok(to.saturating_duration_since(*from).as_secs_f64())
    }
    fn fill_zero(&self, buf: &mut CpuBuf) -> Result<()> {
        let _time = Timer::start("fill_zero");
        f::ops::fill(buf, 0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut CpuBuf, src: &CpuBuf) -> Result<()> {
        let _time = Timer::start("copy");
        check("copy", "src", src.len(), dst.len())?;
        f::ops::copy(dst, src);
        Ok(())
    }
    fn add_assign(&self, dst: &mut CpuBuf, src: &CpuBuf) -> Result<()> {
        let _time = Timer::start("add_assign");
        check("add_assign", "src", src.len(), dst.len())?;
        f::ops::add_assign(dst, src);
        Ok(())
    }
    fn scale(&self, buf: &mut CpuBuf, alpha: f32) -> Result<()> {
        let _time = Timer::start("scale");
        f::ops::scale(buf, alpha);
        Ok(())
    }
    fn sum_squares(&self, buf: &CpuBuf) -> Result<f64> {
        let _time = Timer::start("sum_squares");
        Ok(f::ops::sum_squares(buf))
    }
    fn sum(&self, buf: &CpuBuf) -> Result<f64> {
        let _time = Timer::start("sum");
        Ok(buf.iter().map(|&x| f64::from(x)).sum())
    }

    fn embedding_forward(
        &self,
        out: &mut CpuBuf,
        tokens: &Vec<u32>,
        wte: &CpuBuf,
        wpe: &CpuBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let _time = Timer::start("embedding_forward");
        check("embedding_forward", "out", out.len(), b * t * c)?;
        check("embedding_forward", "tokens", tokens.len(), b * t)?;
        f::ops::embedding_forward(out, tokens, wte, wpe, b, t, c);
        Ok(())
    }
    fn embedding_backward(
        &self,
        dwte: &mut CpuBuf,
        dwpe: &mut CpuBuf,
        dout: &CpuBuf,
        tokens: &Vec<u32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let _time = Timer::start("embedding_backward");
        check("embedding_backward", "dout", dout.len(), b * t * c)?;
        k::embedding_backward(dwte, dwpe, dout, tokens, b, t, c);
        Ok(())
    }
    fn layernorm_forward(
        &self,
        out: &mut CpuBuf,
        mean: &mut CpuBuf,
        rstd: &mut CpuBuf,
        inp: &CpuBuf,
        weight: &CpuBuf,
        bias: &CpuBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let _time = Timer::start("layernorm_forward");
        check("layernorm_forward", "inp", inp.len(), n * c)?;
        f::ops::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c);
        Ok(())
    }
    fn residual_layernorm_forward(
        &self,
        sum: &mut CpuBuf,
        out: &mut CpuBuf,
        mean: &mut CpuBuf,
        rstd: &mut CpuBuf,
        a: &CpuBuf,
        b: &CpuBuf,
        weight: &CpuBuf,
        bias: &CpuBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let _time = Timer::start("residual_layernorm_forward");
        check("residual_layernorm_forward", "a", a.len(), n * c)?;
        check("residual_layernorm_forward", "b", b.len(), n * c)?;
        check("residual_layernorm_forward", "sum", sum.len(), n * c)?;
        check("residual_layernorm_forward", "out", out.len(), n * c)?;
        f::ops::residual_layernorm_forward(sum, out, mean, rstd, a, b, weight, bias, n, c);
        Ok(())
    }
    fn layernorm_backward_input(
        &self,
        dinp: &mut CpuBuf,
        dout: &CpuBuf,
        inp: &CpuBuf,
        weight: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_input";
        let _time = Timer::start(op);
        check_layernorm_backward_input(op, dinp, dout, inp, weight, mean, rstd, (n, c))?;
        f::ops::layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, n, c);
        Ok(())
    }
    fn layernorm_backward_input_residual(
        &self,
        dinp: &mut CpuBuf,
        dres: &CpuBuf,
        dout: &CpuBuf,
        inp: &CpuBuf,
        weight: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_input_residual";
        let _time = Timer::start(op);
        check(op, "dres", dres.len(), n * c)?;
        check_layernorm_backward_input(op, dinp, dout, inp, weight, mean, rstd, (n, c))?;
        f::ops::layernorm_backward_input_residual(dinp, dres, dout, inp, weight, mean, rstd, n, c);
        Ok(())
    }
    fn layernorm_backward_weight(
        &self,
        dweight: &mut CpuBuf,
        dbias: &mut CpuBuf,
        dout: &CpuBuf,
        inp: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let _time = Timer::start("layernorm_backward_weight");
        check("layernorm_backward_weight", "dout", dout.len(), n * c)?;
        f::ops::layernorm_backward_weight(dweight, dbias, dout, inp, mean, rstd, n, c);
        Ok(())
    }
    fn matmul_forward(
        &self,
        out: &mut CpuBuf,
        inp: &CpuBuf,
        weight: &CpuBuf,
        bias: Option<&CpuBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let _time = Timer::start("matmul_forward");
        check("matmul_forward", "inp", inp.len(), n * c)?;
        check("matmul_forward", "weight", weight.len(), oc * c)?;
        f::gemm::matmul_forward(out, inp, weight, bias.map(|b| b.as_slice()), n, c, oc);
        Ok(())
    }
    fn matmul_backward_input(
        &self,
        dinp: &mut CpuBuf,
        dout: &CpuBuf,
        weight: &CpuBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_input";
        let _time = Timer::start(op);
        check_matmul_backward_input(op, dinp, dout, weight, (n, c, oc))?;
        f::gemm::matmul_backward_input(dinp, dout, weight, n, c, oc);
        Ok(())
    }
    fn matmul_backward_input_overwrite(
        &self,
        dinp: &mut CpuBuf,
        dout: &CpuBuf,
        weight: &CpuBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_input_overwrite";
        let _time = Timer::start(op);
        check_matmul_backward_input(op, dinp, dout, weight, (n, c, oc))?;
        f::gemm::matmul_backward_input_overwrite(dinp, dout, weight, n, c, oc);
        Ok(())
    }
    fn matmul_backward_weight(
        &self,
        dweight: &mut CpuBuf,
        dbias: Option<&mut CpuBuf>,
        dout: &CpuBuf,
        inp: &CpuBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let _time = Timer::start("matmul_backward_weight");
        check("matmul_backward_weight", "dout", dout.len(), n * oc)?;
        f::gemm::matmul_backward_weight(dweight, dbias.map(|b| b.as_mut_slice()), dout, inp, n, c, oc);
        Ok(())
    }
    fn matmul_gelu_forward(
        &self,
        out: &mut CpuBuf,
        pre: &mut CpuBuf,
        inp: &CpuBuf,
        weight: &CpuBuf,
        bias: Option<&CpuBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let _time = Timer::start("matmul_gelu_forward");
        check("matmul_gelu_forward", "inp", inp.len(), n * c)?;
        check("matmul_gelu_forward", "weight", weight.len(), oc * c)?;
        check("matmul_gelu_forward", "pre", pre.len(), n * oc)?;
        check("matmul_gelu_forward", "out", out.len(), n * oc)?;
        f::gemm::matmul_gelu_forward(out, pre, inp, weight, bias.map(|b| b.as_slice()), n, c, oc);
        Ok(())
    }
    fn matmul_backward_input_gelu(
        &self,
        dinp: &mut CpuBuf,
        dout: &CpuBuf,
        weight: &CpuBuf,
        pre: &CpuBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let _time = Timer::start("matmul_backward_input_gelu");
        check("matmul_backward_input_gelu", "dout", dout.len(), n * oc)?;
        check("matmul_backward_input_gelu", "weight", weight.len(), oc * c)?;
        check("matmul_backward_input_gelu", "pre", pre.len(), n * c)?;
        check("matmul_backward_input_gelu", "dinp", dinp.len(), n * c)?;
        f::gemm::matmul_backward_input_gelu(dinp, dout, weight, pre, n, c, oc);
        Ok(())
    }
    fn attention_stash_len(&self, b: usize, t: usize, _c: usize, nh: usize) -> usize {
        // The fused (flash) attention keeps one log-sum-exp per row, not the probabilities.
        f::flash::stash_len(b, t, nh)
    }
    fn attention_forward(
        &self,
        out: &mut CpuBuf,
        att: &mut CpuBuf,
        qkv: &CpuBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let _time = Timer::start("attention_forward");
        check("attention_forward", "qkv", qkv.len(), b * t * 3 * c)?;
        check("attention_forward", "out", out.len(), b * t * c)?;
        check("attention_forward", "stash", att.len(), f::flash::stash_len(b, t, nh))?;
        f::flash::attention_forward(out, att, qkv, b, t, c, nh);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut CpuBuf,
        dout: &CpuBuf,
        qkv: &CpuBuf,
        out: &CpuBuf,
        att: &CpuBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward";
        let _time = Timer::start(op);
        check_attention_backward(op, dqkv, dout, qkv, out, att, (b, t, c, nh))?;
        f::flash::attention_backward(dqkv, dout, qkv, out, att, b, t, c, nh);
        Ok(())
    }
    fn attention_backward_overwrite(
        &self,
        dqkv: &mut CpuBuf,
        dout: &CpuBuf,
        qkv: &CpuBuf,
        out: &CpuBuf,
        att: &CpuBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward_overwrite";
        let _time = Timer::start(op);
        check_attention_backward(op, dqkv, dout, qkv, out, att, (b, t, c, nh))?;
        f::flash::attention_backward_overwrite(dqkv, dout, qkv, out, att, b, t, c, nh);
        Ok(())
    }
    fn gelu_forward(&self, out: &mut CpuBuf, inp: &CpuBuf) -> Result<()> {
        let _time = Timer::start("gelu_forward");
        check("gelu_forward", "inp", inp.len(), out.len())?;
        f::gelu::gelu_forward(out, inp);
        Ok(())
    }
    fn gelu_backward(&self, dinp: &mut CpuBuf, inp: &CpuBuf, dout: &CpuBuf) -> Result<()> {
        let _time = Timer::start("gelu_backward");
        check("gelu_backward", "dout", dout.len(), dinp.len())?;
        f::gelu::gelu_backward(dinp, inp, dout);
        Ok(())
    }
    fn residual_forward(&self, out: &mut CpuBuf, a: &CpuBuf, b: &CpuBuf) -> Result<()> {
        let _time = Timer::start("residual_forward");
        check("residual_forward", "a", a.len(), out.len())?;
        f::ops::residual_forward(out, a, b);
        Ok(())
    }
    fn cross_entropy_forward(
        &self,
        losses: &mut CpuBuf,
        logits: &CpuBuf,
        targets: &Vec<u32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let op = "cross_entropy_forward";
        let _time = Timer::start(op);
        check_cross_entropy(op, ("losses", losses.len(), n), logits.len(), targets, n, v)?;
        f::ops::cross_entropy_forward(losses, logits, targets, n, v);
        Ok(())
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut CpuBuf,
        logits: &CpuBuf,
        targets: &Vec<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let op = "cross_entropy_backward";
        let _time = Timer::start(op);
        check_cross_entropy(op, ("dlogits", dlogits.len(), n * v), logits.len(), targets, n, v)?;
        f::ops::cross_entropy_backward(dlogits, logits, targets, scale, n, v);
        Ok(())
    }
    fn cross_entropy_backward_overwrite(
        &self,
        dlogits: &mut CpuBuf,
        logits: &CpuBuf,
        targets: &Vec<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let op = "cross_entropy_backward_overwrite";
        let _time = Timer::start(op);
        check_cross_entropy(op, ("dlogits", dlogits.len(), n * v), logits.len(), targets, n, v)?;
        f::ops::cross_entropy_backward_overwrite(dlogits, logits, targets, scale, n, v);
        Ok(())
    }
    fn optimizer_step(
        &self,
        cfg: &k::AdamW,
        params: &mut CpuBuf,
        grads: &mut CpuBuf,
        m: &mut CpuBuf,
        v: &mut CpuBuf,
        step: u32,
        clip_scale: Option<f32>,
    ) -> Result<()> {
        let _time = Timer::start("optimizer_step");
        check("optimizer_step", "grads", grads.len(), params.len())?;
        check("optimizer_step", "m", m.len(), params.len())?;
        check("optimizer_step", "v", v.len(), params.len())?;
        f::ops::adamw_fused(cfg, params, grads, m, v, step, clip_scale);
        Ok(())
    }
    fn adamw(
        &self,
        cfg: &k::AdamW,
        params: &mut CpuBuf,
        grads: &CpuBuf,
        m: &mut CpuBuf,
        v: &mut CpuBuf,
        step: u32,
    ) -> Result<()> {
        let _time = Timer::start("adamw");
        check("adamw", "grads", grads.len(), params.len())?;
        f::ops::adamw(cfg, params, grads, m, v, step);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `concat` lays the parts end to end, leaves them as they were, and refuses an empty list.
    #[test]
    fn concat_joins_the_parts_in_order() {
        let be = Cpu;
        let (a, b, c) = (
            be.upload(&[1.0, 2.0]).unwrap(),
            be.upload(&[]).unwrap(),
            be.upload(&[3.0, f32::NAN, -0.0]).unwrap(),
        );
        let joined = be.download(&be.concat(&[&a, &b, &c]).unwrap()).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&joined), bits(&[1.0, 2.0, 3.0, f32::NAN, -0.0]));
        assert_eq!(be.download(&a).unwrap(), vec![1.0, 2.0]);
        let e = be.concat(&[]).unwrap_err().to_string();
        assert!(e.contains("concat") && e.contains("no parts"), "{e}");
    }

    /// Bad shapes and targets come back as errors naming the op and the value, never as a panic in a kernel.
    #[test]
    fn bad_targets_and_shapes_are_errors_naming_the_op() {
        let be = Cpu;
        let (n, v) = (3, 5);
        let logits = be.upload(&[0.5; 15]).expect("upload");
        let mut dlogits = be.zeros(n * v).expect("zeros");
        let mut losses = be.zeros(n).expect("zeros");
        let bad = vec![1u32, 5, 2];
        for err in [
            be.cross_entropy_forward(&mut losses, &logits, &bad, n, v).unwrap_err(),
            be.cross_entropy_backward(&mut dlogits, &logits, &bad, 1.0, n, v)
                .unwrap_err(),
            be.cross_entropy_backward_overwrite(&mut dlogits, &logits, &bad, 1.0, n, v)
                .unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(
                text.contains("cross_entropy") && text.contains("target 5 of row 1"),
                "{text}"
            );
        }
        let good = vec![1u32, 4, 2];
        be.cross_entropy_backward_overwrite(&mut dlogits, &logits, &good, 1.0, n, v)
            .expect("valid targets");
        let short = be.zeros(n * v - 1).expect("zeros");
        let err = be
            .cross_entropy_backward(&mut dlogits, &short, &good, 1.0, n, v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("logits holds 14 elements, expected 15"), "{err}");

        let (b, t, c, nh) = (1, 4, 8, 2);
        let (dout, out) = (be.zeros(b * t * c).expect("zeros"), be.zeros(b * t * c).expect("zeros"));
        let att = be.zeros(f::flash::stash_len(b, t, nh)).expect("zeros");
        let (mut dqkv, qkv_short) = (
            be.zeros(b * t * 3 * c).expect("zeros"),
            be.zeros(b * t * 3 * c - 1).expect("zeros"),
        );
        // The plain forms check every operand too, as their overwriting twins do.
        let (n2, c2) = (4, 8);
        let (mut dinp, rows) = (be.zeros(n2 * c2).expect("zeros"), be.zeros(n2 * c2).expect("zeros"));
        let (w_short, stats) = (be.zeros(c2 - 1).expect("zeros"), be.zeros(n2).expect("zeros"));
        let err = be
            .layernorm_backward_input(&mut dinp, &rows, &rows, &w_short, &stats, &stats, n2, c2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layernorm_backward_input") && err.contains("weight holds 7 elements, expected 8"),
            "{err}"
        );
        let err = be
            .matmul_backward_input(&mut dinp, &rows, &w_short, n2, c2, c2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matmul_backward_input") && err.contains("weight holds 7 elements, expected 64"),
            "{err}"
        );
        for err in [
            be.attention_backward(&mut dqkv, &dout, &qkv_short, &out, &att, b, t, c, nh)
                .unwrap_err(),
            be.attention_backward_overwrite(&mut dqkv, &dout, &qkv_short, &out, &att, b, t, c, nh)
                .unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(
                text.contains("attention_backward") && text.contains("qkv holds 95 elements, expected 96"),
                "{text}"
            );
        }
    }
}
