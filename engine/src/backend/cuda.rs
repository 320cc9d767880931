//! The CUDA backend: `CudaSlice<f32>` buffers on one device and one stream, the fp32 kernels of
//! `baton_kernels::cuda`, and fp32 cuBLAS for the matrix products (the simple attention path: permute, strided
//! batched GEMM, causal softmax, GEMM, unpermute). Mixed precision comes later.
//!
//! Ops are queued on the backend's stream in call order and return before they finish; `download`, `sum`,
//! `sum_squares` and `synchronize` wait. Buffers carry cudarc's read/write events, so a buffer used on another
//! stream (another stage's `Cuda`) is waited for automatically.
//!
//! `transfer` to another `Cuda` copies on the **destination's** stream: it first waits on the source buffer's last
//! write (an event recorded on the source stream; cudarc's `memcpy_dtod`, which uses `cuMemcpyPeerAsync` when the
//! two devices differ), then the source stream waits on an event recorded after the copy before the source buffer
//! is freed, so the free cannot overtake the copy.

use std::sync::Arc;

use baton_kernels::cpu::AdamW;
use baton_kernels::cuda::cudarc::cublas::sys::cublasOperation_t;
use baton_kernels::cuda::cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use baton_kernels::cuda::cudarc::driver::CudaSlice;
use baton_kernels::cuda::{self as kc, attention::AttentionShape, cublas_available, CudaError, Device, Tokens};

use super::Backend;
use crate::error::{EngineError, Result};

/// The CUDA backend on one device: its context, a compute stream, the loaded kernel library and a cuBLAS handle
/// bound to the stream. Cheap to clone (shared handles, same stream).
#[derive(Clone)]
pub struct Cuda {
    ordinal: usize,
    dev: Device,
    blas: Arc<CudaBlas>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ordinal)
            .field("arch", &self.dev.arch())
            .finish_non_exhaustive()
    }
}

const T_OP: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;
const N_OP: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;

/// One column-major GEMM of a strided batch: `C = alpha · op(A) · op(B) + beta · C`, `op(A)` (m, k).
#[derive(Clone, Copy)]
struct Gemm3 {
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    /// Elements between consecutive matrices of the batch (A, B, C).
    strides: (usize, usize, usize),
    batch: usize,
    beta: f32,
}

/// Elements a column-major operand spans: `ld · (cols − 1) + rows`, for `op` applied to a (rows, cols) result.
fn span(trans: cublasOperation_t, rows: usize, cols: usize, ld: usize) -> usize {
    let (r, c) = if trans == N_OP { (rows, cols) } else { (cols, rows) };
    if r == 0 || c == 0 {
        0
    } else {
        ld * (c - 1) + r
    }
}

impl Cuda {
    /// The backend on device `ordinal`, with a new stream. [`EngineError::NoCudaDevice`] when the CUDA driver or
    /// cuBLAS is not installed or there is no such device — never a panic.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let dev = Device::new(ordinal).map_err(|e| match e {
            CudaError::NoCudaDevice(why) => EngineError::NoCudaDevice(why),
            other => EngineError::NoCudaDevice(other.to_string()),
        })?;
        Cuda::on(ordinal, dev)
    }

    /// A second backend on the same device (shared context and kernels) with its own stream: e.g. two pipeline
    /// stages on one GPU.
    pub fn with_new_stream(&self) -> Result<Cuda> {
        let dev = self.dev.with_new_stream().map_err(|e| self.err("with_new_stream", e))?;
        Cuda::on(self.ordinal, dev)
    }

    fn on(ordinal: usize, dev: Device) -> Result<Cuda> {
        cublas_available().map_err(|e| EngineError::NoCudaDevice(e.to_string()))?;
        let blas = CudaBlas::new(dev.stream().clone())
            .map_err(|e| EngineError::NoCudaDevice(format!("cublasCreate: {e:?}")))?;
        Ok(Cuda {
            ordinal,
            dev,
            blas: Arc::new(blas),
        })
    }

    /// The kernels' view of the device (context, stream, library), for callers that launch kernels directly.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn err(&self, op: &'static str, e: CudaError) -> EngineError {
        EngineError::Backend {
            backend: self.name(),
            op,
            reason: e.to_string(),
        }
    }

    fn shape(&self, op: &'static str, reason: String) -> EngineError {
        EngineError::Backend {
            backend: self.name(),
            op,
            reason,
        }
    }

    fn check(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(self.shape(op, format!("{what} holds {got} elements, expected {want}")))
        }
    }

    /// Runs a strided-batched fp32 GEMM after checking every operand covers what cuBLAS will touch.
    fn gemm(
        &self,
        op: &'static str,
        g: Gemm3,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let last = g.batch - 1;
        let need_a = last * g.strides.0 + span(g.transa, g.m, g.k, g.lda);
        let need_b = last * g.strides.1 + span(g.transb, g.k, g.n, g.ldb);
        let need_c = last * g.strides.2 + span(N_OP, g.m, g.n, g.ldc);
        if a.len() < need_a || b.len() < need_b || c.len() < need_c {
            return Err(self.shape(
                op,
                format!(
                    "GEMM operands too short: A {} < {need_a}, B {} < {need_b} or C {} < {need_c}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| self.shape(op, format!("GEMM dimension {v} exceeds i32")));
        let long = |v: usize| i64::try_from(v).map_err(|_| self.shape(op, format!("GEMM stride {v} exceeds i64")));
        let cfg = GemmConfig {
            transa: g.transa,
            transb: g.transb,
            m: int(g.m)?,
            n: int(g.n)?,
            k: int(g.k)?,
            alpha: 1.0f32,
            lda: int(g.lda.max(1))?,
            ldb: int(g.ldb.max(1))?,
            beta: g.beta,
            ldc: int(g.ldc.max(1))?,
        };
        let result = if g.batch == 1 {
            // SAFETY: the spans of A, B and C that cuBLAS reads or writes for these (m, n, k, ld, op) were checked
            // against the buffer lengths above; all three buffers live on this backend's stream's device.
            unsafe { self.blas.gemm(cfg, a, b, c) }
        } else {
            let cfg = StridedBatchedConfig {
                gemm: cfg,
                batch_size: int(g.batch)?,
                stride_a: long(g.strides.0)?,
                stride_b: long(g.strides.1)?,
                stride_c: long(g.strides.2)?,
            };
            // SAFETY: as above, for the last matrix of the batch (offset (batch − 1) · stride), which bounds all.
            unsafe { self.blas.gemm_strided_batched(cfg, a, b, c) }
        };
        result.map_err(|e| self.shape(op, format!("cuBLAS sgemm failed: {e:?}")))
    }

    fn scratch(&self, op: &'static str, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.zeros::<f32>(len).map_err(|e| self.err(op, e))
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Tokens = Tokens;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.zeros(len).map_err(|e| self.err("zeros", e))
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload(data).map_err(|e| self.err("upload", e))
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.dev.download(buf).map_err(|e| self.err("download", e))
    }
    fn upload_tokens(&self, tokens: &[u32]) -> Result<Tokens> {
        Tokens::upload(&self.dev, tokens).map_err(|e| self.err("upload_tokens", e))
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn duplicate(&self, buf: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.dev
            .stream()
            .clone_dtod(buf)
            .map_err(|e| self.err("duplicate", CudaError::driver("cuMemcpyDtoDAsync", e)))
    }
    fn transfer(&self, buf: CudaSlice<f32>, dst: &Self) -> Result<CudaSlice<f32>> {
        let op = "transfer";
        let mut out = dst.zeros(buf.len())?;
        // Ordering: memcpy_dtod runs on dst's stream after waiting on `buf`'s last write (same context: buf's write
        // event; other device: an event recorded on buf's stream), as a peer copy when the devices differ.
        dst.dev
            .stream()
            .memcpy_dtod(&buf, &mut out)
            .map_err(|e| self.err(op, CudaError::driver("memcpy_dtod (peer)", e)))?;
        // `buf` is freed on its own stream when dropped: make that stream wait for the copy first.
        let copied = dst
            .dev
            .stream()
            .record_event(None)
            .map_err(|e| self.err(op, CudaError::driver("recording the copy's event", e)))?;
        self.dev
            .stream()
            .wait(&copied)
            .map_err(|e| self.err(op, CudaError::driver("waiting on the copy's event", e)))?;
        drop(buf);
        Ok(out)
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize().map_err(|e| self.err("synchronize", e))
    }

    fn fill_zero(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.dev
            .stream()
            .memset_zeros(buf)
            .map_err(|e| self.err("fill_zero", CudaError::driver("cuMemsetD8Async", e)))
    }
    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        self.check("copy", "src", src.len(), dst.len())?;
        self.dev
            .stream()
            .memcpy_dtod(src, dst)
            .map_err(|e| self.err("copy", CudaError::driver("cuMemcpyDtoDAsync", e)))
    }
    fn add_assign(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        kc::elementwise::add_assign(&self.dev, dst, src).map_err(|e| self.err("add_assign", e))
    }
    fn scale(&self, buf: &mut CudaSlice<f32>, alpha: f32) -> Result<()> {
        kc::elementwise::scale(&self.dev, buf, alpha).map_err(|e| self.err("scale", e))
    }
    fn sum_squares(&self, buf: &CudaSlice<f32>) -> Result<f64> {
        kc::norm::sum_squares(&self.dev, buf).map_err(|e| self.err("sum_squares", e))
    }
    fn sum(&self, buf: &CudaSlice<f32>) -> Result<f64> {
        kc::norm::sum(&self.dev, buf).map_err(|e| self.err("sum", e))
    }

    fn embedding_forward(
        &self,
        out: &mut CudaSlice<f32>,
        tokens: &Tokens,
        wte: &CudaSlice<f32>,
        wpe: &CudaSlice<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        kc::embedding::embedding_forward(&self.dev, out, tokens, wte, wpe, b, t, c)
            .map_err(|e| self.err("embedding_forward", e))
    }
    fn embedding_backward(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        tokens: &Tokens,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        kc::embedding::embedding_backward(&self.dev, dwte, dwpe, dout, tokens, b, t, c)
            .map_err(|e| self.err("embedding_backward", e))
    }
    fn layernorm_forward(
        &self,
        out: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        kc::layernorm::layernorm_forward(&self.dev, out, mean, rstd, inp, weight, bias, n, c)
            .map_err(|e| self.err("layernorm_forward", e))
    }
    fn layernorm_backward_input(
        &self,
        dinp: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        kc::layernorm::layernorm_backward_input(&self.dev, dinp, dout, inp, weight, mean, rstd, n, c)
            .map_err(|e| self.err("layernorm_backward_input", e))
    }
    fn layernorm_backward_weight(
        &self,
        dweight: &mut CudaSlice<f32>,
        dbias: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        kc::layernorm::layernorm_backward_weight(&self.dev, dweight, dbias, dout, inp, mean, rstd, n, c)
            .map_err(|e| self.err("layernorm_backward_weight", e))
    }
    fn matmul_forward(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        self.check(op, "out", out.len(), n * oc)?;
        self.check(op, "inp", inp.len(), n * c)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        // Row-major out (n, oc) is column-major (oc, n) = Wᵀ-view · inp-view: W row-major (oc, c) read as
        // column-major (c, oc) and transposed; inp row-major (n, c) is column-major (c, n).
        let g = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: oc,
            n,
            k: c,
            lda: c,
            ldb: c,
            ldc: oc,
            strides: (0, 0, 0),
            batch: 1,
            beta: 0.0,
        };
        self.gemm(op, g, weight, inp, out)?;
        if let Some(bias) = bias {
            kc::bias::bias_forward(&self.dev, out, bias, n, oc).map_err(|e| self.err(op, e))?;
        }
        Ok(())
    }
    fn matmul_backward_input(
        &self,
        dinp: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_input";
        self.check(op, "dinp", dinp.len(), n * c)?;
        self.check(op, "dout", dout.len(), n * oc)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        // dinp (n, c) += dout (n, oc) · W (oc, c); column-major: dinpᵀ (c, n) += W-view (c, oc) · doutᵀ (oc, n).
        let g = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: c,
            n,
            k: oc,
            lda: c,
            ldb: oc,
            ldc: c,
            strides: (0, 0, 0),
            batch: 1,
            beta: 1.0,
        };
        self.gemm(op, g, weight, dout, dinp)
    }
    fn matmul_backward_weight(
        &self,
        dweight: &mut CudaSlice<f32>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_weight";
        self.check(op, "dweight", dweight.len(), oc * c)?;
        self.check(op, "dout", dout.len(), n * oc)?;
        self.check(op, "inp", inp.len(), n * c)?;
        // dW (oc, c) += doutᵀ · inp; column-major: dWᵀ (c, oc) += inpᵀ (c, n) · dout (n, oc) (dout read transposed).
        let g = Gemm3 {
            transa: N_OP,
            transb: T_OP,
            m: c,
            n: oc,
            k: n,
            lda: c,
            ldb: oc,
            ldc: c,
            strides: (0, 0, 0),
            batch: 1,
            beta: 1.0,
        };
        self.gemm(op, g, inp, dout, dweight)?;
        if let Some(dbias) = dbias {
            kc::bias::bias_backward(&self.dev, dbias, dout, n, oc).map_err(|e| self.err(op, e))?;
        }
        Ok(())
    }
    fn attention_forward(
        &self,
        out: &mut CudaSlice<f32>,
        att: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_forward";
        let s = self.attention_shape(op, b, t, c, nh)?;
        self.check(op, "out", out.len(), b * t * c)?;
        self.check(op, "att", att.len(), s.score_elems())?;
        self.check(op, "qkv", qkv.len(), 3 * b * t * c)?;
        if s.head_elems() == 0 {
            return Ok(());
        }
        let (hs, bh) = (s.hs, b * nh);
        let mut q = self.scratch(op, s.head_elems())?;
        let mut k = self.scratch(op, s.head_elems())?;
        let mut v = self.scratch(op, s.head_elems())?;
        kc::attention::attention_permute(&self.dev, &mut q, &mut k, &mut v, qkv, s).map_err(|e| self.err(op, e))?;
        // preatt[t1][t2] = q[t1] · k[t2]: column-major (t2, t1) = kᵀ-view · q-view, per (b, h).
        let mut preatt = self.scratch(op, s.score_elems())?;
        let scores = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: t,
            n: t,
            k: hs,
            lda: hs,
            ldb: hs,
            ldc: t,
            strides: (t * hs, t * hs, t * t),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, scores, &k, &q, &mut preatt)?;
        let scale = 1.0 / (hs as f32).sqrt();
        kc::attention::causal_softmax_forward(&self.dev, att, &preatt, scale, bh * t, t)
            .map_err(|e| self.err(op, e))?;
        // y[t1][d] = Σ_t2 att[t1][t2] v[t2][d]: column-major (d, t1) = v-view (d, t2) · att-view (t2, t1).
        let mut y = self.scratch(op, s.head_elems())?;
        let values = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, values, &v, att, &mut y)?;
        kc::attention::attention_unpermute(&self.dev, out, &y, s).map_err(|e| self.err(op, e))
    }
    fn attention_backward(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        att: &CudaSlice<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward";
        let s = self.attention_shape(op, b, t, c, nh)?;
        self.check(op, "dqkv", dqkv.len(), 3 * b * t * c)?;
        self.check(op, "dout", dout.len(), b * t * c)?;
        self.check(op, "qkv", qkv.len(), 3 * b * t * c)?;
        self.check(op, "att", att.len(), s.score_elems())?;
        if s.head_elems() == 0 {
            return Ok(());
        }
        let (hs, bh) = (s.hs, b * nh);
        let heads = |o: &'static str| self.scratch(o, s.head_elems());
        let (mut q, mut k, mut v) = (heads(op)?, heads(op)?, heads(op)?);
        kc::attention::attention_permute(&self.dev, &mut q, &mut k, &mut v, qkv, s).map_err(|e| self.err(op, e))?;
        let mut dy = heads(op)?;
        kc::attention::attention_unpermute_backward(&self.dev, &mut dy, dout, s).map_err(|e| self.err(op, e))?;
        // datt[t1][t2] = dy[t1] · v[t2]: column-major (t2, t1) = vᵀ-view · dy-view.
        let mut datt = self.scratch(op, s.score_elems())?;
        let g_datt = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: t,
            n: t,
            k: hs,
            lda: hs,
            ldb: hs,
            ldc: t,
            strides: (t * hs, t * hs, t * t),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_datt, &v, &dy, &mut datt)?;
        // dv[t2][d] = Σ_t1 att[t1][t2] dy[t1][d]: column-major (d, t2) = dy-view (d, t1) · (att-view)ᵀ (t1, t2).
        let mut dv = heads(op)?;
        let g_dv = Gemm3 {
            transa: N_OP,
            transb: T_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_dv, &dy, att, &mut dv)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let mut dpre = self.scratch(op, s.score_elems())?;
        kc::attention::causal_softmax_backward(&self.dev, &mut dpre, &datt, att, scale, bh * t, t)
            .map_err(|e| self.err(op, e))?;
        // dq[t1][d] = Σ_t2 dpre[t1][t2] k[t2][d]: column-major (d, t1) = k-view (d, t2) · dpre-view (t2, t1).
        let mut dq = heads(op)?;
        let g_dq = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_dq, &k, &dpre, &mut dq)?;
        // dk[t2][d] = Σ_t1 dpre[t1][t2] q[t1][d]: column-major (d, t2) = q-view (d, t1) · (dpre-view)ᵀ (t1, t2).
        let mut dk = heads(op)?;
        let g_dk = Gemm3 { transb: T_OP, ..g_dq };
        self.gemm(op, g_dk, &q, &dpre, &mut dk)?;
        kc::attention::attention_permute_backward(&self.dev, dqkv, &dq, &dk, &dv, s).map_err(|e| self.err(op, e))
    }
    fn gelu_forward(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>) -> Result<()> {
        kc::elementwise::gelu_forward(&self.dev, out, inp).map_err(|e| self.err("gelu_forward", e))
    }
    fn gelu_backward(&self, dinp: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, dout: &CudaSlice<f32>) -> Result<()> {
        kc::elementwise::gelu_backward(&self.dev, dinp, inp, dout).map_err(|e| self.err("gelu_backward", e))
    }
    fn residual_forward(&self, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
        kc::elementwise::residual_forward(&self.dev, out, a, b).map_err(|e| self.err("residual_forward", e))
    }
    fn cross_entropy_forward(
        &self,
        losses: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &Tokens,
        n: usize,
        v: usize,
    ) -> Result<()> {
        kc::classifier::cross_entropy_forward(&self.dev, losses, logits, targets, n, v)
            .map_err(|e| self.err("cross_entropy_forward", e))
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &Tokens,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        kc::classifier::cross_entropy_backward(&self.dev, dlogits, logits, targets, scale, n, v)
            .map_err(|e| self.err("cross_entropy_backward", e))
    }
    fn adamw(
        &self,
        cfg: &AdamW,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        step: u32,
    ) -> Result<()> {
        kc::adamw::adamw_f32(&self.dev, cfg, params, grads, m, v, step).map_err(|e| self.err("adamw", e))
    }
}

impl Cuda {
    fn attention_shape(&self, op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<AttentionShape> {
        if nh == 0 || c % nh != 0 {
            return Err(self.shape(op, format!("c ({c}) must be a positive multiple of nh ({nh})")));
        }
        Ok(AttentionShape { b, t, nh, hs: c / nh })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_spans() {
        // A (m=3, k=2) untransposed, ld 3: 3 + 3 = 6 elements; transposed with ld 2: (2, 3) stored, 2·2 + 2 = 6.
        assert_eq!(span(N_OP, 3, 2, 3), 6);
        assert_eq!(span(T_OP, 3, 2, 2), 6);
        assert_eq!(span(N_OP, 0, 2, 3), 0);
    }
}
