//! Hugging Face GPT-2 export/import: exact tensor names, shapes and Conv1D orientation; the
//! `config.json` keys; a bitwise round trip; `transformer.`-prefixed F16/BF16 files with mask
//! buffers; errors that name the file and the tensor.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use baton_engine::checkpoint::parameter_shapes;
use baton_engine::data::Batch;
use baton_engine::export::{export_hf, import_hf};
use baton_engine::pipeline::{HostTensor, TensorMap};
use baton_engine::{Cpu, EngineError, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

const C: usize = 16;

fn model() -> GptConfig {
    GptConfig {
        vocab_size: 29,
        max_seq: 8,
        layers: 2,
        d_model: C,
        heads: 2,
    }
}

/// A 2-stage pipeline trained one step, so that no tensor is at its initial value.
fn trained() -> Pipeline<Cpu> {
    let mut cfg = PipelineConfig::new(model(), 2, ScheduleKind::OneFOneB, 2);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = 2;
    let mut pipe = Pipeline::new(cfg, vec![Cpu; 2]).unwrap();
    let inputs: Vec<u32> = (0..4 * 8).map(|i| (i * 7 + 3) % 29).collect();
    let targets: Vec<u32> = (0..4 * 8).map(|i| (i * 5 + 1) % 29).collect();
    pipe.train_step(&Batch {
        inputs,
        targets,
        batch: 4,
        seq: 8,
    })
    .unwrap();
    pipe
}

fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn checkpoint_error<T: std::fmt::Debug>(r: baton_engine::Result<T>) -> (String, String) {
    match r {
        Err(EngineError::Checkpoint { path, reason }) => (path, reason),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

/// Writes `dir/config.json` and `dir/model.safetensors` from (name, dtype, shape, bytes).
fn write_hf(dir: &Path, config: &Value, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), serde_json::to_string(config).unwrap()).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, Some(meta)).unwrap(),
    )
    .unwrap();
}

/// The tensors of an exported directory, as (name, dtype, shape, bytes).
fn read_hf(dir: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = read_file(&dir.join("model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn exported() -> (Pipeline<Cpu>, TensorMap, tempfile::TempDir) {
    let pipe = trained();
    let params = pipe.parameters().unwrap();
    let dir = tempfile::tempdir().unwrap();
    export_hf(&params, &model(), dir.path()).unwrap();
    (pipe, params, dir)
}

#[test]
fn exported_names_and_shapes_are_hugging_faces() {
    let (_, _, dir) = exported();
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("wte.weight".into(), vec![29, C]),
        ("wpe.weight".into(), vec![8, C]),
        ("ln_f.weight".into(), vec![C]),
        ("ln_f.bias".into(), vec![C]),
    ];
    for i in 0..2 {
        expected.extend([
            (format!("h.{i}.ln_1.weight"), vec![C]),
            (format!("h.{i}.ln_1.bias"), vec![C]),
            (format!("h.{i}.attn.c_attn.weight"), vec![C, 3 * C]),
            (format!("h.{i}.attn.c_attn.bias"), vec![3 * C]),
            (format!("h.{i}.attn.c_proj.weight"), vec![C, C]),
            (format!("h.{i}.attn.c_proj.bias"), vec![C]),
            (format!("h.{i}.ln_2.weight"), vec![C]),
            (format!("h.{i}.ln_2.bias"), vec![C]),
            (format!("h.{i}.mlp.c_fc.weight"), vec![C, 4 * C]),
            (format!("h.{i}.mlp.c_fc.bias"), vec![4 * C]),
            (format!("h.{i}.mlp.c_proj.weight"), vec![4 * C, C]),
            (format!("h.{i}.mlp.c_proj.bias"), vec![C]),
        ]);
    }
    expected.sort();
    let got: Vec<(String, Vec<usize>)> = read_hf(dir.path())
        .into_iter()
        .map(|(n, d, s, _)| {
            assert_eq!(d, Dtype::F32, "{n}");
            (n, s)
        })
        .collect();
    assert_eq!(got, expected);
    let bytes = read_file(&dir.path().join("model.safetensors"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
}

#[test]
fn linear_weights_are_stored_transposed() {
    let (_, params, dir) = exported();
    let file: HashMap<String, (Vec<usize>, Vec<f32>)> = read_hf(dir.path())
        .into_iter()
        .map(|(n, _, s, b)| (n, (s, f32s(&b))))
        .collect();
    for name in [
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_proj.weight",
        "h.1.mlp.c_fc.weight",
        "h.1.mlp.c_proj.weight",
    ] {
        let ours = &params[name];
        let (out, inp) = (ours.shape[0], ours.shape[1]);
        let (shape, data) = &file[name];
        assert_eq!(shape, &vec![inp, out], "{name}");
        for o in 0..out {
            for i in 0..inp {
                assert_eq!(
                    ours.data[o * inp + i].to_bits(),
                    data[i * out + o].to_bits(),
                    "{name}[{o}][{i}]"
                );
            }
        }
    }
    // Everything else is stored as it is.
    for (ours, theirs) in [
        ("wte", "wte.weight"),
        ("wpe", "wpe.weight"),
        ("h.1.ln_2.bias", "h.1.ln_2.bias"),
    ] {
        assert_eq!(bits(&params[ours].data), bits(&file[theirs].1), "{ours}");
    }
}

#[test]
fn config_json_is_a_gpt2_config() {
    let (_, _, dir) = exported();
    let cfg: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let expect = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 29,
        "n_positions": 8,
        "n_ctx": 8,
        "n_embd": 16,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "bos_token_id": 28,
        "eos_token_id": 28,
        "torch_dtype": "float32",
    });
    for (key, value) in expect.as_object().unwrap() {
        assert_eq!(cfg.get(key), Some(value), "config.json `{key}`");
    }

    // GPT-2's vocabulary: the special token is <|endoftext|> = 50256.
    let big = GptConfig {
        vocab_size: 50257,
        max_seq: 2,
        layers: 1,
        d_model: 2,
        heads: 1,
    };
    let params: TensorMap = parameter_shapes(&big)
        .into_iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (
                n,
                HostTensor {
                    shape: s,
                    data: vec![0.5; len],
                },
            )
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    export_hf(&params, &big, out.path()).unwrap();
    let cfg: Value = serde_json::from_str(&fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["bos_token_id"], 50256);
    assert_eq!(cfg["eos_token_id"], 50256);
}

#[test]
fn round_trip_is_bitwise_and_loads_into_a_pipeline() {
    let (mut pipe, params, dir) = exported();
    let (cfg, back) = import_hf(dir.path()).unwrap();
    assert_eq!(cfg, model());
    assert_eq!(back.keys().collect::<Vec<_>>(), params.keys().collect::<Vec<_>>());
    for (name, t) in &params {
        assert_eq!(back[name].shape, t.shape, "{name}");
        assert_eq!(bits(&back[name].data), bits(&t.data), "{name}");
    }
    // The imported weights drive a fresh pipeline (other split, other seed) to the same logits.
    let mut pc = PipelineConfig::new(cfg, 3, ScheduleKind::OneFOneB, 1);
    pc.seed = 5;
    let mut other = Pipeline::new(pc, vec![Cpu; 3]).unwrap();
    other.load(&back, None).unwrap();
    let tokens = [1, 2, 3, 4, 5];
    assert_eq!(
        bits(&other.logits(&tokens).unwrap()),
        bits(&pipe.logits(&tokens).unwrap())
    );
    // Without the tied copy, too.
    let mut no_head = back.clone();
    no_head.remove("lm_head.weight");
    other.load(&no_head, None).unwrap();
}

#[test]
fn import_reads_prefixed_half_precision_files() {
    let (_, params, dir) = exported();
    let cfg: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let tensors = read_hf(dir.path());
    type Round = fn(f32) -> (f32, [u8; 2]);
    let f16: Round = |x| {
        let h = half::f16::from_f32(x);
        (h.to_f32(), h.to_le_bytes())
    };
    let bf16: Round = |x| {
        let h = half::bf16::from_f32(x);
        (h.to_f32(), h.to_le_bytes())
    };
    for (dtype, round, rel) in [(Dtype::F16, f16, 1.0 / 2048.0), (Dtype::BF16, bf16, 1.0 / 256.0)] {
        let mut file = Vec::new();
        for (n, _, s, b) in &tensors {
            let bytes: Vec<u8> = f32s(b).into_iter().flat_map(|x| round(x).1).collect();
            file.push((format!("transformer.{n}"), dtype, s.clone(), bytes));
        }
        // The causal-mask buffers and a stored LM head, as transformers may save them.
        for i in 0..2 {
            let mask: Vec<u8> = (0..64).map(|k| u8::from(k % 8 <= k / 8)).collect();
            file.push((
                format!("transformer.h.{i}.attn.bias"),
                Dtype::U8,
                vec![1, 1, 8, 8],
                mask,
            ));
            file.push((
                format!("transformer.h.{i}.attn.masked_bias"),
                Dtype::F32,
                vec![],
                (-1e4f32).to_le_bytes().to_vec(),
            ));
        }
        let head = tensors.iter().find(|t| t.0 == "wte.weight").unwrap();
        let head_bytes: Vec<u8> = f32s(&head.3).into_iter().flat_map(|x| round(x).1).collect();
        file.push(("lm_head.weight".into(), dtype, head.2.clone(), head_bytes));

        let out = tempfile::tempdir().unwrap();
        write_hf(out.path(), &cfg, &file);
        let (model_cfg, back) = import_hf(out.path()).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        assert_eq!(model_cfg, model());
        assert_eq!(back.len(), params.len());
        for (name, t) in &params {
            let got = &back[name];
            assert_eq!(got.shape, t.shape, "{dtype:?} {name}");
            for (k, (x, y)) in t.data.iter().zip(&got.data).enumerate() {
                assert_eq!(
                    round(*x).0.to_bits(),
                    y.to_bits(),
                    "{dtype:?} {name}[{k}]: not the rounded value"
                );
                assert!(
                    (x - y).abs() <= rel * x.abs() + 1e-7,
                    "{dtype:?} {name}[{k}]: {x} vs {y}"
                );
            }
        }
        assert_eq!(bits(&back["lm_head.weight"].data), bits(&back["wte"].data));
    }
}

#[test]
fn bad_directories_are_refused_naming_the_file_and_tensor() {
    let (_, _, dir) = exported();
    let cfg: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let tensors = read_hf(dir.path());
    let scratch = tempfile::tempdir().unwrap();
    let case = |name: &str, cfg: &Value, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]| {
        let d = scratch.path().join(name);
        write_hf(&d, cfg, tensors);
        d
    };

    // No config.json.
    let d = case("no-config", &cfg, &tensors);
    fs::remove_file(d.join("config.json")).unwrap();
    match import_hf(&d) {
        Err(EngineError::Io { path, .. }) => assert!(path.ends_with("config.json"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // No model.safetensors.
    let d = case("no-weights", &cfg, &tensors);
    fs::remove_file(d.join("model.safetensors")).unwrap();
    match import_hf(&d) {
        Err(EngineError::Io { path, .. }) => assert!(path.ends_with("model.safetensors"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // A missing tensor.
    let fewer: Vec<_> = tensors.iter().filter(|t| t.0 != "h.1.mlp.c_fc.bias").cloned().collect();
    let (path, reason) = checkpoint_error(import_hf(&case("missing", &cfg, &fewer)));
    assert!(path.ends_with("model.safetensors"), "{path}");
    assert!(reason.contains("missing tensor `h.1.mlp.c_fc.bias`"), "{reason}");
    // A weight in our orientation instead of Conv1D's.
    let mut wrong = tensors.clone();
    wrong.iter_mut().find(|t| t.0 == "h.0.mlp.c_fc.weight").unwrap().2 = vec![4 * C, C];
    let (path, reason) = checkpoint_error(import_hf(&case("shape", &cfg, &wrong)));
    assert!(path.ends_with("model.safetensors"), "{path}");
    assert!(
        reason.contains("`h.0.mlp.c_fc.weight` has shape [64, 16], expected [16, 64]"),
        "{reason}"
    );
    // An integer dtype.
    let mut ints = tensors.clone();
    ints.iter_mut().find(|t| t.0 == "ln_f.bias").unwrap().1 = Dtype::I32;
    let (_, reason) = checkpoint_error(import_hf(&case("dtype", &cfg, &ints)));
    assert!(reason.contains("`ln_f.bias` has dtype I32"), "{reason}");
    // A tensor of a third layer.
    let mut extra = tensors.clone();
    extra.push(("h.2.ln_1.weight".into(), Dtype::F32, vec![C], vec![0; 4 * C]));
    let (_, reason) = checkpoint_error(import_hf(&case("extra", &cfg, &extra)));
    assert!(reason.contains("unexpected tensor `h.2.ln_1.weight`"), "{reason}");
    // Not a safetensors file.
    let d = case("garbage", &cfg, &tensors);
    fs::write(d.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let (path, _) = checkpoint_error(import_hf(&d));
    assert!(path.ends_with("model.safetensors"), "{path}");

    // Config values the engine does not compute.
    let with = |key: &str, value: Value| {
        let mut c = cfg.clone();
        c[key] = value;
        c
    };
    for (key, value, needle) in [
        ("activation_function", json!("relu"), "activation_function"),
        ("activation_function", json!("gelu"), "activation_function"),
        ("n_inner", json!(32), "n_inner"),
        ("layer_norm_epsilon", json!(1e-6), "layer_norm_epsilon"),
        ("n_embd", json!("sixteen"), "n_embd"),
        ("n_head", json!(3), "heads"),
        ("tie_word_embeddings", json!(false), "tie_word_embeddings"),
    ] {
        let (path, reason) = checkpoint_error(import_hf(&case("cfg", &with(key, value.clone()), &tensors)));
        assert!(path.ends_with("config.json"), "{key}={value}: {path}");
        assert!(reason.contains(needle), "{key}={value}: {reason}");
    }
    let mut no_layers = cfg.clone();
    no_layers.as_object_mut().unwrap().remove("n_layer");
    let (_, reason) = checkpoint_error(import_hf(&case("cfg", &no_layers, &tensors)));
    assert!(reason.contains("missing key `n_layer`"), "{reason}");
    fs::write(scratch.path().join("cfg/config.json"), "{").unwrap();
    let (_, reason) = checkpoint_error(import_hf(&scratch.path().join("cfg")));
    assert!(reason.contains("invalid JSON"), "{reason}");

    // Accepted variants: the other tanh-GELU name, an explicit 4·n_embd MLP, keys absent.
    for c in [
        with("activation_function", json!("gelu_pytorch_tanh")),
        with("n_inner", json!(4 * C)),
    ] {
        import_hf(&case("ok", &c, &tensors)).unwrap();
    }
    let mut bare = cfg.clone();
    for key in [
        "activation_function",
        "n_inner",
        "layer_norm_epsilon",
        "tie_word_embeddings",
    ] {
        bare.as_object_mut().unwrap().remove(key);
    }
    import_hf(&case("ok", &bare, &tensors)).unwrap();
}

#[test]
fn export_refuses_incomplete_parameters() {
    let pipe = trained();
    let mut params = pipe.parameters().unwrap();
    let out = tempfile::tempdir().unwrap();
    params.get_mut("h.1.attn.c_attn.bias").unwrap().shape = vec![3, C];
    let (_, reason) = checkpoint_error(export_hf(&params, &model(), out.path()));
    assert!(reason.contains("`h.1.attn.c_attn.bias` has shape [3, 16]"), "{reason}");
    params.remove("h.1.attn.c_attn.bias");
    let (_, reason) = checkpoint_error(export_hf(&params, &model(), out.path()));
    assert!(reason.contains("missing tensor `h.1.attn.c_attn.bias`"), "{reason}");
    // The tied copy is not needed.
    let mut params = pipe.parameters().unwrap();
    params.remove("lm_head.weight");
    export_hf(&params, &model(), out.path()).unwrap();
}

/// The Python side of [`transformers_agrees_both_ways`]: runs our export through
/// `GPT2LMHeadModel`, and saves a randomly initialised `GPT2LMHeadModel` for us to import.
const TRANSFORMERS_CHECK: &str = r#"
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
d = sys.argv[1]
toks = torch.tensor([json.load(open(d + "/tokens.json"))])
ours = GPT2LMHeadModel.from_pretrained(d + "/ours").eval()
with torch.no_grad():
    json.dump(ours(toks).logits[0].reshape(-1).tolist(), open(d + "/ours_logits.json", "w"))
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=29, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=28, eos_token_id=28)
theirs = GPT2LMHeadModel(cfg).eval()
with torch.no_grad():
    for _, p in theirs.named_parameters():
        p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(d + "/theirs")
    json.dump(theirs(toks).logits[0].reshape(-1).tolist(), open(d + "/theirs_logits.json", "w"))
"#;

/// Cross-checks with Hugging Face `transformers` when `BATON_TRANSFORMERS_PYTHON` names a Python
/// that has `transformers` and `torch` (skipped otherwise): the logits of our export computed by
/// `GPT2LMHeadModel` equal ours, and a model saved by `save_pretrained` imports to the same
/// logits in our pipeline (to f32 rounding: the kernels differ). Run with
/// `BATON_TRANSFORMERS_PYTHON=/path/to/python cargo test -p baton-engine --test export -- --ignored`.
#[test]
#[ignore = "needs a Python with transformers and torch (BATON_TRANSFORMERS_PYTHON)"]
fn transformers_agrees_both_ways() {
    let python = std::env::var("BATON_TRANSFORMERS_PYTHON")
        .expect("set BATON_TRANSFORMERS_PYTHON to a Python with transformers and torch");
    let (mut pipe, params, _) = exported();
    let work = tempfile::tempdir().unwrap();
    export_hf(&params, &model(), &work.path().join("ours")).unwrap();
    let tokens: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    fs::write(work.path().join("tokens.json"), serde_json::to_string(&tokens).unwrap()).unwrap();
    let status = std::process::Command::new(python)
        .args(["-c", TRANSFORMERS_CHECK])
        .arg(work.path())
        .status()
        .unwrap();
    assert!(status.success(), "the transformers script failed");
    let read = |name: &str| -> Vec<f32> {
        serde_json::from_str(&fs::read_to_string(work.path().join(name)).unwrap()).unwrap()
    };
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{what}: logits differ by up to {worst}");
    };
    close(
        &read("ours_logits.json"),
        &pipe.logits(&tokens).unwrap(),
        "our export in transformers",
    );

    let (cfg, theirs) = import_hf(&work.path().join("theirs")).unwrap();
    assert_eq!(cfg, model());
    let mut other = Pipeline::new(PipelineConfig::new(cfg, 2, ScheduleKind::OneFOneB, 1), vec![Cpu; 2]).unwrap();
    other.load(&theirs, None).unwrap();
    close(
        &read("theirs_logits.json"),
        &other.logits(&tokens).unwrap(),
        "transformers' model in ours",
    );
}
