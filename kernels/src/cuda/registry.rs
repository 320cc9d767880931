//! The registry of CUDA kernel sources: every `.cu` file of `kernels/cuda/`, embedded with `include_str!`, and the
//! `extern "C"` entry points it defines.
//!
//! The CI compile check (`kernels/tests/nvrtc_compile.rs`) compiles every entry for `sm_90` and `sm_80` and fails
//! if a [`KernelSource::training_path`] kernel spills registers; [`crate::cuda::KernelLibrary`] loads a source by
//! its [`KernelSource::name`] and hands out its kernels by entry-point name.

/// One `.cu` file: its name, its text and its entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// File stem (`layernorm` for `kernels/cuda/layernorm.cu`); the key of the source in a
    /// [`crate::cuda::KernelLibrary`] and in the compile cache.
    pub name: &'static str,
    /// The CUDA C++ text (`include_str!` of the file).
    pub source: &'static str,
    /// Every `extern "C" __global__` entry point the file defines; the compile check fails if ptxas does not report
    /// one of them, so this list cannot drift from the file.
    pub kernels: &'static [&'static str],
    /// Whether the kernels run in a training step: those must compile without register spills.
    pub training_path: bool,
}

impl KernelSource {
    /// The source registered under `name`, if any.
    pub fn find(name: &str) -> Option<&'static KernelSource> {
        SOURCES.iter().find(|s| s.name == name)
    }
}

/// Embedding (token + position) forward and its deterministic backward.
pub const EMBEDDING: KernelSource = KernelSource {
    name: "embedding",
    source: include_str!("../../cuda/embedding.cu"),
    kernels: &[
        "embedding_forward_f32",
        "embedding_forward_bf16",
        "embedding_backward_wte_f32",
        "embedding_backward_wte_bf16",
        "embedding_backward_wpe_f32",
        "embedding_backward_wpe_bf16",
    ],
    training_path: true,
};

/// Layer norm forward (optionally fused with the residual add) and backward.
pub const LAYERNORM: KernelSource = KernelSource {
    name: "layernorm",
    source: include_str!("../../cuda/layernorm.cu"),
    kernels: &[
        "layernorm_forward_f32",
        "layernorm_forward_bf16",
        "residual_layernorm_forward_f32",
        "residual_layernorm_forward_bf16",
        "layernorm_backward_input_f32",
        "layernorm_backward_input_bf16",
        "layernorm_backward_weight_partial_f32",
        "layernorm_backward_weight_partial_bf16",
        "layernorm_backward_weight_finish_f32",
        "layernorm_backward_weight_finish_bf16",
    ],
    training_path: true,
};

/// GELU (tanh form) forward and backward.
pub const GELU: KernelSource = KernelSource {
    name: "gelu",
    source: include_str!("../../cuda/gelu.cu"),
    kernels: &[
        "gelu_forward_f32",
        "gelu_forward_bf16",
        "gelu_backward_f32",
        "gelu_backward_bf16",
    ],
    training_path: true,
};

/// Residual add and the element-wise helpers of the backend (`dst += src`, `buf *= alpha`), and the slow fill of the
/// copy-ordering race test.
pub const RESIDUAL: KernelSource = KernelSource {
    name: "residual",
    source: include_str!("../../cuda/residual.cu"),
    kernels: &[
        "residual_forward_f32",
        "residual_forward_bf16",
        "add_assign_f32",
        "add_assign_bf16",
        "scale_f32",
        "scale_bf16",
        "slow_fill_f32",
    ],
    training_path: true,
};

/// Bias add (forward, after a GEMM without epilogue) and the deterministic bias-gradient reduction.
pub const BIAS: KernelSource = KernelSource {
    name: "bias",
    source: include_str!("../../cuda/bias.cu"),
    kernels: &[
        "bias_forward_f32",
        "bias_forward_bf16",
        "bias_backward_partial_f32",
        "bias_backward_partial_bf16",
        "bias_backward_finish_f32",
        "bias_backward_finish_bf16",
    ],
    training_path: true,
};

/// Softmax + cross-entropy: loss, gradient, and the fused in-place loss + gradient pass.
pub const CLASSIFIER: KernelSource = KernelSource {
    name: "classifier",
    source: include_str!("../../cuda/classifier.cu"),
    kernels: &[
        "cross_entropy_forward_f32",
        "cross_entropy_forward_bf16",
        "cross_entropy_backward_f32",
        "cross_entropy_backward_bf16",
        "classifier_fused_f32",
        "classifier_fused_bf16",
    ],
    training_path: true,
};

/// The pieces of the simple attention path around the batched GEMMs: qkv permute, causal softmax, unpermute, and
/// their backwards.
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: include_str!("../../cuda/attention.cu"),
    kernels: &[
        "attention_permute_f32",
        "attention_permute_bf16",
        "attention_permute_backward_f32",
        "attention_permute_backward_bf16",
        "attention_unpermute_f32",
        "attention_unpermute_bf16",
        "attention_unpermute_backward_f32",
        "attention_unpermute_backward_bf16",
        "causal_softmax_forward_f32",
        "causal_softmax_forward_bf16",
        "causal_softmax_backward_f32",
        "causal_softmax_backward_bf16",
    ],
    training_path: true,
};

/// AdamW on fp32 master weights and moments (the bf16 variant also writes the bf16 working copy).
pub const ADAMW: KernelSource = KernelSource {
    name: "adamw",
    source: include_str!("../../cuda/adamw.cu"),
    kernels: &["adamw_f32", "adamw_bf16"],
    training_path: true,
};

/// Deterministic two-pass sums (sum, sum of squares → the global gradient norm).
pub const NORM: KernelSource = KernelSource {
    name: "norm",
    source: include_str!("../../cuda/norm.cu"),
    kernels: &[
        "sum_squares_partial_f32",
        "sum_squares_partial_bf16",
        "sum_partial_f32",
        "sum_partial_bf16",
        "sum_finish",
    ],
    training_path: true,
};

/// Casts between fp32 and bf16.
pub const CAST: KernelSource = KernelSource {
    name: "cast",
    source: include_str!("../../cuda/cast.cu"),
    kernels: &["cast_f32_to_bf16", "cast_bf16_to_f32"],
    training_path: true,
};

/// Every kernel source of the crate, in a fixed order (the compile check's table follows it).
pub const SOURCES: &[KernelSource] = &[
    EMBEDDING,
    LAYERNORM,
    GELU,
    RESIDUAL,
    BIAS,
    CLASSIFIER,
    ATTENTION,
    ADAMW,
    NORM,
    CAST,
    FLASH_ATTENTION,
    GEMM,
];

/// Fused causal flash attention (bf16 tensor cores, head sizes 64 and 128): forward (O and the row
/// logsumexp), and the deterministic two-pass backward (dQ with delta = rowsum(dO * O), then dK and dV).
pub const FLASH_ATTENTION: KernelSource = KernelSource {
    name: "flash_attention",
    source: include_str!("../../cuda/flash_attention.cu"),
    kernels: &[
        "flash_attn_fwd_hs64",
        "flash_attn_bwd_dq_hs64",
        "flash_attn_bwd_dkdv_hs64",
        "flash_attn_fwd_hs128",
        "flash_attn_bwd_dq_hs128",
        "flash_attn_bwd_dkdv_hs128",
    ],
    training_path: true,
};

/// The hand-written tensor-core GEMM `C = A . B^T (+ bias) (-> GELU)` (bf16 in, fp32 accumulate, bf16 or fp32
/// out): `mma.sync` + `ldmatrix`, 4-stage `cp.async` pipeline, swizzled shared memory.
pub const GEMM: KernelSource = KernelSource {
    name: "gemm",
    source: include_str!("../../cuda/gemm.cu"),
    kernels: &["gemm_bf16_tn_bf16", "gemm_bf16_tn_f32"],
    training_path: true,
};
