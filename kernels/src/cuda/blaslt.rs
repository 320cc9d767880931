//! Matrix products through cuBLASLt: the fully connected layer forward (bias, GELU and GELU-with-stash
//! epilogues), its two backwards (DGELU and bias-gradient epilogues), and the strided-batched product of the
//! simple attention path.
//!
//! Built on cudarc's `cublaslt::result` layer rather than its safe `Matmul`: the safe layer computes f32
//! products in TF32 (≈3e-4 relative error, where the fp32 parity bar is 1e-5), has no DGELU / bias-gradient
//! epilogues, queries the algorithm heuristic on every call and panics in `Drop` on a failed destroy. Here the
//! compute type is always `CUBLAS_COMPUTE_32F` (fp32 accumulation, no TF32), the heuristic's choice is cached
//! per problem, and descriptors are freed without panicking.
//!
//! All public functions take row-major shapes (the engine's convention, `out = inp · weightᵀ + bias` with
//! `weight` (OC, C)) and translate them to cuBLAS's column-major view: a row-major (R, C) matrix is a
//! column-major (C, R) one, so `C = op(A) · op(B)` becomes `Cᵀ = op(B)ᵀ · op(A)ᵀ`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::device::{cublaslt_available, Device, Elem};
use super::error::{check_len, CudaError, Result};

/// cuBLASLt workspace in bytes: 32 MiB, NVIDIA's recommendation for Hopper.
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// Upper bound on cached algorithm choices (one per distinct problem; a training run has a few dozen).
const ALGO_CACHE_MAX: usize = 1024;

/// Element types cuBLASLt multiplies here: `f32` (fp32 in, fp32 out) and `bf16` (bf16 in and out); both
/// accumulate in fp32.
pub trait BlasElem: Elem {
    /// The cuBLAS data type of the element.
    const DATA_TYPE: sys::cudaDataType;
}

impl BlasElem for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType_t::CUDA_R_32F;
}

impl BlasElem for bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType_t::CUDA_R_16BF;
}

/// Whether a backward writes its gradient or adds to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `grad = result` (beta = 0).
    Overwrite,
    /// `grad += result` (beta = 1), like the CPU reference ops.
    Add,
}

impl Accumulate {
    fn beta(self) -> f32 {
        match self {
            Accumulate::Overwrite => 0.0,
            Accumulate::Add => 1.0,
        }
    }
}

/// The row-major shape of a strided-batched product `C_i = alpha · op(A_i) · op(B_i) + beta · C_i`, for
/// `i < batch`, with `C_i` (m, n); `A_i` is (m, k), or (k, m) when `a_trans`; `B_i` is (k, n), or (n, k) when
/// `b_trans`. Matrices are densely packed and consecutive: matrix `i` starts at `i · rows · cols`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchedShape {
    /// Number of products.
    pub batch: usize,
    /// Rows of each `C_i`.
    pub m: usize,
    /// Columns of each `C_i`.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `A_i` is stored transposed, (k, m).
    pub a_trans: bool,
    /// `B_i` is stored transposed, (n, k).
    pub b_trans: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the previous `C` (0: `C` is overwritten without being read).
    pub beta: f32,
}

/// One cuBLASLt call in column-major terms (`D = alpha · op(A) · op(B) + beta · C`, `D` (m, n), C = D).
#[derive(Clone, Copy, Debug)]
struct Problem {
    m: u64,
    n: u64,
    k: u64,
    transa: bool,
    transb: bool,
    lda: i64,
    ldb: i64,
    ldc: i64,
    batch: i32,
    stride_a: i64,
    stride_b: i64,
    stride_c: i64,
    ab_type: sys::cudaDataType,
    c_type: sys::cudaDataType,
    epilogue: sys::cublasLtEpilogue_t,
    alpha: f32,
    beta: f32,
}

/// Device pointers of one call (0 = absent).
#[derive(Clone, Copy, Debug, Default)]
struct Pointers {
    a: u64,
    b: u64,
    c: u64,
    bias: u64,
    aux: u64,
}

/// The cache key: everything the heuristic sees (shape, types, epilogue, alignments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    dims: [u64; 3],
    trans: (bool, bool),
    lds: [i64; 3],
    batch: i32,
    strides: [i64; 3],
    types: (u32, u32),
    epilogue: u32,
    align: [u32; 4],
}

/// The largest power of two (at most 256) that divides the address and every batch offset, in bytes.
fn alignment(ptr: u64, stride_bytes: u64) -> u32 {
    let x = ptr | stride_bytes | 256;
    1 << x.trailing_zeros().min(8)
}

/// Owns a cuBLASLt object and destroys it on drop (an error there is recorded with
/// [`crate::cuda::error::record_drop_error`]; the handle is unusable either way).
struct Owned<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> std::result::Result<(), CublasError>,
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by the matching cuBLASLt create call and is destroyed exactly once, here.
        if let Err(e) = unsafe { (self.destroy)(self.raw) } {
            crate::cuda::error::record_drop_error("destroying a cuBLASLt descriptor", format!("{e:?}"));
        }
    }
}

fn cublas(op: &'static str) -> impl Fn(CublasError) -> CudaError + Copy {
    move |e| CudaError::Cublas {
        op,
        reason: format!("{e:?}"),
    }
}

/// A cuBLASLt handle bound to one device stream, with its 32 MiB workspace and the cache of chosen algorithms.
/// Every product is queued on the stream of the [`Device`] it was created from.
pub struct Blaslt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
}

impl std::fmt::Debug for Blaslt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blaslt")
            .field("workspace_bytes", &WORKSPACE_BYTES)
            .finish_non_exhaustive()
    }
}

// SAFETY: the handle is only used through `&self` methods that enqueue on `stream`; cuBLASLt handles may be
// moved between threads (they carry no thread-local state). Not `Sync`: calls are not serialised.
unsafe impl Send for Blaslt {}

impl Drop for Blaslt {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once; queued work holds no reference to it.
        if let Err(e) = unsafe { lt::destroy_handle(self.handle) } {
            crate::cuda::error::record_drop_error("destroying the cuBLASLt handle", format!("{e:?}"));
        }
    }
}

impl Blaslt {
    /// A handle on `dev`'s stream with a [`WORKSPACE_BYTES`] workspace. [`CudaError::CublasMissing`] when
    /// `libcublasLt` cannot be loaded (never a panic).
    pub fn new(dev: &Device) -> Result<Self> {
        cublaslt_available()?;
        dev.context()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context for cuBLASLt", e))?;
        let handle = lt::create_handle().map_err(cublas("cublasLtCreate"))?;
        let workspace = match dev.zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above, not used by anything else.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Blaslt {
            handle,
            workspace,
            stream: dev.stream().clone(),
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// `out = inp · weightᵀ (+ bias)`, then GELU (tanh form) when `gelu`; overwrites `out`. With `pre_gelu`
    /// (requires `gelu`), the value before the GELU is also written there (cuBLASLt's `GELU_AUX` epilogues),
    /// for [`Blaslt::matmul_backward_input`]'s DGELU.
    ///
    /// Shapes: `out`, `pre_gelu` (N, OC); `inp` (N, C); `weight` (OC, C); `bias` (OC).
    #[allow(clippy::too_many_arguments)] // output, stash, three operands, the activation flag and three dims.
    pub fn matmul_forward<T: BlasElem>(
        &self,
        out: &mut CudaSlice<T>,
        pre_gelu: Option<&mut CudaSlice<T>>,
        inp: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        gelu: bool,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "Blaslt::matmul_forward";
        check_len(OP, "out", out.len(), n * oc)?;
        check_len(OP, "inp", inp.len(), n * c)?;
        check_len(OP, "weight", weight.len(), oc * c)?;
        if let Some(b) = bias {
            check_len(OP, "bias", b.len(), oc)?;
        }
        if let Some(p) = pre_gelu.as_ref() {
            check_len(OP, "pre_gelu", p.len(), n * oc)?;
            if !gelu {
                return Err(CudaError::shape(OP, "pre_gelu is only written with gelu = true"));
            }
        }
        use sys::cublasLtEpilogue_t as E;
        let epilogue = match (bias.is_some(), gelu, pre_gelu.is_some()) {
            (false, false, _) => E::CUBLASLT_EPILOGUE_DEFAULT,
            (true, false, _) => E::CUBLASLT_EPILOGUE_BIAS,
            (false, true, false) => E::CUBLASLT_EPILOGUE_GELU,
            (false, true, true) => E::CUBLASLT_EPILOGUE_GELU_AUX,
            (true, true, false) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
            (true, true, true) => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        };
        // Column-major: outᵀ (OC, N) = weight (as (C, OC) col-major, transposed) · inpᵀ ((C, N) col-major).
        let p = Problem {
            m: oc as u64,
            n: n as u64,
            k: c as u64,
            transa: true,
            transb: false,
            lda: c as i64,
            ldb: c as i64,
            ldc: oc as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            ab_type: T::DATA_TYPE,
            c_type: T::DATA_TYPE,
            epilogue,
            alpha: 1.0,
            beta: 0.0,
        };
        let s = &self.stream;
        let (a, _ga) = weight.device_ptr(s);
        let (b, _gb) = inp.device_ptr(s);
        let (bias_ptr, _gbias) = bias.map(|x| x.device_ptr(s)).unzip();
        let (aux, _gaux) = pre_gelu.map(|x| x.device_ptr_mut(s)).unzip();
        let (cptr, _gc) = out.device_ptr_mut(s);
        let ptrs = Pointers {
            a,
            b,
            c: cptr,
            bias: bias_ptr.unwrap_or(0),
            aux: aux.unwrap_or(0),
        };
        // SAFETY: A = weight holds OC*C, B = inp N*C, D = out N*OC, bias OC and aux N*OC elements (checked
        // above), exactly what the column-major layouts (OC x C transposed, C x N, OC x N, aux ld OC) address.
        unsafe { self.run(OP, &p, ptrs) }
    }

    /// `dinp (+)= dout · weight`; with `gelu_pre`, the GELU backward is fused (cuBLASLt's DGELU epilogue):
    /// `dinp = (dout · weight) ∘ gelu'(gelu_pre)`, where `gelu_pre` (N, C) is the GELU input that produced this
    /// layer's input. The DGELU form only overwrites ([`Accumulate::Add`] is a shape error there).
    ///
    /// Shapes: `dinp`, `gelu_pre` (N, C); `dout` (N, OC); `weight` (OC, C).
    #[allow(clippy::too_many_arguments)] // gradient, two operands, the stash, the mode and three dims.
    pub fn matmul_backward_input<T: BlasElem>(
        &self,
        dinp: &mut CudaSlice<T>,
        dout: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        gelu_pre: Option<&CudaSlice<T>>,
        mode: Accumulate,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "Blaslt::matmul_backward_input";
        check_len(OP, "dinp", dinp.len(), n * c)?;
        check_len(OP, "dout", dout.len(), n * oc)?;
        check_len(OP, "weight", weight.len(), oc * c)?;
        if let Some(g) = gelu_pre {
            check_len(OP, "gelu_pre", g.len(), n * c)?;
            if mode == Accumulate::Add {
                return Err(CudaError::shape(OP, "the DGELU epilogue cannot accumulate into dinp"));
            }
        }
        let epilogue = if gelu_pre.is_some() {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // Column-major: dinpᵀ (C, N) = weight ((C, OC) col-major) · doutᵀ ((OC, N) col-major).
        let p = Problem {
            m: c as u64,
            n: n as u64,
            k: oc as u64,
            transa: false,
            transb: false,
            lda: c as i64,
            ldb: oc as i64,
            ldc: c as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            ab_type: T::DATA_TYPE,
            c_type: T::DATA_TYPE,
            epilogue,
            alpha: 1.0,
            beta: mode.beta(),
        };
        let s = &self.stream;
        let (a, _ga) = weight.device_ptr(s);
        let (b, _gb) = dout.device_ptr(s);
        let (aux, _gaux) = gelu_pre.map(|x| x.device_ptr(s)).unzip();
        let (cptr, _gc) = dinp.device_ptr_mut(s);
        let ptrs = Pointers {
            a,
            b,
            c: cptr,
            bias: 0,
            aux: aux.unwrap_or(0),
        };
        // SAFETY: A = weight OC*C, B = dout N*OC, C = D = dinp N*C, aux N*C elements (checked above), as the
        // column-major layouts (C x OC, OC x N, C x N, aux ld C) address them.
        unsafe { self.run(OP, &p, ptrs) }
    }

    /// `dweight (+)= doutᵀ · inp`, and with `dbias` the bias gradient (column sums of `dout`) fused through
    /// cuBLASLt's BGRADB epilogue. `dbias` is **overwritten** (the epilogue writes, it cannot accumulate).
    ///
    /// Shapes: `dweight` (OC, C); `dbias` (OC); `dout` (N, OC); `inp` (N, C).
    #[allow(clippy::too_many_arguments)] // two gradients, two operands, the mode and three dims.
    pub fn matmul_backward_weight<T: BlasElem>(
        &self,
        dweight: &mut CudaSlice<T>,
        dbias: Option<&mut CudaSlice<T>>,
        dout: &CudaSlice<T>,
        inp: &CudaSlice<T>,
        mode: Accumulate,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "Blaslt::matmul_backward_weight";
        check_len(OP, "dweight", dweight.len(), oc * c)?;
        check_len(OP, "dout", dout.len(), n * oc)?;
        check_len(OP, "inp", inp.len(), n * c)?;
        if let Some(b) = dbias.as_ref() {
            check_len(OP, "dbias", b.len(), oc)?;
        }
        let epilogue = if dbias.is_some() {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // Column-major: dweightᵀ (C, OC) = inpᵀ ((C, N) col-major) · dout ((OC, N) col-major, transposed);
        // BGRADB sums op(B) = dout (N, OC) over k = N: one value per column of D, i.e. per output channel.
        let p = Problem {
            m: c as u64,
            n: oc as u64,
            k: n as u64,
            transa: false,
            transb: true,
            lda: c as i64,
            ldb: oc as i64,
            ldc: c as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            ab_type: T::DATA_TYPE,
            c_type: T::DATA_TYPE,
            epilogue,
            alpha: 1.0,
            beta: mode.beta(),
        };
        let s = &self.stream;
        let (a, _ga) = inp.device_ptr(s);
        let (b, _gb) = dout.device_ptr(s);
        let (bias, _gbias) = dbias.map(|x| x.device_ptr_mut(s)).unzip();
        let (cptr, _gc) = dweight.device_ptr_mut(s);
        let ptrs = Pointers {
            a,
            b,
            c: cptr,
            bias: bias.unwrap_or(0),
            aux: 0,
        };
        // SAFETY: A = inp N*C, B = dout N*OC, C = D = dweight OC*C, bias OC elements (checked above), as the
        // column-major layouts (C x N, OC x N transposed, C x OC) address them.
        unsafe { self.run(OP, &p, ptrs) }
    }

    /// The strided-batched product of [`BatchedShape`] (row-major), e.g. the attention scores
    /// `att = scale · Q Kᵀ` per (batch, head) and `out = att · V` of the simple attention path.
    pub fn matmul_strided_batched<T: BlasElem>(
        &self,
        c: &mut CudaSlice<T>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        shape: BatchedShape,
    ) -> Result<()> {
        const OP: &str = "Blaslt::matmul_strided_batched";
        let BatchedShape { batch, m, n, k, .. } = shape;
        if batch == 0 || m == 0 || n == 0 || k == 0 {
            return Err(CudaError::shape(OP, format!("empty product {shape:?}")));
        }
        check_len(OP, "c", c.len(), batch * m * n)?;
        check_len(OP, "a", a.len(), batch * m * k)?;
        check_len(OP, "b", b.len(), batch * k * n)?;
        let batch_i = i32::try_from(batch).map_err(|_| CudaError::shape(OP, format!("batch {batch} exceeds i32")))?;
        // Column-major: C_iᵀ (n, m) = op(B_i)ᵀ · op(A_i)ᵀ: cuBLAS's A is our B and its B is our A.
        let p = Problem {
            m: n as u64,
            n: m as u64,
            k: k as u64,
            transa: shape.b_trans,
            transb: shape.a_trans,
            lda: if shape.b_trans { k } else { n } as i64,
            ldb: if shape.a_trans { m } else { k } as i64,
            ldc: n as i64,
            batch: batch_i,
            stride_a: (k * n) as i64,
            stride_b: (m * k) as i64,
            stride_c: (m * n) as i64,
            ab_type: T::DATA_TYPE,
            c_type: T::DATA_TYPE,
            epilogue: sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            alpha: shape.alpha,
            beta: shape.beta,
        };
        let s = &self.stream;
        let (ap, _ga) = b.device_ptr(s);
        let (bp, _gb) = a.device_ptr(s);
        let (cp, _gc) = c.device_ptr_mut(s);
        let ptrs = Pointers {
            a: ap,
            b: bp,
            c: cp,
            bias: 0,
            aux: 0,
        };
        // SAFETY: each of the `batch` matrices lies at i * stride inside its buffer, whose length was checked
        // to be batch * rows * cols with the dense leading dimensions set above.
        unsafe { self.run(OP, &p, ptrs) }
    }

    /// Builds the descriptors of `p`, picks (or recalls) an algorithm and queues the product on the stream.
    ///
    /// # Safety
    /// The pointers must address device buffers holding every element the column-major layouts of `p` reach
    /// (bias: `p.m` elements for BIAS, `p.n` for BGRADB; aux: like D) and stay alive until the stream has run it.
    unsafe fn run(&self, op: &'static str, p: &Problem, ptr: Pointers) -> Result<()> {
        let err = cublas(op);
        let elem = |t: sys::cudaDataType| -> u64 {
            if t == sys::cudaDataType_t::CUDA_R_32F {
                4
            } else {
                2
            }
        };
        let (ab_bytes, c_bytes) = (elem(p.ab_type), elem(p.c_type));
        let batched = p.batch > 1;
        let layout = |ty: sys::cudaDataType, rows: u64, cols: u64, ld: i64, stride: i64| -> Result<Owned<_>> {
            let raw = lt::create_matrix_layout(ty, rows, cols, ld).map_err(err)?;
            let owned = Owned {
                raw,
                destroy: lt::destroy_matrix_layout,
            };
            if batched {
                // SAFETY: `raw` is a live layout; the attribute buffers are an i32 and an i64 as cuBLASLt
                // documents for BATCH_COUNT and STRIDED_BATCH_OFFSET.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        raw,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&p.batch) as *const i32 as *const c_void,
                        size_of::<i32>(),
                    )
                    .map_err(err)?;
                    lt::set_matrix_layout_attribute(
                        raw,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride) as *const i64 as *const c_void,
                        size_of::<i64>(),
                    )
                    .map_err(err)?;
                }
            }
            Ok(owned)
        };
        let (a_rows, a_cols) = if p.transa { (p.k, p.m) } else { (p.m, p.k) };
        let (b_rows, b_cols) = if p.transb { (p.n, p.k) } else { (p.k, p.n) };
        let la = layout(p.ab_type, a_rows, a_cols, p.lda, p.stride_a)?;
        let lb = layout(p.ab_type, b_rows, b_cols, p.ldb, p.stride_b)?;
        let lc = layout(p.c_type, p.m, p.n, p.ldc, p.stride_c)?;

        let desc = Owned {
            raw: lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(err)?,
            destroy: lt::destroy_matmul_desc,
        };
        let set_desc = |attr: sys::cublasLtMatmulDescAttributes_t, buf: *const c_void, len: usize| {
            // SAFETY: `desc` is live; each caller passes a buffer of the size cuBLASLt documents for `attr`.
            unsafe { lt::set_matmul_desc_attribute(desc.raw, attr, buf, len) }.map_err(err)
        };
        use sys::cublasLtMatmulDescAttributes_t as D;
        let (ta, tb) = (i32::from(p.transa), i32::from(p.transb));
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            (&ta) as *const i32 as _,
            size_of::<i32>(),
        )?;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            (&tb) as *const i32 as _,
            size_of::<i32>(),
        )?;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&p.epilogue) as *const sys::cublasLtEpilogue_t as _,
            size_of::<sys::cublasLtEpilogue_t>(),
        )?;
        if ptr.bias != 0 {
            set_desc(
                D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&ptr.bias) as *const u64 as _,
                size_of::<u64>(),
            )?;
        }
        if ptr.aux != 0 {
            set_desc(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                (&ptr.aux) as *const u64 as _,
                size_of::<u64>(),
            )?;
            let ld = p.ldc;
            set_desc(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                (&ld) as *const i64 as _,
                size_of::<i64>(),
            )?;
        }

        let align = [
            alignment(ptr.a, p.stride_a as u64 * ab_bytes),
            alignment(ptr.b, p.stride_b as u64 * ab_bytes),
            alignment(ptr.c, p.stride_c as u64 * c_bytes),
            alignment(ptr.c, p.stride_c as u64 * c_bytes),
        ];
        let key = AlgoKey {
            dims: [p.m, p.n, p.k],
            trans: (p.transa, p.transb),
            lds: [p.lda, p.ldb, p.ldc],
            batch: p.batch,
            strides: [p.stride_a, p.stride_b, p.stride_c],
            types: (p.ab_type as u32, p.c_type as u32),
            epilogue: p.epilogue as u32,
            align,
        };
        let cached = self.algos.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = Owned {
                    raw: lt::create_matmul_pref().map_err(err)?,
                    destroy: lt::destroy_matmul_pref,
                };
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                let ws = WORKSPACE_BYTES as u64;
                let prefs: [(P, *const c_void, usize); 5] = [
                    (P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&ws) as *const u64 as _, 8),
                    (
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        (&align[0]) as *const u32 as _,
                        4,
                    ),
                    (
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        (&align[1]) as *const u32 as _,
                        4,
                    ),
                    (
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        (&align[2]) as *const u32 as _,
                        4,
                    ),
                    (
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                        (&align[3]) as *const u32 as _,
                        4,
                    ),
                ];
                for (attr, buf, len) in prefs {
                    // SAFETY: `pref` is live; the buffers are a u64 (workspace bytes) and u32s (alignments).
                    unsafe { lt::set_matmul_pref_attribute(pref.raw, attr, buf, len) }.map_err(err)?;
                }
                // SAFETY: every descriptor is live and consistent with `p`.
                let heuristic = unsafe {
                    lt::get_matmul_algo_heuristic(self.handle, desc.raw, la.raw, lb.raw, lc.raw, lc.raw, pref.raw)
                }
                .map_err(|e| CudaError::Cublas {
                    op,
                    reason: format!("no cuBLASLt algorithm for {p:?} (alignments {align:?}): {e:?}"),
                })?;
                let mut algos = self.algos.lock().unwrap_or_else(|e| e.into_inner());
                if algos.len() >= ALGO_CACHE_MAX {
                    algos.clear();
                }
                algos.insert(key, heuristic.algo);
                heuristic.algo
            }
        };

        let (ws, _gws) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the caller guarantees the operand pointers; the descriptors are live until the end of this
        // function (cuBLASLt copies what it needs at enqueue time); the workspace is ours and WORKSPACE_BYTES
        // long; alpha and beta are f32 as the CUDA_R_32F scale type requires.
        unsafe {
            lt::matmul(
                self.handle,
                desc.raw,
                (&p.alpha) as *const f32 as *const c_void,
                (&p.beta) as *const f32 as *const c_void,
                ptr.a as *const c_void,
                la.raw,
                ptr.b as *const c_void,
                lb.raw,
                ptr.c as *const c_void,
                lc.raw,
                ptr.c as *mut c_void,
                lc.raw,
                &algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_common_power_of_two() {
        assert_eq!(alignment(0x7f00_0000_0000, 0), 256);
        assert_eq!(alignment(0x7f00_0000_0000, 77 * 64 * 2), 128);
        assert_eq!(alignment(0x7f00_0000_0010, 0), 16);
        assert_eq!(alignment(0x7f00_0000_0002, 4), 2);
    }
}
