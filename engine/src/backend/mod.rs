//! The backend seam: memory, copies and the model's ops. The executor and layers are written
//! once against [`Backend`]; [`Cpu`] (bitwise deterministic, the reference) and [`Cuda`] (NVRTC kernels and
//! cuBLASLt, fp32 or bf16) implement it. Moving data between stages is the transport's job
//! ([`crate::comm::Transport`]), which calls [`Backend::transfer_pooled`] where both stages are in one process.

mod cpu;
mod cuda;
mod cuda_buf;
mod cuda_peer;
pub mod op_profile;
mod pool;
pub mod scratch;

pub use cpu::{Cpu, CpuBuf};
pub use cuda::Cuda;
pub use cuda_buf::{CudaBuf, CudaData, Precision, Storage};
pub use cuda_peer::CopyRoute;
pub use pool::{Home, Homed, PoolStats, Pooled, RecvPool};

use std::sync::Arc;

use baton_kernels::cpu::AdamW;

use crate::error::Result;

/// A device (or host) that stores `f32` buffers (on a mixed-precision device: buffers that upload and download as
/// `f32`, see [`Precision`]) and runs the model's ops on them, in order, on one queue. Every op that writes a
/// gradient **accumulates** (`+=`) into it, as in [`baton_kernels::cpu`]. Dimensions: `n` rows (= b·t tokens),
/// `c` channels, `oc` out channels, `nh` heads, `v` vocabulary.
pub trait Backend: Send + Sync + 'static {
    /// A buffer of `f32` on this backend.
    type Buf: Send + Sync + 'static;
    /// A buffer of token ids on this backend.
    type Tokens: Send + Sync + 'static;
    /// What a stage's [`RecvPool`] holds: the storage of a received activation or gradient.
    type Recv: Pooled;

    /// Short name for messages (`cpu`, `cuda:0`).
    fn name(&self) -> String;
    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` elements whose contents are unspecified, for an op that overwrites every element (the
    /// CPU hands out a reused scratch buffer without clearing it). By default [`Backend::zeros`].
    fn scratch(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// A buffer holding a copy of `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A parameter's weights holding `data`. In a mixed-precision backend: the fp32 master copy (what the
    /// optimizer updates and `download` returns) with the low-precision working copy the ops read.
    fn upload_param(&self, data: &[f32]) -> Result<Self::Buf> {
        self.upload(data)
    }
    /// A zero-filled optimizer-state buffer (AdamW moments): fp32 whatever the backend's precision.
    fn zeros_state(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// Bytes of one activation or gradient element as the model's ops store it (what a transfer moves).
    fn activation_elem_bytes(&self) -> usize {
        4
    }
    /// Bytes the buffer occupies on its device (4 per element for fp32 storage).
    fn bytes(&self, buf: &Self::Buf) -> usize {
        self.len(buf) * 4
    }
    /// The buffer's contents on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Token ids on this backend.
    fn upload_tokens(&self, tokens: &[u32]) -> Result<Self::Tokens>;
    /// Number of elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// A second buffer with the same contents.
    fn duplicate(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// One buffer holding `parts` end to end, in order (the batched weight gradients' inputs); the parts keep
    /// their contents. An error when `parts` is empty or mixes storage types.
    fn concat(&self, parts: &[&Self::Buf]) -> Result<Self::Buf>;
    /// Moves a buffer of this backend to `dst` (a peer copy between devices; a move on the CPU).
    fn transfer(&self, buf: Self::Buf, dst: &Self) -> Result<Self::Buf>;
    /// Copies `buf` to `dst` into a buffer leased from `pool` (the receiving stage's receive pool; it goes back
    /// there when dropped), then frees `buf`. What the executor uses between stages: no allocation once the pool
    /// holds the schedule's peak of live messages.
    fn transfer_pooled(&self, buf: Self::Buf, dst: &Self, pool: &Arc<RecvPool<Self::Recv>>) -> Result<Self::Buf>;
    /// Waits until every queued op has finished.
    fn synchronize(&self) -> Result<()>;
    /// A point on the backend's queue, for timing device work: a timing event on a GPU
    /// stream, an instant on the CPU.
    type Mark: Send + Sync + 'static;
    /// Marks the current end of the backend's queue (does not wait).
    fn mark(&self) -> Result<Self::Mark>;
    /// The device's measured bf16 matrix-product rate in TFLOP/s, the ceiling MFU is reported against; `None`
    /// where there is no such figure (the CPU). Takes a moment (times a large GEMM) and waits for the device.
    fn measure_peak_tflops(&self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// Makes the queue wait (on the device, not the host) until `buf` has been written, e.g. by a
    /// transfer on another queue: ops queued afterwards start only then. A no-op where every op has
    /// finished when it returns (the CPU). Ops order themselves on their operands anyway; the
    /// executor calls this right after receiving an input so the action's start mark, taken next,
    /// excludes the wait.
    fn await_ready(&self, _buf: &Self::Buf) -> Result<()> {
        Ok(())
    }
    /// Marks the current end of the queue that incoming transfers run on (a GPU stage's copy stream; the same
    /// queue as [`Backend::mark`] where there is one queue).
    fn copy_mark(&self) -> Result<Self::Mark> {
        self.mark()
    }
    /// Seconds from `from` to `to` on this backend's queue (may wait until `to` is reached).
    fn seconds_between(&self, from: &Self::Mark, to: &Self::Mark) -> Result<f64>;
    /// True when marks of `self` and `other` share one clock (same device), so a span may start
    /// on one queue and end on the other.
    fn shares_clock_with(&self, _other: &Self) -> bool {
        true
    }
    /// True when this backend's ops may read and write `other`'s buffers in place, without a copy or any
    /// ordering between their queues (one address space and no queues: the CPU). A collective between two
    /// stages then sums and copies their buffers directly.
    fn reads_buffers_of(&self, _other: &Self) -> bool {
        false
    }
    /// True when reading a value back to the host costs no synchronisation (the CPU). The
    /// executor checks every activation and gradient it sends for non-finite values only on such
    /// backends; on a device it would stall the queue once per action.
    fn host_reads_are_free(&self) -> bool {
        false
    }

    /// Called on a stage's thread when it starts running stage `stage`: a backend whose compute threads are
    /// shared by the process may give the stage its own (the CPU with stage pools on). Default: nothing.
    fn bind_stage(&self, _stage: usize) {}

    /// `buf = 0`.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// `dst = src`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `buf *= alpha`.
    fn scale(&self, buf: &mut Self::Buf, alpha: f32) -> Result<()>;
    /// Sum of squares in `f64`, in a fixed order (deterministic).
    fn sum_squares(&self, buf: &Self::Buf) -> Result<f64>;
    /// [`Backend::sum_squares`] of each buffer, bitwise the same, in one read-back where the backend can (a
    /// device queues every reduction and waits once).
    fn sum_squares_many(&self, bufs: &[&Self::Buf]) -> Result<Vec<f64>> {
        bufs.iter().map(|b| self.sum_squares(b)).collect()
    }
    /// Sum in `f64`, in a fixed order; `Err` never hides a NaN (it is returned as the sum).
    fn sum(&self, buf: &Self::Buf) -> Result<f64>;

    /// `out (b,t,c) = wte[tokens] + wpe[t]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::Tokens,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// `dwte[tokens] += dout`, `dwpe[t] += dout`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        tokens: &Self::Tokens,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// Layer norm over rows of width `c`, stashing `mean` and `rstd` (n each).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// `dinp += ∂L/∂inp`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_input(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// `dinp = dres + ∂L/∂inp`, **overwriting** `dinp`: the gradient of a residual stream `x` whose branch
    /// starts with this layer norm of `x`. Bitwise a copy of `dres` then [`Backend::layernorm_backward_input`]
    /// (the default); a backend may copy each row while it is in cache.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_input_residual(
        &self,
        dinp: &mut Self::Buf,
        dres: &Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.copy(dinp, dres)?;
        self.layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, n, c)
    }
    /// `dweight += ∂L/∂weight`, `dbias += ∂L/∂bias`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_weight(
        &self,
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// `sum = a + b`, then the layer norm of `sum` into `out`, `mean`, `rstd` (`sum`, `out`, `a`, `b` (N, C)): a
    /// residual add and the layer norm after it. A backend may fuse them (one pass over each row, bitwise the two
    /// ops); by default the two ops.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.residual_forward(sum, a, b)?;
        self.layernorm_forward(out, mean, rstd, sum, weight, bias, n, c)
    }
    /// `out (n,oc) = inp (n,c) · weight(oc,c)ᵀ + bias`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// `out = gelu(inp · weightᵀ + bias)`, keeping the GELU's input in `pre` (both `(n, oc)`, overwritten): an
    /// MLP up-projection. A backend may fuse the GELU into the product; by default the two ops.
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_forward(
        &self,
        out: &mut Self::Buf,
        pre: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        unfused::matmul_gelu_forward(self, out, pre, inp, weight, bias, n, c, oc)
    }
    /// `dinp = gelu'(pre) ∘ (dout · weight)`, **overwriting** `dinp` `(n, c)`, where `pre` `(n, c)` is the GELU
    /// input whose output this product consumed: the input gradient of an MLP down-projection taken through its
    /// GELU. A backend may fuse the GELU backward into the product; by default the two ops.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_input_gelu(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        weight: &Self::Buf,
        pre: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        unfused::matmul_backward_input_gelu(self, dinp, dout, weight, pre, n, c, oc)
    }
    /// `dinp += dout · weight`.
    fn matmul_backward_input(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// `dinp = dout · weight`, **overwriting** `dinp` (a [`Backend::scratch`] buffer will do). By default a
    /// zero fill then [`Backend::matmul_backward_input`]; a backend may skip the fill (the same values, but for
    /// the sign of an exact zero).
    fn matmul_backward_input_overwrite(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        self.fill_zero(dinp)?;
        self.matmul_backward_input(dinp, dout, weight, n, c, oc)
    }
    /// `dweight += doutᵀ · inp`, `dbias += Σ rows of dout`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight(
        &self,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// Elements of the stash [`Backend::attention_forward`] writes for [`Backend::attention_backward`]: by
    /// default the attention matrix `(b, nh, t, t)`; a fused (flash) kernel keeps only per-row statistics.
    fn attention_stash_len(&self, b: usize, t: usize, _c: usize, nh: usize) -> usize {
        b * nh * t * t
    }
    /// Causal multi-head attention: `qkv (b,t,3c)` → `out (b,t,c)`, writing the stash `att`
    /// ([`Backend::attention_stash_len`] elements).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        att: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;
    /// `dqkv += ∂L/∂qkv`, given the forward's input `qkv`, output `out` and stash `att`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        att: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;
    /// `dqkv = ∂L/∂qkv`, **overwriting** `dqkv`. Bitwise a zero fill then [`Backend::attention_backward`] (the
    /// default); a backend may zero each part just before it accumulates into it.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_overwrite(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        att: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        self.fill_zero(dqkv)?;
        self.attention_backward(dqkv, dout, qkv, out, att, b, t, c, nh)
    }
    /// GELU (tanh form).
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// `dinp += gelu'(inp) · dout`.
    fn gelu_backward(&self, dinp: &mut Self::Buf, inp: &Self::Buf, dout: &Self::Buf) -> Result<()>;
    /// `out = a + b` (residual).
    fn residual_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// Per-row cross-entropy of `softmax(logits)` against `targets`.
    fn cross_entropy_forward(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Tokens,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// `dlogits += scale · (softmax(logits) − onehot(targets))`.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Tokens,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// `dlogits = scale · (softmax(logits) − onehot(targets))`, **overwriting** `dlogits`. Bitwise a zero fill
    /// then [`Backend::cross_entropy_backward`] (the default); a backend may zero each row as it reaches it.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward_overwrite(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Tokens,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        self.fill_zero(dlogits)?;
        self.cross_entropy_backward(dlogits, logits, targets, scale, n, v)
    }
    /// The optimizer's whole work on one parameter: `grads *= clip_scale` (when given), one AdamW step, then
    /// `grads = 0`. By default those three ops; a backend may fuse them into one pass (bitwise the same).
    #[allow(clippy::too_many_arguments)]
    fn optimizer_step(
        &self,
        cfg: &AdamW,
        params: &mut Self::Buf,
        grads: &mut Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: u32,
        clip_scale: Option<f32>,
    ) -> Result<()> {
        if let Some(scale) = clip_scale {
            self.scale(grads, scale)?;
        }
        self.adamw(cfg, params, grads, m, v, step)?;
        self.fill_zero(grads)
    }
    /// One AdamW step (1-based `step`) on `params` with moments `m`, `v`.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        cfg: &AdamW,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: u32,
    ) -> Result<()>;
}

/// The unfused forms of the composite ops: the trait's defaults, and what a backend falls back to when its fused
/// path is unavailable.
pub(crate) mod unfused {
    use super::Backend;
    use crate::error::Result;

    /// [`Backend::matmul_gelu_forward`] as a product then a GELU.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_gelu_forward<B: Backend + ?Sized>(
        be: &B,
        out: &mut B::Buf,
        pre: &mut B::Buf,
        inp: &B::Buf,
        weight: &B::Buf,
        bias: Option<&B::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        be.matmul_forward(pre, inp, weight, bias, n, c, oc)?;
        be.gelu_forward(out, pre)
    }

    /// [`Backend::matmul_backward_input_gelu`] as a product into a fresh buffer then a GELU backward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_backward_input_gelu<B: Backend + ?Sized>(
        be: &B,
        dinp: &mut B::Buf,
        dout: &B::Buf,
        weight: &B::Buf,
        pre: &B::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let mut dact = be.zeros(n * c)?;
        be.matmul_backward_input(&mut dact, dout, weight, n, c, oc)?;
        be.fill_zero(dinp)?;
        be.gelu_backward(dinp, pre, &dact)
    }
}
