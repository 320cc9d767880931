//! The storage of the CUDA backend's buffers and the rules by which an op reads or writes them in the element
//! type it computes in (mixed precision).
//!
//! A [`CudaBuf`] is fp32, bf16, or a parameter: an fp32 master copy with its bf16 working copy. An op computes in
//! one element type `T` (the backend's [`Precision`] for the model's ops; the destination's storage for the
//! element-wise helpers) and gets each operand as `T` by [`read_plan`] / [`write_plan`]:
//! - the operand's storage holds `T` (a parameter holds both): used in place;
//! - otherwise a read casts into a scratch copy, an overwritten output changes storage to `T` (its old contents
//!   are not needed), and an accumulated output is cast to `T`, updated and cast back.
//!
//! In a consistent run no cast happens: in fp32 mode every buffer is fp32; in bf16 mode activations and
//! gradients are bf16, parameters are master + working copies read through their working copy, and the fp32-only
//! operands (layer-norm statistics, per-token losses, AdamW moments) are fp32.

use std::fmt;
use std::str::FromStr;

use baton_kernels::cuda::blaslt::BlasElem;
use baton_kernels::cuda::cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use baton_kernels::cuda::cudarc::driver::CudaSlice;
use baton_kernels::cuda::{self as kc, Device};
use half::bf16;

use super::pool::{Homed, Pooled};

/// The element type of the CUDA backend's activations, weights (working copies) and gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Everything fp32 (the parity mode: tracks the CPU reference within 1e-4).
    #[default]
    F32,
    /// bf16 activations, weights and gradients; fp32 master weights, AdamW moments, layer-norm statistics and
    /// losses; fp32 accumulation in every GEMM and reduction.
    Bf16,
}

impl Precision {
    /// Both precisions.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// The name used on the command line and in messages (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes of one activation or gradient element.
    pub fn elem_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    /// Bytes of device memory a parameter of `len` elements takes (weights, gradient, two AdamW moments), as
    /// [`crate::Backend::upload_param`], `zeros` and [`crate::Backend::zeros_state`] allocate them.
    pub fn param_bytes(self, len: usize) -> usize {
        let weights = match self {
            Precision::F32 => Storage::F32.bytes(len),
            Precision::Bf16 => Storage::Param.bytes(len),
        };
        weights + len * self.elem_bytes() + 2 * Storage::F32.bytes(len)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision {other:?} (expected f32 or bf16)")),
        }
    }
}

/// A buffer of the CUDA backend: its storage, going back to the receiving stage's pool when dropped if it
/// came from one ([`Homed`]).
pub type CudaBuf = Homed<CudaData>;

/// The storage of a [`CudaBuf`].
pub enum CudaData {
    /// fp32 storage.
    F32(CudaSlice<f32>),
    /// bf16 storage.
    Bf16(CudaSlice<bf16>),
    /// A bf16-mode parameter: the fp32 master weights and the bf16 working copy the model's ops read (kept equal
    /// to the master rounded to nearest even by every write).
    Param {
        /// fp32 master weights (what AdamW updates, `download` returns and checkpoints save).
        master: CudaSlice<f32>,
        /// bf16 working copy.
        working: CudaSlice<bf16>,
    },
}

impl fmt::Debug for CudaData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaData::{:?}({} elements)", self.storage(), self.len())
    }
}

/// The kind of a [`CudaBuf`]'s storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// fp32.
    F32,
    /// bf16.
    Bf16,
    /// fp32 master + bf16 working copy.
    Param,
}

impl Storage {
    /// Device bytes of `len` elements in this storage.
    pub fn bytes(self, len: usize) -> usize {
        match self {
            Storage::F32 => 4 * len,
            Storage::Bf16 => 2 * len,
            Storage::Param => 6 * len,
        }
    }

    /// Whether the storage holds `p`'s element type (a parameter holds both).
    pub fn holds(self, p: Precision) -> bool {
        matches!(
            (self, p),
            (Storage::Param, _) | (Storage::F32, Precision::F32) | (Storage::Bf16, Precision::Bf16)
        )
    }

    /// The element type the element-wise helpers (`copy`, `add_assign`, `scale`, `sum`, …) compute in when this
    /// storage is their destination: its own; a parameter's master (fp32).
    pub fn native(self) -> Precision {
        match self {
            Storage::F32 | Storage::Param => Precision::F32,
            Storage::Bf16 => Precision::Bf16,
        }
    }
}

/// How an op computing in some element type reads an operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPlan {
    /// In place.
    InPlace,
    /// Through a cast scratch copy.
    Cast,
}

/// The read plan of an operand stored as `storage`, read by an op computing in `want`.
pub fn read_plan(storage: Storage, want: Precision) -> ReadPlan {
    if storage.holds(want) {
        ReadPlan::InPlace
    } else {
        ReadPlan::Cast
    }
}

/// Whether an op's output keeps its old contents (`+=`) or replaces them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The op reads the old contents (gradients accumulate, `scale`, AdamW).
    Accumulate,
    /// The op writes every element without reading it.
    Overwrite,
}

/// How an op computing in some element type writes an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePlan {
    /// In place.
    InPlace,
    /// In place into one copy of a parameter, then the other copy is refreshed from it.
    InPlaceThenMirror,
    /// The buffer changes storage to the op's element type (fresh allocation; old contents dropped).
    Retype,
    /// Cast to the op's type, updated, cast back into the buffer's storage.
    CastBack,
}

/// The write plan of an output stored as `storage`, written by an op computing in `want`.
pub fn write_plan(storage: Storage, want: Precision, mode: Mode) -> WritePlan {
    match (storage, mode) {
        (Storage::Param, _) => WritePlan::InPlaceThenMirror,
        (s, _) if s.holds(want) => WritePlan::InPlace,
        (_, Mode::Overwrite) => WritePlan::Retype,
        (_, Mode::Accumulate) => WritePlan::CastBack,
    }
}

impl Pooled for CudaData {
    type Key = (Storage, usize);
    fn key(&self) -> (Storage, usize) {
        (self.storage(), self.len())
    }
}

impl CudaData {
    /// The storage kind.
    pub fn storage(&self) -> Storage {
        match self {
            CudaData::F32(_) => Storage::F32,
            CudaData::Bf16(_) => Storage::Bf16,
            CudaData::Param { .. } => Storage::Param,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CudaData::F32(s) => s.len(),
            CudaData::Bf16(s) => s.len(),
            CudaData::Param { master, .. } => master.len(),
        }
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes the buffer takes.
    pub fn bytes(&self) -> usize {
        self.storage().bytes(self.len())
    }
}

/// Mutable access to a buffer's storage of one element type, with the parameter copy of the other type to
/// refresh after writing it (for a parameter).
pub(crate) type ViewMut<'a, T> = (&'a mut CudaSlice<T>, Option<&'a mut CudaSlice<<T as Stored>::Other>>);

/// The two element types of the backend, with their access to a [`CudaBuf`] and their GEMM.
pub(crate) trait Stored: BlasElem {
    /// The other element type.
    type Other: Stored<Other = Self>;
    /// The precision of this element type.
    const PRECISION: Precision;
    /// The constant `x` in this type (GEMM scalars: 0 and 1, exact in both).
    fn scalar(x: f32) -> Self;
    /// The buffer's storage of this type (a parameter's master for fp32, its working copy for bf16).
    fn view(buf: &CudaData) -> Option<&CudaSlice<Self>>;
    /// Mutable access to the buffer's storage of this type, and the parameter copy to refresh afterwards.
    fn view_mut(buf: &mut CudaData) -> Option<ViewMut<'_, Self>>;
    /// A buffer holding `s`.
    fn wrap(s: CudaSlice<Self>) -> CudaBuf;
    /// `dst = src` converted (bf16 → fp32 exact; fp32 → bf16 round to nearest even).
    fn cast_from(dev: &Device, dst: &mut CudaSlice<Self>, src: &CudaSlice<Self::Other>) -> kc::Result<()>;
    /// One (or a strided batch of) cuBLAS GEMM in this type, fp32 accumulation.
    ///
    /// # Safety
    /// As cudarc's [`Gemm::gemm`] / [`Gemm::gemm_strided_batched`]: the operands cover what the config addresses.
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        batch: Option<(i32, i64, i64, i64)>,
        a: &CudaSlice<Self>,
        b: &CudaSlice<Self>,
        c: &mut CudaSlice<Self>,
    ) -> Result<(), String>;
}

/// # Safety
/// See [`Stored::gemm`].
unsafe fn run_gemm<T>(
    blas: &CudaBlas,
    cfg: GemmConfig<T>,
    batch: Option<(i32, i64, i64, i64)>,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    c: &mut CudaSlice<T>,
) -> Result<(), String>
where
    CudaBlas: Gemm<T>,
{
    let result = match batch {
        // SAFETY: forwarded from the caller.
        None => unsafe { blas.gemm(cfg, a, b, c) },
        Some((batch_size, stride_a, stride_b, stride_c)) => {
            let cfg = StridedBatchedConfig {
                gemm: cfg,
                batch_size,
                stride_a,
                stride_b,
                stride_c,
            };
            // SAFETY: forwarded from the caller.
            unsafe { blas.gemm_strided_batched(cfg, a, b, c) }
        }
    };
    result.map_err(|e| format!("{e:?}"))
}

impl Stored for f32 {
    type Other = bf16;
    const PRECISION: Precision = Precision::F32;
    fn scalar(x: f32) -> Self {
        x
    }
    fn view(buf: &CudaData) -> Option<&CudaSlice<f32>> {
        match buf {
            CudaData::F32(s) | CudaData::Param { master: s, .. } => Some(s),
            CudaData::Bf16(_) => None,
        }
    }
    fn view_mut(buf: &mut CudaData) -> Option<ViewMut<'_, f32>> {
        match buf {
            CudaData::F32(s) => Some((s, None)),
            CudaData::Param { master, working } => Some((master, Some(working))),
            CudaData::Bf16(_) => None,
        }
    }
    fn wrap(s: CudaSlice<f32>) -> CudaBuf {
        CudaBuf::new(CudaData::F32(s))
    }
    fn cast_from(dev: &Device, dst: &mut CudaSlice<f32>, src: &CudaSlice<bf16>) -> kc::Result<()> {
        kc::elementwise::cast_bf16_to_f32(dev, dst, src)
    }
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<f32>,
        batch: Option<(i32, i64, i64, i64)>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        // SAFETY: forwarded from the caller.
        unsafe { run_gemm(blas, cfg, batch, a, b, c) }
    }
}

impl Stored for bf16 {
    type Other = f32;
    const PRECISION: Precision = Precision::Bf16;
    fn scalar(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn view(buf: &CudaData) -> Option<&CudaSlice<bf16>> {
        match buf {
            CudaData::Bf16(s) | CudaData::Param { working: s, .. } => Some(s),
            CudaData::F32(_) => None,
        }
    }
    fn view_mut(buf: &mut CudaData) -> Option<ViewMut<'_, bf16>> {
        match buf {
            CudaData::Bf16(s) => Some((s, None)),
            CudaData::Param { master, working } => Some((working, Some(master))),
            CudaData::F32(_) => None,
        }
    }
    fn wrap(s: CudaSlice<bf16>) -> CudaBuf {
        CudaBuf::new(CudaData::Bf16(s))
    }
    fn cast_from(dev: &Device, dst: &mut CudaSlice<bf16>, src: &CudaSlice<f32>) -> kc::Result<()> {
        kc::elementwise::cast_f32_to_bf16(dev, dst, src)
    }
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<bf16>,
        batch: Option<(i32, i64, i64, i64)>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<bf16>,
    ) -> Result<(), String> {
        // SAFETY: forwarded from the caller.
        unsafe { run_gemm(blas, cfg, batch, a, b, c) }
    }
}

/// An operand read as `T`: borrowed in place, or a cast scratch copy.
pub(crate) enum In<'a, T> {
    Borrowed(&'a CudaSlice<T>),
    Owned(CudaSlice<T>),
}

impl<T> std::ops::Deref for In<'_, T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        match self {
            In::Borrowed(s) => s,
            In::Owned(s) => s,
        }
    }
}

/// An output written as `T`; [`crate::backend::Cuda`] finishes it (refreshes a parameter's other copy, or casts
/// a scratch copy back).
pub(crate) enum Out<'a, T: Stored> {
    /// In place; with the parameter copy to refresh from it afterwards.
    Direct(&'a mut CudaSlice<T>, Option<&'a mut CudaSlice<T::Other>>),
    /// A cast copy of a buffer stored as `T::Other`, cast back at the end.
    Scratch(CudaSlice<T>, &'a mut CudaSlice<T::Other>),
}

impl<T: Stored> Out<'_, T> {
    /// The slice the kernel writes.
    pub(crate) fn slice(&mut self) -> &mut CudaSlice<T> {
        match self {
            Out::Direct(s, _) => s,
            Out::Scratch(s, _) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::F32);
        let err = "fp8".parse::<Precision>().unwrap_err();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
        assert_eq!(Precision::default(), Precision::F32);
    }

    #[test]
    fn sizes() {
        assert_eq!(Storage::F32.bytes(10), 40);
        assert_eq!(Storage::Bf16.bytes(10), 20);
        assert_eq!(Storage::Param.bytes(10), 60);
        // fp32: 4 (w) + 4 (g) + 8 (m, v); bf16: 6 (master + working) + 2 (g) + 8.
        assert_eq!(Precision::F32.param_bytes(1), 16);
        assert_eq!(Precision::Bf16.param_bytes(1), 16);
        assert_eq!(Precision::Bf16.param_bytes(1000), 16_000);
        assert_eq!(Precision::F32.elem_bytes(), 4);
        assert_eq!(Precision::Bf16.elem_bytes(), 2);
    }

    #[test]
    fn dispatch_table() {
        use Precision::{Bf16, F32};
        // Reads: in place when the storage holds the type (a parameter holds both), else a cast copy.
        assert_eq!(read_plan(Storage::F32, F32), ReadPlan::InPlace);
        assert_eq!(read_plan(Storage::Bf16, Bf16), ReadPlan::InPlace);
        assert_eq!(read_plan(Storage::Param, F32), ReadPlan::InPlace);
        assert_eq!(read_plan(Storage::Param, Bf16), ReadPlan::InPlace);
        assert_eq!(read_plan(Storage::F32, Bf16), ReadPlan::Cast);
        assert_eq!(read_plan(Storage::Bf16, F32), ReadPlan::Cast);
        // Writes.
        for mode in [Mode::Accumulate, Mode::Overwrite] {
            assert_eq!(write_plan(Storage::F32, F32, mode), WritePlan::InPlace);
            assert_eq!(write_plan(Storage::Bf16, Bf16, mode), WritePlan::InPlace);
            assert_eq!(write_plan(Storage::Param, F32, mode), WritePlan::InPlaceThenMirror);
            assert_eq!(write_plan(Storage::Param, Bf16, mode), WritePlan::InPlaceThenMirror);
        }
        // Layer-norm statistics and losses are fp32 outputs: a bf16 buffer allocated by `zeros` is retyped.
        assert_eq!(write_plan(Storage::Bf16, F32, Mode::Overwrite), WritePlan::Retype);
        assert_eq!(write_plan(Storage::F32, Bf16, Mode::Overwrite), WritePlan::Retype);
        assert_eq!(write_plan(Storage::Bf16, F32, Mode::Accumulate), WritePlan::CastBack);
        assert_eq!(write_plan(Storage::F32, Bf16, Mode::Accumulate), WritePlan::CastBack);
        // Element-wise helpers follow the destination.
        assert_eq!(Storage::F32.native(), F32);
        assert_eq!(Storage::Bf16.native(), Bf16);
        assert_eq!(Storage::Param.native(), F32);
    }

    #[test]
    fn scalars_are_exact() {
        assert_eq!(<bf16 as Stored>::scalar(1.0).to_f32(), 1.0);
        assert_eq!(<bf16 as Stored>::scalar(0.0).to_f32(), 0.0);
        assert_eq!(<f32 as Stored>::scalar(1.0), 1.0);
    }
}
