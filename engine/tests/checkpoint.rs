//! Checkpoints: a save/load round trip resumes training bitwise; a checkpoint saved with 4 stages
//! loads into 2 or 3 stages (1F1B and ZB-H1) and continues bitwise like the uninterrupted run;
//! corrupt, truncated, incomplete or mismatched checkpoints are refused with errors naming the
//! file and the tensor; `latest` picks the newest complete step.

mod common;

use std::fs;
use std::path::Path;

use baton_engine::checkpoint::{self, parameter_shapes, FileEntry, Manifest, FORMAT_VERSION};
use baton_engine::data::{Batch, LoaderState, TokenizerKind};
use baton_engine::pipeline::TensorMap;
use baton_engine::{Cpu, EngineError, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

const STEPS: usize = 4;
const SAVE_AT: usize = 2;
const SEQ: usize = common::SEQ;
const MICRO: u32 = 4;

fn model() -> GptConfig {
    GptConfig {
        vocab_size: 29,
        max_seq: SEQ,
        layers: 4,
        d_model: 16,
        heads: 2,
    }
}

/// Deterministic pseudo-random batches, different per step.
fn batches() -> Vec<Batch> {
    common::batches(STEPS)
}

fn config(model: GptConfig, stages: u32, kind: ScheduleKind) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(model, stages, kind, MICRO);
    cfg.optimizer.total_steps = STEPS as u64;
    cfg.optimizer.warmup_steps = 1;
    cfg
}

fn pipeline(stages: u32, kind: ScheduleKind) -> Pipeline<Cpu> {
    Pipeline::new(config(model(), stages, kind), vec![Cpu; stages as usize]).unwrap()
}

fn train(pipe: &mut Pipeline<Cpu>, batches: &[Batch]) -> Vec<u32> {
    batches
        .iter()
        .map(|b| pipe.train_step(b).unwrap().loss.to_bits())
        .collect()
}

fn assert_maps_bitwise(a: &TensorMap, b: &TensorMap, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.shape, tb.shape, "{what}: {name} shape");
        let diff = ta
            .data
            .iter()
            .zip(&tb.data)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(diff.is_none(), "{what}: {name} differs at element {diff:?}");
    }
}

fn loader() -> Option<LoaderState> {
    Some(LoaderState {
        seed: 7,
        epoch: 1,
        cursor: 42,
    })
}

/// The uninterrupted 4-stage run: losses of all steps, and a checkpoint saved after `SAVE_AT`.
struct Reference {
    losses: Vec<u32>,
    params: TensorMap,
    _root: tempfile::TempDir,
    dir: std::path::PathBuf,
}

fn reference() -> Reference {
    let root = tempfile::tempdir().unwrap();
    let data = batches();
    let mut pipe = pipeline(4, ScheduleKind::OneFOneB);
    let mut losses = train(&mut pipe, &data[..SAVE_AT]);
    let dir = checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, loader()).unwrap();
    losses.extend(train(&mut pipe, &data[SAVE_AT..]));
    Reference {
        losses,
        params: pipe.parameters().unwrap(),
        _root: root,
        dir,
    }
}

fn resume(ckpt: &checkpoint::Checkpoint, stages: u32, kind: ScheduleKind) -> (Vec<u32>, TensorMap) {
    let mut cfg = config(model(), stages, kind);
    cfg.seed = 99; // different initial weights: everything must come from the checkpoint
    let mut pipe = Pipeline::new(cfg, vec![Cpu; stages as usize]).unwrap();
    pipe.load(&ckpt.params, Some((&ckpt.adam_m, &ckpt.adam_v))).unwrap();
    pipe.set_step(ckpt.manifest.step);
    let losses = train(&mut pipe, &batches()[SAVE_AT..]);
    (losses, pipe.parameters().unwrap())
}

fn checkpoint_error(result: baton_engine::Result<checkpoint::Checkpoint>) -> (String, String) {
    match result {
        Err(EngineError::Checkpoint { path, reason }) => (path, reason),
        Err(other) => panic!("expected a checkpoint error, got {other}"),
        Ok(c) => panic!("expected an error, loaded {}", c.dir.display()),
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn read_manifest(dir: &Path) -> Manifest {
    serde_json::from_str(&fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, manifest: &Manifest) {
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(manifest).unwrap(),
    )
    .unwrap();
}

/// Rewrites stage file `file` of the checkpoint at `dir` through `edit` (name → (dtype, shape,
/// bytes)) and fixes its manifest entry, so only the content is wrong.
fn rewrite_stage_file(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join(file);
    let bytes = fs::read(&path).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let new = safetensors::serialize(views, None).unwrap();
    fs::write(&path, &new).unwrap();
    let mut manifest = read_manifest(dir);
    let entry: &mut FileEntry = manifest.files.iter_mut().find(|f| f.name == file).unwrap();
    entry.sha256 = sha_hex(&new);
    entry.bytes = new.len() as u64;
    write_manifest(dir, &manifest);
}

/// Copies a checkpoint directory (flat) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Which stage file holds tensor `name`.
fn file_holding(dir: &Path, name: &str) -> String {
    let manifest = read_manifest(dir);
    manifest
        .files
        .iter()
        .find(|f| {
            let bytes = fs::read(dir.join(&f.name)).unwrap();
            SafeTensors::deserialize(&bytes).unwrap().tensor(name).is_ok()
        })
        .map(|f| f.name.clone())
        .unwrap()
}

#[test]
fn parameter_shapes_match_the_pipeline() {
    let pipe = pipeline(3, ScheduleKind::OneFOneB);
    let params = pipe.parameters().unwrap();
    let shapes = parameter_shapes(&model());
    assert_eq!(shapes.len(), params.len());
    for (name, shape) in shapes {
        assert_eq!(params[&name].shape, shape, "{name}");
    }
}

#[test]
fn save_writes_stage_files_and_a_manifest() {
    let r = reference();
    assert_eq!(r.dir.file_name().unwrap(), "step-00000002");
    let m = read_manifest(&r.dir);
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.step, 2);
    let mut want = config(model(), 4, ScheduleKind::OneFOneB);
    want.split = baton_engine::StageSplit::Ranges(m.ranges.clone());
    assert_eq!(m.pipeline_config().unwrap(), want);
    assert_eq!(m.model.kind, "gpt2");
    let shapes: Vec<(String, Vec<usize>)> = m.parameters.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    let mut sorted = shapes.clone();
    sorted.sort();
    let mut expected = parameter_shapes(&model());
    expected.sort();
    assert_eq!(sorted, expected, "the manifest lists every parameter with its shape");
    assert_eq!(m.tokenizer, TokenizerKind::Bytes);
    assert_eq!(m.loader, loader());
    assert_eq!(m.ranges.len(), 4);
    let names: Vec<_> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stage-0.safetensors",
            "stage-1.safetensors",
            "stage-2.safetensors",
            "stage-3.safetensors"
        ]
    );
    for f in &m.files {
        let bytes = fs::read(r.dir.join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.bytes);
        assert_eq!(sha_hex(&bytes), f.sha256);
        for (name, view) in SafeTensors::deserialize(&bytes).unwrap().iter() {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
        }
    }
    // Global names; moments beside their parameters.
    let file = file_holding(&r.dir, "h.0.attn.c_attn.weight");
    // 1F1B places part k on stage k; block 0 is layer unit 1.
    let part = m.ranges.iter().position(|r| r.contains(&1)).unwrap();
    assert_eq!(file, format!("stage-{part}.safetensors"));
    let bytes = fs::read(r.dir.join(&file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in [
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_attn.weight.adam_m",
        "h.0.attn.c_attn.weight.adam_v",
    ] {
        assert_eq!(st.tensor(name).unwrap().shape(), [48, 16], "{name}");
    }
    // Nothing left behind in the root but the checkpoint and the pointer to it.
    let mut entries: Vec<_> = fs::read_dir(r.dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, ["latest", "step-00000002"]);
    assert_eq!(
        fs::read_to_string(r.dir.parent().unwrap().join("latest"))
            .unwrap()
            .trim(),
        "step-00000002"
    );

    let ckpt = checkpoint::load(&r.dir).unwrap();
    assert_eq!(ckpt.manifest, m);
    assert_eq!(ckpt.params.len(), parameter_shapes(&model()).len());
    assert_eq!(ckpt.adam_m.len(), ckpt.params.len());
    assert_eq!(ckpt.adam_v.len(), ckpt.params.len());
}

#[test]
fn resume_continues_bitwise() {
    let r = reference();
    assert!(r.losses[SAVE_AT] != r.losses[SAVE_AT - 1], "training moves the loss");
    let ckpt = checkpoint::load(&r.dir).unwrap();
    let (losses, params) = resume(&ckpt, 4, ScheduleKind::OneFOneB);
    assert_eq!(losses, r.losses[SAVE_AT..], "resumed losses differ");
    assert_maps_bitwise(&params, &r.params, "resumed parameters");
    // Loading the root picks the newest checkpoint under it.
    let by_root = checkpoint::load(r.dir.parent().unwrap()).unwrap();
    assert_eq!(by_root.dir, r.dir);
}

#[test]
fn resharding_continues_bitwise() {
    let r = reference();
    let ckpt = checkpoint::load(&r.dir).unwrap();
    for (stages, kind) in [
        (2, ScheduleKind::OneFOneB),
        (3, ScheduleKind::OneFOneB),
        (1, ScheduleKind::OneFOneB),
        (2, ScheduleKind::ZbH1),
        (3, ScheduleKind::ZbH1),
    ] {
        let (losses, params) = resume(&ckpt, stages, kind);
        assert_eq!(losses, r.losses[SAVE_AT..], "{kind} p={stages}: losses differ");
        assert_maps_bitwise(&params, &r.params, &format!("{kind} p={stages}"));
    }
    // And back: a 3-stage ZB-H1 checkpoint loads into 4-stage 1F1B.
    let root = tempfile::tempdir().unwrap();
    let data = batches();
    let mut three = pipeline(3, ScheduleKind::ZbH1);
    let first = train(&mut three, &data[..SAVE_AT]);
    assert_eq!(first, r.losses[..SAVE_AT]);
    let dir = checkpoint::save(root.path(), &three, TokenizerKind::Gpt2, None).unwrap();
    let ckpt = checkpoint::load(&dir).unwrap();
    assert_eq!(ckpt.manifest.files.len(), 3);
    assert_eq!(ckpt.manifest.tokenizer, TokenizerKind::Gpt2);
    assert_eq!(ckpt.manifest.loader, None);
    let (losses, _) = resume(&ckpt, 4, ScheduleKind::OneFOneB);
    assert_eq!(losses, r.losses[SAVE_AT..]);
}

#[test]
fn resave_of_the_same_step_is_refused_and_leaves_the_checkpoint_intact() {
    let root = tempfile::tempdir().unwrap();
    let mut pipe = pipeline(2, ScheduleKind::OneFOneB);
    let a = checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, None).unwrap();
    let manifest_before = fs::read(a.join("manifest.json")).unwrap();
    let before = checkpoint::load(&a).unwrap();
    train(&mut pipe, &batches()[..1]);
    pipe.set_step(0);
    let (p, reason) = match checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, loader()) {
        Err(EngineError::Checkpoint { path, reason }) => (path, reason),
        other => panic!("expected a checkpoint error, got {other:?}"),
    };
    assert!(p.ends_with("step-00000000"), "{p}");
    assert!(reason.contains("never rewritten"), "{reason}");
    assert_eq!(fs::read(a.join("manifest.json")).unwrap(), manifest_before);
    let after = checkpoint::load(&a).unwrap();
    assert_eq!(after.manifest.loader, None);
    assert_maps_bitwise(&after.params, &before.params, "left as it was");
    assert!(!root.path().join(".tmp-step-00000000").exists());
}

#[test]
fn flipped_byte_is_a_checksum_error_naming_the_file() {
    let r = reference();
    let path = r.dir.join("stage-2.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.ends_with("stage-2.safetensors"), "{p}");
    assert!(reason.contains("checksum"), "{reason}");
    let expected = &read_manifest(&r.dir).files[2].sha256;
    assert!(reason.contains(expected.as_str()), "{reason}");
    assert!(reason.contains(&sha_hex(&bytes)), "{reason}");
}

#[test]
fn truncated_file_is_refused() {
    let r = reference();
    let path = r.dir.join("stage-0.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.ends_with("stage-0.safetensors"), "{p}");
    assert!(reason.contains("bytes"), "{reason}");
    // A deleted stage file, too.
    fs::remove_file(&path).unwrap();
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.ends_with("stage-0.safetensors"), "{p}: {reason}");
}

#[test]
fn missing_manifest_is_not_a_checkpoint() {
    let r = reference();
    let root = r.dir.parent().unwrap();
    assert_eq!(checkpoint::latest(root).unwrap(), Some(r.dir.clone()));
    fs::remove_file(r.dir.join("manifest.json")).unwrap();
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.contains("step-00000002"), "{p}");
    assert!(reason.contains("manifest.json"), "{reason}");
    assert_eq!(checkpoint::latest(root).unwrap(), None);
    let (_, reason) = checkpoint_error(checkpoint::load(root));
    assert!(reason.contains("no manifest.json"), "{reason}");
    // A manifest that is not JSON, or of an unknown version, is refused too.
    fs::write(r.dir.join("manifest.json"), "{ not json").unwrap();
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(
        p.ends_with("manifest.json") && reason.contains("invalid JSON"),
        "{p}: {reason}"
    );
    assert_eq!(checkpoint::latest(root).unwrap(), None);
}

#[test]
fn unknown_format_version_is_refused() {
    let r = reference();
    let mut m = read_manifest(&r.dir);
    m.format_version = FORMAT_VERSION + 1;
    write_manifest(&r.dir, &m);
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.ends_with("manifest.json"), "{p}");
    assert!(
        reason.contains(&format!("unknown format version {}", FORMAT_VERSION + 1)),
        "{reason}"
    );
}

#[test]
fn a_version_1_manifest_still_loads() {
    let r = reference();
    let m = read_manifest(&r.dir);
    let before = checkpoint::load(&r.dir).unwrap();
    // Version 1 held the GPT-2 pipeline config inline instead of the model, parameter and schedule records.
    let v1 = serde_json::json!({
        "format_version": 1,
        "config": m.pipeline_config().unwrap(),
        "ranges": m.ranges,
        "step": m.step,
        "tokenizer": m.tokenizer,
        "loader": m.loader,
        "files": m.files,
    });
    fs::write(r.dir.join("manifest.json"), v1.to_string()).unwrap();
    let after = checkpoint::load(&r.dir).unwrap();
    assert_eq!(after.manifest.format_version, 1);
    assert_eq!(after.manifest.pipeline_config().unwrap(), m.pipeline_config().unwrap());
    assert_eq!(after.params, before.params);
    assert_eq!(after.adam_v, before.adam_v);
}

#[test]
fn missing_tensor_is_named() {
    let r = reference();
    let file = file_holding(&r.dir, "h.1.mlp.c_fc.bias.adam_v");
    rewrite_stage_file(&r.dir, &file, |t| t.retain(|(n, ..)| n != "h.1.mlp.c_fc.bias.adam_v"));
    let (_, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(reason.contains("missing tensor `h.1.mlp.c_fc.bias.adam_v`"), "{reason}");
}

#[test]
fn wrong_shape_and_dtype_are_named() {
    let r = reference();
    let scratch = tempfile::tempdir().unwrap();
    let file = file_holding(&r.dir, "h.2.attn.c_proj.weight");

    let shape_dir = scratch.path().join("shape");
    copy_dir(&r.dir, &shape_dir);
    rewrite_stage_file(&shape_dir, &file, |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "h.2.attn.c_proj.weight").unwrap();
        e.2 = vec![8, 32]; // same bytes, wrong shape
    });
    let (p, reason) = checkpoint_error(checkpoint::load(&shape_dir));
    assert!(p.ends_with(&file), "{p}");
    assert!(
        reason.contains("`h.2.attn.c_proj.weight` has shape [8, 32]"),
        "{reason}"
    );

    let dtype_dir = scratch.path().join("dtype");
    copy_dir(&r.dir, &dtype_dir);
    rewrite_stage_file(&dtype_dir, &file, |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "h.2.attn.c_proj.weight").unwrap();
        e.1 = Dtype::I32; // same bytes, wrong dtype
    });
    let (p, reason) = checkpoint_error(checkpoint::load(&dtype_dir));
    assert!(p.ends_with(&file), "{p}");
    assert!(reason.contains("`h.2.attn.c_proj.weight` has dtype I32"), "{reason}");

    let extra_dir = scratch.path().join("extra");
    copy_dir(&r.dir, &extra_dir);
    rewrite_stage_file(&extra_dir, &file, |t| {
        t.push(("h.9.ln_1.weight".into(), Dtype::F32, vec![16], vec![0; 64]));
    });
    let (_, reason) = checkpoint_error(checkpoint::load(&extra_dir));
    assert!(reason.contains("unexpected tensor `h.9.ln_1.weight`"), "{reason}");
}

#[test]
fn conflicting_copies_are_refused() {
    let r = reference();
    // Put a different copy of stage 0's `wpe` into stage 3's file.
    let bytes0 = fs::read(r.dir.join("stage-0.safetensors")).unwrap();
    let wpe = SafeTensors::deserialize(&bytes0)
        .unwrap()
        .tensor("wpe")
        .unwrap()
        .data()
        .to_vec();
    let mut same = wpe.clone();
    rewrite_stage_file(&r.dir, "stage-3.safetensors", |t| {
        t.push(("wpe".into(), Dtype::F32, vec![SEQ, 16], wpe.clone()));
    });
    checkpoint::load(&r.dir).expect("an identical copy is fine");
    same[0] ^= 1;
    rewrite_stage_file(&r.dir, "stage-3.safetensors", |t| {
        t.iter_mut().find(|(n, ..)| n == "wpe").unwrap().3 = same.clone();
    });
    let (p, reason) = checkpoint_error(checkpoint::load(&r.dir));
    assert!(p.ends_with("stage-3.safetensors"), "{p}");
    assert!(
        reason.contains("`wpe` differs from its copy in stage-0.safetensors"),
        "{reason}"
    );
}

#[test]
fn model_mismatch_names_the_missing_tensor() {
    let r = reference();
    let ckpt = checkpoint::load(&r.dir).unwrap();
    let six = GptConfig { layers: 6, ..model() };
    let mut pipe = Pipeline::new(config(six, 2, ScheduleKind::OneFOneB), vec![Cpu; 2]).unwrap();
    let before = pipe.parameters().unwrap();
    match pipe.load(&ckpt.params, Some((&ckpt.adam_m, &ckpt.adam_v))) {
        Err(EngineError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("missing tensor `h.4."), "{reason}")
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    assert_maps_bitwise(&pipe.parameters().unwrap(), &before, "nothing loaded");
}

#[test]
fn latest_picks_the_highest_complete_step() {
    let root = tempfile::tempdir().unwrap();
    assert_eq!(checkpoint::latest(root.path()).unwrap(), None);
    assert_eq!(checkpoint::latest(&root.path().join("absent")).unwrap(), None);
    let (_, reason) = checkpoint_error(checkpoint::load(root.path()));
    assert!(reason.contains("no manifest.json"), "{reason}");

    let mut pipe = pipeline(2, ScheduleKind::OneFOneB);
    let data = batches();
    let mut dirs = Vec::new();
    for b in &data[..3] {
        pipe.train_step(b).unwrap();
        dirs.push(checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, None).unwrap());
    }
    assert_eq!(checkpoint::latest(root.path()).unwrap(), Some(dirs[2].clone()));
    // An interrupted save of a later step, a later step dir without a manifest, stray files.
    let tmp = root.path().join(".tmp-step-00000009");
    copy_dir(&dirs[2], &tmp);
    fs::create_dir(root.path().join("step-00000007")).unwrap();
    fs::write(root.path().join("step-00000008"), "not a dir").unwrap();
    fs::create_dir(root.path().join("step-abc")).unwrap();
    assert_eq!(checkpoint::latest(root.path()).unwrap(), Some(dirs[2].clone()));
    // Numeric, not lexical, order; and load(root) follows latest.
    fs::remove_file(dirs[2].join("manifest.json")).unwrap();
    assert_eq!(checkpoint::latest(root.path()).unwrap(), Some(dirs[1].clone()));
    assert_eq!(checkpoint::load(root.path()).unwrap().manifest.step, 2);
    let big = root.path().join("step-100000000");
    copy_dir(&dirs[0], &big);
    assert_eq!(checkpoint::latest(root.path()).unwrap(), Some(big));
}

#[test]
fn prune_keeps_the_newest_complete_checkpoints_and_the_pointer_follows_the_newest() {
    let root = tempfile::tempdir().unwrap();
    let data = batches();
    let mut pipe = pipeline(2, ScheduleKind::OneFOneB);
    for batch in &data[..3] {
        pipe.train_step(batch).unwrap();
        checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, loader()).unwrap();
    }
    // An interrupted newer save (no manifest) must not count towards the kept ones.
    fs::create_dir(root.path().join("step-00000009")).unwrap();
    let removed = checkpoint::prune(root.path(), 2).unwrap();
    assert_eq!(removed, [root.path().join("step-00000001")]);
    assert!(root.path().join("step-00000002").join("manifest.json").is_file());
    assert_eq!(
        checkpoint::latest(root.path()).unwrap(),
        Some(root.path().join("step-00000003"))
    );
    // A stale pointer (naming a removed checkpoint) falls back to the scan.
    fs::write(root.path().join("latest"), "step-00000001\n").unwrap();
    assert_eq!(
        checkpoint::latest(root.path()).unwrap(),
        Some(root.path().join("step-00000003"))
    );
}

#[test]
fn async_save_writes_the_snapshot_taken_at_the_step_boundary() {
    let root = tempfile::tempdir().unwrap();
    let data = batches();
    let mut pipe = pipeline(4, ScheduleKind::ZbH1);
    pipe.train_step(&data[0]).unwrap();
    let at_step_1 = pipe.parameters().unwrap();
    let snap = checkpoint::snapshot(&pipe, TokenizerKind::Bytes, loader()).unwrap();
    let mut saver = checkpoint::AsyncSaver::default();
    assert_eq!(saver.submit(root.path().to_path_buf(), snap, 0).unwrap(), None);
    // Training goes on while the writer works; the checkpoint holds step 1's state.
    pipe.train_step(&data[1]).unwrap();
    let dir = saver.wait().unwrap().unwrap();
    let ckpt = checkpoint::load(&dir).unwrap();
    assert_eq!(ckpt.manifest.step, 1);
    assert_maps_bitwise(&ckpt.params, &at_step_1, "async snapshot");
}

/// The writer process is killed after its first stage file: the previous checkpoint and the
/// pointer are intact, and the half-written one is invisible.
#[test]
fn a_writer_killed_mid_way_leaves_the_previous_checkpoint_intact() {
    if std::env::var("BATON_CHILD_WRITER").is_ok() {
        // The child: save step 2 with the injected abort after one file.
        let root = std::path::PathBuf::from(std::env::var("BATON_CHILD_ROOT").unwrap());
        let data = batches();
        let mut pipe = pipeline(4, ScheduleKind::OneFOneB);
        pipe.train_step(&data[0]).unwrap();
        pipe.train_step(&data[1]).unwrap();
        checkpoint::save(&root, &pipe, TokenizerKind::Bytes, loader()).unwrap();
        unreachable!("the save aborts the process");
    }
    let root = tempfile::tempdir().unwrap();
    let data = batches();
    let mut pipe = pipeline(4, ScheduleKind::OneFOneB);
    pipe.train_step(&data[0]).unwrap();
    let good = checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, loader()).unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_writer_killed_mid_way_leaves_the_previous_checkpoint_intact",
            "--nocapture",
        ])
        .env("BATON_CHILD_WRITER", "1")
        .env("BATON_CHILD_ROOT", root.path())
        .env(checkpoint::FAIL_SAVE_ENV, "abort_after_files:1")
        .status()
        .unwrap();
    assert!(!status.success(), "the child should have been aborted");
    assert!(
        root.path()
            .join(".tmp-step-00000002")
            .join("stage-0.safetensors")
            .is_file(),
        "the writer got going"
    );
    assert!(!root.path().join("step-00000002").exists());
    assert_eq!(checkpoint::latest(root.path()).unwrap(), Some(good.clone()));
    let ckpt = checkpoint::load(root.path()).unwrap();
    assert_eq!(ckpt.manifest.step, 1);
    assert_maps_bitwise(&ckpt.params, &pipe.parameters().unwrap(), "previous checkpoint");
}

mod roundtrip {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// save → load gives back every tensor bitwise, for random models, seeds and layouts.
        #[test]
        fn save_then_load_is_the_identity(
            layers in 1usize..4, heads in 1usize..3, head_size in 1usize..5, vocab in 2usize..40,
            seed in any::<u64>(), stages in 1u32..4, step in 0u64..1000,
        ) {
            let model = GptConfig { vocab_size: vocab, max_seq: 4, layers, d_model: heads * head_size, heads };
            let stages = stages.min(layers as u32 + 2);
            let mut cfg = PipelineConfig::new(model, stages, ScheduleKind::OneFOneB, 1);
            cfg.seed = seed;
            let mut pipe = Pipeline::new(cfg, vec![Cpu; stages as usize]).unwrap();
            pipe.set_step(step);
            let root = tempfile::tempdir().unwrap();
            let dir = checkpoint::save(root.path(), &pipe, TokenizerKind::Bytes, None).unwrap();
            let ck = checkpoint::load(&dir).unwrap();
            prop_assert_eq!(ck.manifest.step, step);
            let (m, v) = pipe.optimizer_state().unwrap();
            for (what, got, want) in [("params", &ck.params, pipe.parameters().unwrap()), ("m", &ck.adam_m, m), ("v", &ck.adam_v, v)] {
                prop_assert_eq!(got.len(), want.len(), "{}", what);
                for (name, t) in &want {
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&got[name].data), bits(&t.data), "{} {}", what, name);
                }
            }
        }
    }
}

on_every_backend!(a_checkpoint_resumes_on_another_layout_like_the_uninterrupted_run);

/// Saved on the backend with 4 stages (1F1B), resumed on the same backend with 2 stages (ZB-H1) and other initial
/// weights: the run ends where the uninterrupted one ends (bitwise on the CPU, within tolerance on a GPU).
fn a_checkpoint_resumes_on_another_layout_like_the_uninterrupted_run(d: &impl common::Device) {
    let data = batches();
    let mut whole = Pipeline::new(config(model(), 4, ScheduleKind::OneFOneB), d.stages(4)).unwrap();
    for b in &data {
        whole.train_step(b).unwrap();
    }
    let want = whole.parameters().unwrap();

    let root = tempfile::tempdir().unwrap();
    let mut first = Pipeline::new(config(model(), 4, ScheduleKind::OneFOneB), d.stages(4)).unwrap();
    for b in &data[..SAVE_AT] {
        first.train_step(b).unwrap();
    }
    let dir = checkpoint::save(root.path(), &first, TokenizerKind::Bytes, loader()).unwrap();
    let ck = checkpoint::load(&dir).unwrap();
    let mut cfg = config(model(), 2, ScheduleKind::ZbH1);
    cfg.seed = 99;
    let mut second = Pipeline::new(cfg, d.stages(2)).unwrap();
    second.load(&ck.params, Some((&ck.adam_m, &ck.adam_v))).unwrap();
    second.set_step(ck.manifest.step);
    for b in &data[SAVE_AT..] {
        second.train_step(b).unwrap();
    }
    let got = second.parameters().unwrap();
    match d.tolerance() {
        None => assert_maps_bitwise(&got, &want, "resumed on 2 stages"),
        Some(tol) => {
            for (name, t) in &want {
                let e = common::rel_err(&got[name].data, &t.data);
                assert!(e <= tol, "{name}: {e:.2e} > {tol:.0e}");
            }
        }
    }
}
