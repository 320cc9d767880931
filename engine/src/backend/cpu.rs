//! The CPU backend: `Vec<f32>` buffers and the reference ops of `baton_kernels::cpu`.
//! Synchronous (every op has finished when it returns) and bitwise deterministic.

use baton_kernels::cpu as k;

use super::Backend;
use crate::error::{EngineError, Result};

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
        })
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Tokens = Vec<u32>;

    fn name(&self) -> String {
        "cpu".into()
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn upload_tokens(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(tokens.to_vec())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn duplicate(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn transfer(&self, buf: Vec<f32>, _dst: &Self) -> Result<Vec<f32>> {
        Ok(buf)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn host_reads_are_free(&self) -> bool {
        true
    }
    type Mark = std::time::Instant;
    fn mark(&self) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }
    fn seconds_between(&self, from: &std::time::Instant, to: &std::time::Instant) -> Result<f64> {
        Ok(to.saturating_duration_since(*from).as_secs_f64())
    }
    fn fill_zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        check("copy", "src", src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        check("add_assign", "src", src.len(), dst.len())?;
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        Ok(())
    }
    fn scale(&self, buf: &mut Vec<f32>, alpha: f32) -> Result<()> {
        buf.iter_mut().for_each(|x| *x *= alpha);
        Ok(())
    }
    fn sum_squares(&self, buf: &Vec<f32>) -> Result<f64> {
        Ok(buf.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
    }
    fn sum(&self, buf: &Vec<f32>) -> Result<f64> {
        Ok(buf.iter().map(|&x| f64::from(x)).sum())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        tokens: &Vec<u32>,
        wte: &Vec<f32>,
        wpe: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        check("embedding_forward", "out", out.len(), b * t * c)?;
        check("embedding_forward", "tokens", tokens.len(), b * t)?;
        k::embedding_forward(out, tokens, wte, wpe, b, t, c);
        Ok(())
    }
    fn embedding_backward(
        &self,
        dwte: &mut Vec<f32>,
        dwpe: &mut Vec<f32>,
        dout: &Vec<f32>,
        tokens: &Vec<u32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        check("embedding_backward", "dout", dout.len(), b * t * c)?;
        k::embedding_backward(dwte, dwpe, dout, tokens, b, t, c);
        Ok(())
    }
    fn layernorm_forward(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        check("layernorm_forward", "inp", inp.len(), n * c)?;
        k::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c);
        Ok(())
    }
    fn layernorm_backward_input(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        check("layernorm_backward_input", "dout", dout.len(), n * c)?;
        k::layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, n, c);
        Ok(())
    }
    fn layernorm_backward_weight(
        &self,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        check("layernorm_backward_weight", "dout", dout.len(), n * c)?;
        k::layernorm_backward_weight(dweight, dbias, dout, inp, mean, rstd, n, c);
        Ok(())
    }
    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        check("matmul_forward", "inp", inp.len(), n * c)?;
        check("matmul_forward", "weight", weight.len(), oc * c)?;
        k::matmul_forward(out, inp, weight, bias.map(Vec::as_slice), n, c, oc);
        Ok(())
    }
    fn matmul_backward_input(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        check("matmul_backward_input", "dout", dout.len(), n * oc)?;
        k::matmul_backward_input(dinp, dout, weight, n, c, oc);
        Ok(())
    }
    fn matmul_backward_weight(
        &self,
        dweight: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        check("matmul_backward_weight", "dout", dout.len(), n * oc)?;
        k::matmul_backward_weight(dweight, dbias.map(Vec::as_mut_slice), dout, inp, n, c, oc);
        Ok(())
    }
    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        att: &mut Vec<f32>,
        qkv: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        check("attention_forward", "qkv", qkv.len(), b * t * 3 * c)?;
        k::attention_forward(out, att, qkv, b, t, c, nh);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        att: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        check("attention_backward", "dout", dout.len(), b * t * c)?;
        k::attention_backward(dqkv, dout, qkv, att, b, t, c, nh);
        Ok(())
    }
    fn gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> Result<()> {
        check("gelu_forward", "inp", inp.len(), out.len())?;
        k::gelu_forward(out, inp);
        Ok(())
    }
    fn gelu_backward(&self, dinp: &mut Vec<f32>, inp: &Vec<f32>, dout: &Vec<f32>) -> Result<()> {
        check("gelu_backward", "dout", dout.len(), dinp.len())?;
        k::gelu_backward(dinp, inp, dout);
        Ok(())
    }
    fn residual_forward(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> Result<()> {
        check("residual_forward", "a", a.len(), out.len())?;
        k::residual_forward(out, a, b);
        Ok(())
    }
    fn cross_entropy_forward(
        &self,
        losses: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        check("cross_entropy_forward", "logits", logits.len(), n * v)?;
        k::softmax_cross_entropy_forward(losses, logits, targets, n, v);
        Ok(())
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        check("cross_entropy_backward", "logits", logits.len(), n * v)?;
        let dlosses = vec![scale; n];
        k::softmax_cross_entropy_backward(dlogits, logits, targets, &dlosses, n, v);
        Ok(())
    }
    fn adamw(
        &self,
        cfg: &k::AdamW,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        step: u32,
    ) -> Result<()> {
        check("adamw", "grads", grads.len(), params.len())?;
        k::adamw_step(cfg, params, grads, m, v, step);
        Ok(())
    }
}
