//! Checkpoints: one safetensors file per stage plus a JSON manifest written last.
//!
//! A checkpoint is the directory `root/step-{step:08}`:
//!
//! - `stage-{s}.safetensors` for every stage `s`: the stage's parameters in F32 under their
//!   global names (`h.3.attn.c_attn.weight`), and their AdamW moments under `{name}.adam_m` and
//!   `{name}.adam_v`. Because the names are global, a checkpoint saved with one split, stage
//!   count or schedule loads into any other: [`load`] merges every stage file into one map.
//! - `manifest.json`: the format version, the model (its kind, configuration and every parameter's name and
//!   shape), the schedule, the training options, the parts' unit ranges, the optimizer step, the tokenizer, the
//!   data loader's position, and the size and SHA-256 of every stage file. Version 1 manifests (GPT-2 only, with
//!   the pipeline config inline) are still read.
//!
//! Crash safety: everything is written (and fsynced) into `root/.tmp-step-{step:08}`, the manifest
//! last, and that directory is then renamed to `step-{step:08}`. A directory without a valid
//! manifest is not a checkpoint; [`latest`] skips it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::sync::Arc;

use crate::backend::Backend;
use crate::comm::Cohort;
use crate::data::{LoaderState, TokenizerKind};
use crate::error::{EngineError, Result};
use crate::model::{Gpt2, GptConfig};
use crate::pipeline::{HostTensor, Pipeline, PipelineConfig, TensorMap, TrainOptions};
use baton_schedules::ScheduleKind;

/// The checkpoint format this build writes (it also reads version 1).
pub const FORMAT_VERSION: u32 = 2;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Suffix of a parameter's first AdamW moment in a stage file.
pub const ADAM_M_SUFFIX: &str = ".adam_m";
/// Suffix of a parameter's second AdamW moment in a stage file.
pub const ADAM_V_SUFFIX: &str = ".adam_v";

/// The file holding the replicas' communication state inside a checkpoint.
pub const STATE_FILE: &str = "sync-state.safetensors";

const STEP_PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";

/// The model a checkpoint holds, as [`crate::Model::kind`] and [`crate::Model::describe`] gave it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelRecord {
    /// The architecture (`gpt2`).
    pub kind: String,
    /// Its configuration (for `gpt2`: `{"config": GptConfig, "seed": u64}`).
    pub config: serde_json::Value,
}

/// One parameter of the saved model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParamRecord {
    /// Global name.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

/// The schedule of the saving pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScheduleRecord {
    /// Its family (`custom` for a schedule imported or built by hand).
    pub kind: ScheduleKind,
    /// Stages.
    pub stages: u32,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Chunks per stage.
    pub chunks: u32,
}

/// What a checkpoint directory holds, written last as `manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The checkpoint format ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The model.
    pub model: ModelRecord,
    /// Every parameter the stage files hold (tied copies included), in the saving pipeline's order.
    pub parameters: Vec<ParamRecord>,
    /// The schedule of the saving pipeline (a resume may use another).
    pub schedule: ScheduleRecord,
    /// The training options of the saving pipeline.
    pub options: TrainOptions,
    /// Global layer units per part of the saving pipeline.
    pub ranges: Vec<Range<usize>>,
    /// Optimizer steps taken when it was saved.
    pub step: u64,
    /// The tokenizer the model was trained with.
    pub tokenizer: TokenizerKind,
    /// Where the training data loader stood, if there was one.
    pub loader: Option<LoaderState>,
    /// Every data file of the checkpoint, with its size and hash.
    pub files: Vec<FileEntry>,
    /// Files of the replicas' communication state ([`Pipeline::sync_state`]: compression residuals, PowerSGD's
    /// `Q`, DiLoCo's anchor, momentum and diverged replicas), when there is any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_files: Vec<FileEntry>,
}

/// One data file of a checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FileEntry {
    /// File name inside the checkpoint directory (`stage-0.safetensors`).
    pub name: String,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

impl Manifest {
    /// The GPT-2 model the checkpoint holds, or an error naming the kind it holds instead.
    pub fn gpt2(&self) -> Result<Gpt2> {
        if self.model.kind != "gpt2" {
            return Err(EngineError::Checkpoint {
                path: MANIFEST_FILE.into(),
                reason: format!("the checkpoint holds a `{}` model, not GPT-2", self.model.kind),
            });
        }
        #[derive(Deserialize)]
        struct Desc {
            config: GptConfig,
            seed: u64,
        }
        let d: Desc = serde_json::from_value(self.model.config.clone()).map_err(|e| EngineError::Checkpoint {
            path: MANIFEST_FILE.into(),
            reason: format!("invalid GPT-2 configuration: {e}"),
        })?;
        Gpt2::new(d.config, d.seed)
    }

    /// The [`PipelineConfig`] of a GPT-2 checkpoint with a generated schedule (what `baton train` saved).
    pub fn pipeline_config(&self) -> Result<PipelineConfig> {
        let model = self.gpt2()?;
        let o = self.options.clone();
        Ok(PipelineConfig {
            model: model.config,
            stages: self.schedule.stages,
            schedule: self.schedule.kind,
            microbatches: self.schedule.microbatches,
            chunks: self.schedule.chunks,
            split: crate::StageSplit::Ranges(self.ranges.clone()),
            optimizer: o.optimizer,
            recompute: o.recompute,
            batch_weight_grads: o.batch_weight_grads,
            seed: model.seed,
            recv_timeout_ms: o.recv_timeout_ms,
            nonfinite: o.nonfinite,
            max_consecutive_skips: o.max_consecutive_skips,
            // Not part of what was trained: a checkpoint resumes with any number of replicas.
            data_parallel: crate::DataParallel::default(),
        })
    }
}

/// The version-1 manifest (GPT-2 only, the pipeline config inline), read and converted.
#[derive(Deserialize)]
struct ManifestV1 {
    config: PipelineConfig,
    ranges: Vec<Range<usize>>,
    step: u64,
    tokenizer: TokenizerKind,
    loader: Option<LoaderState>,
    files: Vec<FileEntry>,
}

impl ManifestV1 {
    fn upgrade(self) -> Manifest {
        let c = self.config;
        Manifest {
            format_version: 1,
            model: ModelRecord {
                kind: "gpt2".into(),
                config: serde_json::json!({ "config": c.model, "seed": c.seed }),
            },
            parameters: parameter_shapes(&c.model)
                .into_iter()
                .map(|(name, shape)| ParamRecord { name, shape })
                .collect(),
            schedule: ScheduleRecord {
                kind: c.schedule,
                stages: c.stages,
                microbatches: c.microbatches,
                chunks: c.chunks,
            },
            options: c.options(),
            ranges: self.ranges,
            step: self.step,
            tokenizer: self.tokenizer,
            loader: self.loader,
            files: self.files,
            state_files: Vec::new(),
        }
    }
}

/// A loaded and verified checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The checkpoint directory it was read from.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Every parameter by global name (including the tied `lm_head.weight`).
    pub params: TensorMap,
    /// AdamW first moments by global name.
    pub adam_m: TensorMap,
    /// AdamW second moments by global name.
    pub adam_v: TensorMap,
    /// The replicas' communication state ([`Pipeline::sync_state`]); empty when none was saved.
    pub state: TensorMap,
}

/// Every parameter the pipeline holds for `model`, by global name, with its shape: `wte`,
/// `wpe`, the blocks' `h.{i}.*` (linear weights `[out, in]`), `ln_f.*` and the tied
/// `lm_head.weight`. In the order the layers hold them.
pub fn parameter_shapes(model: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let (v, t, c) = (model.vocab_size, model.max_seq, model.d_model);
    let mut out = vec![("wte".to_string(), vec![v, c]), ("wpe".to_string(), vec![t, c])];
    for i in 0..model.layers {
        let p = |s: &str| format!("h.{i}.{s}");
        out.extend([
            (p("ln_1.weight"), vec![c]),
            (p("ln_1.bias"), vec![c]),
            (p("attn.c_attn.weight"), vec![3 * c, c]),
            (p("attn.c_attn.bias"), vec![3 * c]),
            (p("attn.c_proj.weight"), vec![c, c]),
            (p("attn.c_proj.bias"), vec![c]),
            (p("ln_2.weight"), vec![c]),
            (p("ln_2.bias"), vec![c]),
            (p("mlp.c_fc.weight"), vec![4 * c, c]),
            (p("mlp.c_fc.bias"), vec![4 * c]),
            (p("mlp.c_proj.weight"), vec![c, 4 * c]),
            (p("mlp.c_proj.bias"), vec![c]),
        ]);
    }
    out.extend([
        ("ln_f.weight".to_string(), vec![c]),
        ("ln_f.bias".to_string(), vec![c]),
        ("lm_head.weight".to_string(), vec![v, c]),
    ]);
    out
}

/// The directory name of the checkpoint of step `step`: `step-{step:08}`.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// Saves under `root/step-{step:08}` and returns that directory: [`snapshot`] then [`write`].
pub fn save<B: Backend>(
    root: &Path,
    pipeline: &Pipeline<B>,
    tokenizer: TokenizerKind,
    loader: Option<LoaderState>,
) -> Result<PathBuf> {
    write(root, &snapshot(pipeline, tokenizer, loader)?)
}

/// Everything a checkpoint holds, copied to host memory at a step boundary. Taking it is the
/// only part of a save that stalls training; [`write`] can run on another thread.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Optimizer steps taken.
    pub step: u64,
    /// The model.
    pub model: ModelRecord,
    /// Every parameter's name and shape.
    pub parameters: Vec<ParamRecord>,
    /// The schedule.
    pub schedule: ScheduleRecord,
    /// The training options.
    pub options: TrainOptions,
    /// Unit ranges per part.
    pub ranges: Vec<Range<usize>>,
    /// Tokenizer of the run.
    pub tokenizer: TokenizerKind,
    /// Data-loader position.
    pub loader: Option<LoaderState>,
    /// Per stage: values, and AdamW moments under `{name}.adam_m` / `{name}.adam_v`.
    pub stages: Vec<TensorMap>,
    /// The replicas' communication state ([`Pipeline::sync_state`]).
    pub state: TensorMap,
    /// Per stage: whether this process holds it (and writes its file); all true in one process.
    pub held: Vec<bool>,
    /// The job's processes when the pipeline spans several: every one writes its stages' files into the same
    /// checkpoint, rank 0 the manifest last ([`write`]).
    pub cohort: Option<Arc<dyn Cohort>>,
}

/// Copies the pipeline's state to host memory (see [`Snapshot`]).
pub fn snapshot<B: Backend>(
    pipeline: &Pipeline<B>,
    tokenizer: TokenizerKind,
    loader: Option<LoaderState>,
) -> Result<Snapshot> {
    let mut stages = Vec::with_capacity(pipeline.num_stages());
    let held: Vec<bool> = (0..pipeline.num_stages()).map(|s| pipeline.hosts(0, s)).collect();
    // ZeRO-1 across processes: the moments come from their owners in other processes (collective).
    let mut gathered = pipeline.moments_across_processes()?;
    for (stage, &here) in held.iter().enumerate() {
        if !here {
            stages.push(TensorMap::new()); // written by the process holding it
            continue;
        }
        let (values, m, v) = match gathered.as_mut().and_then(|g| g.remove(&stage)) {
            Some((m, v)) => (pipeline.stage_values(stage)?, m, v),
            None => pipeline.stage_tensors(stage)?,
        };
        let mut all = TensorMap::new();
        for (map, suffix) in [(values, ""), (m, ADAM_M_SUFFIX), (v, ADAM_V_SUFFIX)] {
            for (k, t) in map {
                all.insert(format!("{k}{suffix}"), t);
            }
        }
        stages.push(all);
    }
    let schedule = pipeline.schedule();
    Ok(Snapshot {
        step: pipeline.step(),
        model: ModelRecord {
            kind: pipeline.model().kind(),
            config: pipeline.model().describe(),
        },
        parameters: pipeline
            .parameter_shapes()?
            .into_iter()
            .map(|(name, shape)| ParamRecord { name, shape })
            .collect(),
        schedule: ScheduleRecord {
            kind: schedule.kind,
            stages: schedule.stages(),
            microbatches: schedule.microbatches,
            chunks: schedule.chunks(),
        },
        options: pipeline.options().clone(),
        ranges: pipeline.ranges().to_vec(),
        tokenizer,
        loader,
        stages,
        state: pipeline.sync_state()?,
        held,
        cohort: pipeline.cohort().cloned(),
    })
}

/// The pointer file naming the newest complete checkpoint under a root.
pub const LATEST_FILE: &str = "latest";

/// Failure injection for the writer (tests): `BATON_FAIL_SAVE=abort_after_files:N` aborts the
/// process after N stage files of a checkpoint are written, before its manifest.
pub const FAIL_SAVE_ENV: &str = "BATON_FAIL_SAVE";

/// Writes a snapshot crash-safely: every file into `root/.tmp-step-…` (each fsynced), the
/// manifest last, the directory renamed to `root/step-…`, then the `latest` pointer replaced
/// atomically (temp file + rename). A crash at any point leaves the previous checkpoint and
/// pointer intact; a directory without a manifest is never loaded.
///
/// With a cohort (the pipeline spans several processes) every process calls this with its own snapshot: rank 0
/// prepares the temporary directory, every process writes the files of the stages it holds, the file entries are
/// gathered, and rank 0 writes the manifest, renames and moves the pointer; a checkpoint is visible only when
/// every process's files are in. Every process learns of any process's failure and returns it.
pub fn write(root: &Path, snap: &Snapshot) -> Result<PathBuf> {
    let name = step_dir_name(snap.step);
    let tmp = root.join(format!("{TMP_PREFIX}{name}"));
    let target = root.join(&name);
    let Some(cohort) = snap.cohort.as_ref().filter(|c| c.size() > 1) else {
        prepare(root, &tmp, &target)?;
        let files = write_stage_files(&tmp, snap)?;
        return finish(root, &tmp, &target, snap, files);
    };
    let rank = cohort.rank();
    let prepared = if rank == 0 {
        prepare(root, &tmp, &target)
    } else {
        Ok(())
    };
    agree(cohort.as_ref(), prepared.map(|()| Vec::new()), &target)?;
    let mine = write_stage_files(&tmp, snap).and_then(|files| {
        serde_json::to_vec(&files).map_err(|e| EngineError::Checkpoint {
            path: tmp.display().to_string(),
            reason: format!("cannot encode the file list: {e}"),
        })
    });
    let lists = agree(cohort.as_ref(), mine, &target)?;
    let finished = if rank == 0 {
        let mut files = Vec::new();
        for list in &lists {
            let part: Vec<FileEntry> = serde_json::from_slice(list).map_err(|e| EngineError::Checkpoint {
                path: tmp.display().to_string(),
                reason: format!("a rank's file list does not parse: {e}"),
            })?;
            files.extend(part);
        }
        files.sort_by_key(|f| stage_of_file(&f.name));
        finish(root, &tmp, &target, snap, files).map(|_| Vec::new())
    } else {
        Ok(Vec::new())
    };
    agree(cohort.as_ref(), finished, &target)?;
    Ok(target)
}

/// The stage number in a `stage-{s}.safetensors` name (files sort by it).
fn stage_of_file(name: &str) -> usize {
    name.strip_prefix("stage-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Gathers every rank's outcome of one phase of a shared write: on success every rank's payload, in rank order;
/// if any rank failed, an error naming the first that did (its own error on that rank).
fn agree(cohort: &dyn Cohort, mine: Result<Vec<u8>>, target: &Path) -> Result<Vec<Vec<u8>>> {
    let (own_err, msg) = match mine {
        Ok(bytes) => (None, [vec![0u8], bytes].concat()),
        Err(e) => {
            let text = e.to_string();
            (Some(e), [vec![1u8], text.into_bytes()].concat())
        }
    };
    let all = cohort.all_gather_bytes(&msg)?;
    if let Some(e) = own_err {
        return Err(e);
    }
    let mut out = Vec::with_capacity(all.len());
    for (r, m) in all.into_iter().enumerate() {
        match m.split_first() {
            Some((0, rest)) => out.push(rest.to_vec()),
            Some((_, rest)) => {
                return Err(EngineError::Checkpoint {
                    path: target.display().to_string(),
                    reason: format!("rank {r} failed its part: {}", String::from_utf8_lossy(rest)),
                })
            }
            None => {
                return Err(EngineError::Checkpoint {
                    path: target.display().to_string(),
                    reason: format!("rank {r} sent an empty status"),
                })
            }
        }
    }
    Ok(out)
}

/// Refuses an existing checkpoint and makes a fresh temporary directory for it.
fn prepare(root: &Path, tmp: &Path, target: &Path) -> Result<()> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(EngineError::Checkpoint {
            path: target.display().to_string(),
            reason: "already exists; a checkpoint is never rewritten (train into another directory)".into(),
        });
    }
    fs::create_dir_all(root).map_err(|e| io(root, e))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| io(tmp, e))?;
    }
    fs::create_dir(tmp).map_err(|e| io(tmp, e))
}

/// Writes the files of the stages this process holds into `tmp` (each fsynced) and returns their entries.
fn write_stage_files(tmp: &Path, snap: &Snapshot) -> Result<Vec<FileEntry>> {
    let abort_after = std::env::var(FAIL_SAVE_ENV).ok().and_then(|v| {
        v.strip_prefix("abort_after_files:")
            .and_then(|n| n.trim().parse::<usize>().ok())
    });
    let mut files = Vec::new();
    for (stage, all) in snap.stages.iter().enumerate() {
        if !snap.held.get(stage).copied().unwrap_or(true) {
            continue;
        }
        let file_name = format!("stage-{stage}.safetensors");
        let path = tmp.join(&file_name);
        let bytes = serialize_f32(all, None).map_err(|reason| EngineError::Checkpoint {
            path: path.display().to_string(),
            reason,
        })?;
        write_synced(&path, &bytes)?;
        files.push(FileEntry {
            name: file_name,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        });
        if abort_after == Some(files.len()) {
            eprintln!(
                "{FAIL_SAVE_ENV}: aborting after {} file(s) of {}",
                files.len(),
                tmp.display()
            );
            std::process::abort();
        }
    }
    Ok(files)
}

/// The state files, the manifest (last), the rename and the `latest` pointer.
fn finish(root: &Path, tmp: &Path, target: &Path, snap: &Snapshot, files: Vec<FileEntry>) -> Result<PathBuf> {
    let name = step_dir_name(snap.step);
    let mut state_files = Vec::new();
    if !snap.state.is_empty() {
        let path = tmp.join(STATE_FILE);
        let bytes = serialize_f32(&snap.state, None).map_err(|reason| EngineError::Checkpoint {
            path: path.display().to_string(),
            reason,
        })?;
        write_synced(&path, &bytes)?;
        state_files.push(FileEntry {
            name: STATE_FILE.into(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        model: snap.model.clone(),
        parameters: snap.parameters.clone(),
        schedule: snap.schedule.clone(),
        options: snap.options.clone(),
        ranges: snap.ranges.clone(),
        step: snap.step,
        tokenizer: snap.tokenizer,
        loader: snap.loader,
        files,
        state_files,
    };
    let manifest_path = tmp.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| EngineError::Checkpoint {
        path: manifest_path.display().to_string(),
        reason: format!("cannot encode the manifest: {e}"),
    })?;
    write_synced(&manifest_path, json.as_bytes())?;
    sync_dir(tmp)?;

    if target.exists() {
        // Never replace what is there (a resumed run must not rewrite the checkpoint it came from).
        let _ = fs::remove_dir_all(tmp);
        return Err(EngineError::Checkpoint {
            path: target.display().to_string(),
            reason: "already exists; a checkpoint is never rewritten (train into another directory)".into(),
        });
    }
    fs::rename(tmp, target).map_err(|e| io(target, e))?;
    sync_dir(root)?;
    let pointer_tmp = root.join(format!("{TMP_PREFIX}{LATEST_FILE}"));
    write_synced(&pointer_tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&pointer_tmp, root.join(LATEST_FILE)).map_err(|e| io(root, e))?;
    sync_dir(root)?;
    Ok(target.to_path_buf())
}

/// Deletes complete checkpoints under `root` beyond the newest `keep`, oldest first; returns
/// what it removed. Only complete checkpoints count, so an interrupted newer save never causes
/// an older good one to be pruned; `keep` = 0 keeps everything.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let mut complete = complete_steps(root)?;
    complete.sort_by_key(|(step, _)| *step);
    let excess = complete.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in complete.into_iter().take(excess) {
        fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Writes snapshots on a background thread, one at a time, so training continues while a
/// checkpoint goes to disk. Dropping it waits for the write in flight.
#[derive(Default)]
pub struct AsyncSaver {
    in_flight: Option<std::thread::JoinHandle<Result<PathBuf>>>,
}

impl AsyncSaver {
    /// Starts writing `snap` under `root` (then pruning to `keep_last`), after waiting for the
    /// previous write; returns the previous write's directory, or its error.
    pub fn submit(&mut self, root: PathBuf, snap: Snapshot, keep_last: usize) -> Result<Option<PathBuf>> {
        let previous = self.wait()?;
        let handle = std::thread::Builder::new()
            .name("baton-checkpoint-writer".into())
            .spawn(move || {
                let dir = write(&root, &snap)?;
                // One process prunes a shared checkpoint root.
                if snap.cohort.as_ref().is_none_or(|c| c.rank() == 0) {
                    prune(&root, keep_last)?;
                }
                Ok(dir)
            })
            .map_err(|e| io(Path::new("checkpoint writer thread"), e))?;
        self.in_flight = Some(handle);
        Ok(previous)
    }

    /// The write in flight's outcome if it has finished (without waiting): `None` while it runs or when there is
    /// none. A failed write is reported here as soon as it is over, not only at the next save.
    pub fn poll(&mut self) -> Option<Result<PathBuf>> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait().transpose()
        } else {
            None
        }
    }

    /// Waits for the write in flight; returns its directory (or `None` if there was none).
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.in_flight.take() {
            None => Ok(None),
            Some(h) => match h.join() {
                Ok(r) => r.map(Some),
                Err(_) => Err(EngineError::Checkpoint {
                    path: "checkpoint writer".into(),
                    reason: "the writer thread panicked; the previous checkpoint is intact".into(),
                }),
            },
        }
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        // Errors here were already reportable through `wait`; record, never panic in drop.
        if let Err(e) = self.wait() {
            crate::error::record_drop_error("checkpoint writer", e);
        }
    }
}

/// Loads and verifies a checkpoint: `dir` itself if it holds a `manifest.json`, otherwise the
/// newest complete `step-*` checkpoint under `dir` (see [`latest`]).
///
/// Verifies the format version, every file's size and SHA-256 (before parsing it), that every
/// tensor is F32 with the shape the manifest's model expects, and that every parameter and both
/// of its AdamW moments are present. A tensor stored in two files must be bitwise equal in both.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let dir = if dir.join(MANIFEST_FILE).is_file() {
        dir.to_path_buf()
    } else {
        match latest(dir)? {
            Some(found) => found,
            None => {
                return Err(EngineError::Checkpoint {
                    path: dir.display().to_string(),
                    reason: format!("no {MANIFEST_FILE} here and no complete step-* checkpoint under it"),
                })
            }
        }
    };
    let manifest = read_manifest(&dir)?;
    let expected: BTreeMap<String, Vec<usize>> = manifest
        .parameters
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();

    let mut maps = [TensorMap::new(), TensorMap::new(), TensorMap::new()];
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let fail = |reason: String| EngineError::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        let bytes = verified(&path, entry)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;
        for (name, view) in st.iter() {
            let (slot, base) = if let Some(base) = name.strip_suffix(ADAM_M_SUFFIX) {
                (1, base)
            } else if let Some(base) = name.strip_suffix(ADAM_V_SUFFIX) {
                (2, base)
            } else {
                (0, name)
            };
            let shape = expected.get(base).ok_or_else(|| {
                fail(format!(
                    "unexpected tensor `{name}`: the model in the manifest has no parameter `{base}`"
                ))
            })?;
            let tensor = f32_tensor(name, &view, shape).map_err(&fail)?;
            match maps[slot].get(base) {
                Some(prev) if !bitwise_eq(&prev.data, &tensor.data) => {
                    return Err(fail(format!(
                        "tensor `{name}` differs from its copy in {}",
                        origin.get(name).map(String::as_str).unwrap_or("another file")
                    )));
                }
                Some(_) => {}
                None => {
                    origin.insert(name.to_string(), entry.name.clone());
                    maps[slot].insert(base.to_string(), tensor);
                }
            }
        }
    }
    for name in manifest.parameters.iter().map(|p| &p.name) {
        for (slot, map) in maps.iter().enumerate() {
            if !map.contains_key(name) {
                return Err(EngineError::Checkpoint {
                    path: dir.display().to_string(),
                    reason: format!("missing tensor `{name}{}` (no stage file holds it)", suffix(slot)),
                });
            }
        }
    }
    let mut state = TensorMap::new();
    for entry in &manifest.state_files {
        let path = dir.join(&entry.name);
        let bytes = verified(&path, entry)?;
        let fail = |reason: String| EngineError::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;
        for (name, view) in st.iter() {
            let tensor = f32_tensor(name, &view, view.shape()).map_err(&fail)?;
            state.insert(name.to_string(), tensor);
        }
    }
    let [params, adam_m, adam_v] = maps;
    Ok(Checkpoint {
        dir,
        manifest,
        params,
        adam_m,
        adam_v,
        state,
    })
}

/// A checkpoint file's bytes, after checking its size and SHA-256 against the manifest.
fn verified(path: &Path, entry: &FileEntry) -> Result<Vec<u8>> {
    let fail = |reason: String| EngineError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() as u64 != entry.bytes {
        return Err(fail(format!(
            "file is {} bytes, the manifest says {} (truncated or overwritten)",
            bytes.len(),
            entry.bytes
        )));
    }
    let actual = sha256_hex(&bytes);
    if actual != entry.sha256 {
        return Err(fail(format!(
            "checksum mismatch: expected sha256 {}, found {actual}",
            entry.sha256
        )));
    }
    Ok(bytes)
}

/// The newest `step-*` directory under `root` with a valid manifest, or `None` when there is
/// none (or `root` does not exist). Directories without a manifest (interrupted saves) and
/// `.tmp-*` directories are skipped.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    // The pointer, when it names a complete checkpoint; otherwise the scan decides.
    if let Ok(name) = fs::read_to_string(root.join(LATEST_FILE)) {
        let path = root.join(name.trim());
        if parse_step_dir(name.trim()).is_some() && read_manifest(&path).is_ok() {
            let newest = complete_steps(root)?.into_iter().max_by_key(|(s, _)| *s);
            if newest.as_ref().is_none_or(|(_, p)| *p == path) {
                return Ok(Some(path));
            }
        }
    }
    Ok(complete_steps(root)?
        .into_iter()
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p))
}

/// The `step-*` directories under `root` newer than its newest complete checkpoint that [`latest`] passes over,
/// each with why (no manifest: an interrupted save; an unreadable manifest), oldest first. Empty when the newest
/// directory is complete.
pub fn skipped_newer(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let newest_ok = latest(root)?.and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(parse_step_dir));
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(root, e))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir) else {
            continue;
        };
        if newest_ok.is_some_and(|ok| step <= ok) {
            continue;
        }
        let path = entry.path();
        let why = if !path.join(MANIFEST_FILE).exists() {
            format!("no {MANIFEST_FILE} (an interrupted save)")
        } else {
            match read_manifest(&path) {
                Ok(_) => continue,
                Err(e) => e.to_string(),
            }
        };
        out.push((step, path, why));
    }
    out.sort_by_key(|(step, _, _)| *step);
    Ok(out.into_iter().map(|(_, p, why)| (p, why)).collect())
}

/// Every complete `step-*` checkpoint under `root` (with a valid manifest), unordered.
fn complete_steps(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(root, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() || read_manifest(&path).is_err() {
            continue;
        }
        found.push((step, path));
    }
    Ok(found)
}

/// `step-00000042` → 42; anything else → `None`.
fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads and checks `dir/manifest.json`: parseable, known format version, valid model, file
/// names that stay inside the directory.
fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let fail = |reason: String| EngineError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let text = fs::read_to_string(&path).map_err(|e| fail(format!("cannot read the manifest: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(format!("invalid JSON: {e}")))?;
    let manifest: Manifest = match value.get("format_version").and_then(serde_json::Value::as_u64) {
        Some(1) => serde_json::from_value::<ManifestV1>(value)
            .map_err(|e| fail(format!("invalid manifest: {e}")))?
            .upgrade(),
        Some(v) if v == u64::from(FORMAT_VERSION) => {
            serde_json::from_value(value).map_err(|e| fail(format!("invalid manifest: {e}")))?
        }
        Some(v) => {
            return Err(fail(format!(
                "unknown format version {v}; this build reads versions 1 and {FORMAT_VERSION}"
            )))
        }
        None => return Err(fail("no `format_version` number".into())),
    };
    if manifest.model.kind == "gpt2" {
        manifest.gpt2().map_err(|e| fail(format!("invalid model: {e}")))?;
    }
    if manifest.parameters.is_empty() {
        return Err(fail("the manifest lists no parameters".into()));
    }
    if manifest.files.is_empty() {
        return Err(fail("the manifest lists no files".into()));
    }
    for f in &manifest.files {
        let plain = !f.name.is_empty()
            && f.name != "."
            && f.name != ".."
            && !f.name.contains(['/', '\\'])
            && f.name != MANIFEST_FILE;
        if !plain {
            return Err(fail(format!("invalid file name {:?} in the manifest", f.name)));
        }
    }
    Ok(manifest)
}

fn suffix(slot: usize) -> &'static str {
    match slot {
        1 => ADAM_M_SUFFIX,
        2 => ADAM_V_SUFFIX,
        _ => "",
    }
}

fn bitwise_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// An F32 tensor of `shape` from a safetensors view, or the reason it is not one.
fn f32_tensor(name: &str, view: &TensorView<'_>, shape: &[usize]) -> std::result::Result<HostTensor, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("tensor `{name}` has dtype {:?}, expected F32", view.dtype()));
    }
    if view.shape() != shape {
        return Err(format!(
            "tensor `{name}` has shape {:?}, the model expects {shape:?}",
            view.shape()
        ));
    }
    let data = le_f32(view.data());
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "tensor `{name}` holds {} values for shape {shape:?}",
            data.len()
        ));
    }
    Ok(HostTensor {
        shape: shape.to_vec(),
        data,
    })
}

/// Little-endian F32 bytes to floats (a trailing partial element is ignored).
pub(crate) fn le_f32(bytes: &[u8]) -> Vec<f32> {
    let whole = &bytes[..bytes.len() / 4 * 4];
    if cfg!(target_endian = "little") {
        // One copy: the file's bytes are this machine's floats (copied into aligned storage).
        let mut out = vec![0.0f32; whole.len() / 4];
        bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(whole);
        return out;
    }
    whole
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Floats to little-endian bytes (one copy on a little-endian machine).
fn f32_le(data: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        return bytemuck::cast_slice(data).to_vec();
    }
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes F32 tensors into safetensors bytes.
pub(crate) fn serialize_f32(
    tensors: &TensorMap,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> std::result::Result<Vec<u8>, String> {
    let buffers: Vec<(&String, &Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(k, t)| (k, &t.shape, f32_le(&t.data))).collect();
    let views = buffers
        .iter()
        .map(|(k, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.to_vec(), bytes)
                .map(|v| (k.as_str(), v))
                .map_err(|e| format!("tensor `{k}`: {e}"))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    safetensors::serialize(views, metadata).map_err(|e| format!("cannot serialize: {e}"))
}

/// SHA-256 of `bytes` as lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn io(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` and flushes them to the disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Flushes a directory's entries (new files, renames) to the disk where the OS allows it.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
