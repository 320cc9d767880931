//! Export to and import from the Hugging Face GPT-2 layout (`transformers`' `GPT2LMHeadModel`).
//!
//! A Hugging Face GPT-2 directory holds `config.json` (a `GPT2Config`) and `model.safetensors`.
//! Its tensor names are ours with `.weight` added to the embeddings (`wte.weight`,
//! `wpe.weight`); its linear layers are `Conv1D`s whose weights are stored `[in, out]`
//! (`y = x · W + b`), the transpose of our `[out, in]`. The LM head is tied to `wte` and not
//! stored.

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use crate::checkpoint::{io, le_f32, parameter_shapes, serialize_f32, write_synced};
use crate::error::{EngineError, Result};
use crate::model::GptConfig;
use crate::pipeline::{HostTensor, TensorMap};

/// The weights file of a Hugging Face model directory.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";
/// The config file of a Hugging Face model directory.
pub const HF_CONFIG_FILE: &str = "config.json";

/// The tied LM head: ours is a copy of `wte`; Hugging Face does not store it.
const LM_HEAD: &str = "lm_head.weight";

/// Our name → the Hugging Face name.
fn hf_name(ours: &str) -> String {
    match ours {
        "wte" | "wpe" => format!("{ours}.weight"),
        _ => ours.to_string(),
    }
}

/// Whether our tensor `name` is a linear weight (stored transposed by Hugging Face's Conv1D).
fn is_linear_weight(name: &str) -> bool {
    name.starts_with("h.")
        && [
            ".attn.c_attn.weight",
            ".attn.c_proj.weight",
            ".mlp.c_fc.weight",
            ".mlp.c_proj.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// The `config.json` of a Hugging Face GPT-2 with `model`'s sizes.
fn hf_config(model: &GptConfig) -> Value {
    let special = if model.vocab_size >= 50257 {
        50256
    } else {
        model.vocab_size - 1
    };
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.max_seq,
        "n_ctx": model.max_seq,
        "n_embd": model.d_model,
        "n_layer": model.layers,
        "n_head": model.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": baton_kernels::cpu::LAYERNORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "bos_token_id": special,
        "eos_token_id": special,
        "torch_dtype": "float32",
    })
}

/// Writes `out/model.safetensors` (F32, Hugging Face GPT-2 tensor names, Conv1D orientation) and
/// `out/config.json`, creating `out` if needed.
///
/// `params` must hold every parameter of `model` under our global names with our shapes (as
/// [`crate::Pipeline::parameters`] or a checkpoint gives them); the tied `lm_head.weight` is not
/// written (Hugging Face ties it to `wte.weight`).
pub fn export_hf(params: &TensorMap, model: &GptConfig, out: &Path) -> Result<()> {
    model.validate()?;
    let fail = |reason: String| EngineError::Checkpoint {
        path: out.display().to_string(),
        reason,
    };
    let mut tensors = TensorMap::new();
    for (name, shape) in parameter_shapes(model) {
        if name == LM_HEAD {
            continue;
        }
        let t = params
            .get(&name)
            .ok_or_else(|| fail(format!("cannot export: missing tensor `{name}`")))?;
        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(fail(format!(
                "cannot export: tensor `{name}` has shape {:?} ({} elements), the model expects {shape:?}",
                t.shape,
                t.data.len()
            )));
        }
        let t = if is_linear_weight(&name) {
            HostTensor {
                shape: vec![shape[1], shape[0]],
                data: transpose(&t.data, shape[0], shape[1]),
            }
        } else {
            t.clone()
        };
        tensors.insert(hf_name(&name), t);
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let weights = out.join(HF_WEIGHTS_FILE);
    let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let bytes = serialize_f32(&tensors, Some(metadata)).map_err(|reason| EngineError::Checkpoint {
        path: weights.display().to_string(),
        reason,
    })?;
    write_synced(&weights, &bytes)?;
    let config = out.join(HF_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&hf_config(model)).map_err(|e| EngineError::Checkpoint {
        path: config.display().to_string(),
        reason: format!("cannot encode: {e}"),
    })?;
    write_synced(&config, format!("{text}\n").as_bytes())
}

/// Reads `dir/config.json` into a model config, refusing GPT-2 variants the engine does not
/// compute.
fn read_hf_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join(HF_CONFIG_FILE);
    let fail = |reason: String| EngineError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| fail(format!("invalid JSON: {e}")))?;
    let size = |key: &str| -> Result<usize> {
        let v = cfg.get(key).ok_or_else(|| fail(format!("missing key `{key}`")))?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| fail(format!("`{key}` = {v} is not a non-negative integer")))
    };
    let model = GptConfig {
        vocab_size: size("vocab_size")?,
        max_seq: size("n_positions")?,
        layers: size("n_layer")?,
        d_model: size("n_embd")?,
        heads: size("n_head")?,
    };
    model.validate().map_err(|e| fail(format!("unsupported model: {e}")))?;
    match cfg.get("activation_function") {
        None => {}
        Some(Value::String(s)) if s == "gelu_new" || s == "gelu_pytorch_tanh" => {}
        Some(v) => {
            return Err(fail(format!(
                "activation_function {v} is not supported: the engine computes the tanh GELU \
                 (\"gelu_new\" or \"gelu_pytorch_tanh\")"
            )))
        }
    }
    match cfg.get("n_inner") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(4 * model.d_model as u64) => {}
        Some(v) => {
            return Err(fail(format!(
                "n_inner = {v} is not supported: the MLP width must be 4 * n_embd = {}",
                4 * model.d_model
            )))
        }
    }
    if let Some(v) = cfg.get("layer_norm_epsilon") {
        let eps = baton_kernels::cpu::LAYERNORM_EPS;
        match v.as_f64() {
            Some(x) if (x - eps).abs() <= eps * 1e-3 => {}
            _ => {
                return Err(fail(format!(
                    "layer_norm_epsilon = {v} is not supported: the engine uses {eps:e}"
                )))
            }
        }
    }
    if cfg.get("scale_attn_weights") == Some(&Value::Bool(false)) {
        return Err(fail("scale_attn_weights = false is not supported".into()));
    }
    if cfg.get("scale_attn_by_inverse_layer_idx") == Some(&Value::Bool(true)) {
        return Err(fail("scale_attn_by_inverse_layer_idx = true is not supported".into()));
    }
    if cfg.get("tie_word_embeddings") == Some(&Value::Bool(false)) {
        return Err(fail(
            "tie_word_embeddings = false is not supported: the engine ties the LM head to wte".into(),
        ));
    }
    Ok(model)
}

/// Whether a Hugging Face tensor name (without `transformer.`) is a causal-mask buffer.
fn is_mask_buffer(name: &str) -> bool {
    name.starts_with("h.") && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"))
}

/// Decodes a floating-point tensor to F32.
fn to_f32(name: &str, view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => le_f32(bytes),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"
            ))
        }
    })
}

/// Reads a Hugging Face GPT-2 directory (config.json + model.safetensors; F32, F16 or BF16;
/// names with or without the `transformer.` prefix; the causal-mask buffers `h.{i}.attn.bias` /
/// `attn.masked_bias`, if present, are ignored) into our names and orientation.
///
/// The returned map holds every parameter of the returned model, including `lm_head.weight` (a
/// copy of `wte`), so it can be given to [`crate::Pipeline::load`] as it is. A stored
/// `lm_head.weight` is ignored (the head is tied); any other unknown tensor is an error.
pub fn import_hf(dir: &Path) -> Result<(GptConfig, TensorMap)> {
    let model = read_hf_config(dir)?;
    let path = dir.join(HF_WEIGHTS_FILE);
    let fail = |reason: String| EngineError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;

    let shapes = parameter_shapes(&model);
    let wanted: std::collections::BTreeSet<String> = shapes.iter().map(|(n, _)| hf_name(n)).collect();
    let mut stored: std::collections::BTreeMap<String, TensorView<'_>> = std::collections::BTreeMap::new();
    for (raw, view) in st.iter() {
        let name = raw.strip_prefix("transformer.").unwrap_or(raw);
        if is_mask_buffer(name) || name == LM_HEAD {
            continue;
        }
        if !wanted.contains(name) {
            return Err(fail(format!(
                "unexpected tensor `{raw}` for a GPT-2 with {} layers",
                model.layers
            )));
        }
        if stored.insert(name.to_string(), view).is_some() {
            return Err(fail(format!(
                "tensor `{name}` is stored twice (with and without `transformer.`)"
            )));
        }
    }

    let mut params = TensorMap::new();
    for (name, shape) in shapes {
        if name == LM_HEAD {
            continue;
        }
        let key = hf_name(&name);
        let view = stored
            .get(&key)
            .ok_or_else(|| fail(format!("missing tensor `{key}`")))?;
        let linear = is_linear_weight(&name);
        let file_shape = if linear {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        if view.shape() != file_shape.as_slice() {
            return Err(fail(format!(
                "tensor `{key}` has shape {:?}, expected {file_shape:?} for this config",
                view.shape()
            )));
        }
        let data = to_f32(&key, view).map_err(&fail)?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(fail(format!(
                "tensor `{key}` holds {} values for shape {file_shape:?}",
                data.len()
            )));
        }
        let data = if linear {
            transpose(&data, shape[1], shape[0])
        } else {
            data
        };
        params.insert(name, HostTensor { shape, data });
    }
    let head = params
        .get("wte")
        .cloned()
        .ok_or_else(|| fail("missing tensor `wte.weight`".into()))?;
    params.insert(LM_HEAD.to_string(), head);
    Ok((model, params))
}
