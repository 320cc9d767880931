//! The `Layer` trait and GPT-2's layers: embedding, pre-LN transformer block, and the head
//! (final layer norm, LM head tied to the token embedding, cross-entropy loss).
//!
//! Backward is split in two so zero-bubble schedules can run: `backward_input` computes the
//! gradient for the previous layer and keeps in the stash what `backward_weight` needs;
//! `backward_weight` accumulates the parameter gradients. `B = I then W`, bitwise.

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::config::{GptConfig, LayerKind};
use crate::model::init::{normal, INIT_STD};

/// One trainable tensor with its gradient and AdamW moments, all on the stage's backend.
pub struct Param<B: Backend> {
    /// Global name (`h.3.attn.c_attn.weight`); unique in the model. Tied copies have names of their own and are
    /// listed together in one of the model's [`crate::model::TiedGroup`]s.
    pub name: String,
    /// Shape, row-major (a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// The weights (fp32 master copy).
    pub value: B::Buf,
    /// Accumulated gradient.
    pub grad: B::Buf,
    /// AdamW first moment.
    pub m: B::Buf,
    /// AdamW second moment.
    pub v: B::Buf,
    /// Whether weight decay applies (matrices and embeddings: yes; biases and norms: no).
    pub decay: bool,
}

impl<B: Backend> Param<B> {
    /// A parameter named `name` of `shape` holding `init` (row-major), with zero gradient and moments, on `be`.
    /// `decay` says whether AdamW's weight decay applies to it.
    pub fn new(be: &B, name: impl Into<String>, shape: Vec<usize>, init: Vec<f32>, decay: bool) -> Result<Self> {
        let name = name.into();
        let len: usize = shape.iter().product();
        if init.len() != len {
            return Err(EngineError::layer(
                name,
                format!(
                    "initial values hold {} elements, shape {shape:?} needs {len}",
                    init.len()
                ),
            ));
        }
        Ok(Param {
            name,
            value: be.upload_param(&init)?,
            grad: be.zeros(len)?,
            m: be.zeros_state(len)?,
            v: be.zeros_state(len)?,
            shape,
            decay,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a zero-element tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A micro-batch as a layer sees it: token ids (first part), targets (last part), sizes, and
/// the loss scale `1 / tokens in the whole batch` (the loss is a mean over the batch).
pub struct MicroBatch<B: Backend> {
    /// Input tokens `(b, t)`, present on the stage that holds the first unit.
    pub inputs: Option<B::Tokens>,
    /// Target tokens `(b, t)`, present on the stage that holds the last unit.
    pub targets: Option<B::Tokens>,
    /// Sequences in the micro-batch.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Gradient of the batch loss w.r.t. one token's loss.
    pub loss_scale: f32,
}

impl<B: Backend> MicroBatch<B> {
    /// The input tokens, or an error naming `layer` when this stage has none (it does not hold the first unit).
    pub fn input_tokens(&self, layer: &str) -> Result<&B::Tokens> {
        self.inputs
            .as_ref()
            .ok_or_else(|| EngineError::layer(layer, "the micro-batch has no input tokens on this stage"))
    }

    /// The target tokens, or an error naming `layer` when this stage has none (it does not hold the last unit).
    pub fn target_tokens(&self, layer: &str) -> Result<&B::Tokens> {
        self.targets
            .as_ref()
            .ok_or_else(|| EngineError::layer(layer, "the micro-batch has no targets on this stage"))
    }
}

/// What a layer keeps between forward and backward for one micro-batch: numbered slots that the layer fills and
/// empties itself (a layer names its slots with constants). The public API is safe: filling a filled slot, or
/// reading or taking an empty one, is an error naming the layer and the slot, never a panic.
///
/// ```
/// use baton_engine::{model::Saved, Cpu, Backend};
/// let be = Cpu;
/// let mut stash: Saved<Cpu> = Saved::with_slots(2);
/// stash.put(0, be.upload(&[1.0, 2.0])?, "my layer")?;
/// assert!(stash.put(0, be.upload(&[3.0])?, "my layer").is_err()); // slot 0 is full
/// assert_eq!(be.download(stash.get(0, "my layer")?)?, vec![1.0, 2.0]);
/// let x = stash.take(0, "my layer")?;
/// assert!(stash.get(0, "my layer").is_err()); // taken
/// # drop(x);
/// # Ok::<(), baton_engine::EngineError>(())
/// ```
pub struct Saved<B: Backend> {
    slots: Vec<Option<B::Buf>>,
}

impl<B: Backend> Saved<B> {
    /// A stash with no slots (for layers that keep nothing).
    pub fn empty() -> Self {
        Saved { slots: Vec::new() }
    }

    /// A stash with `n` empty slots.
    pub fn with_slots(n: usize) -> Self {
        Saved {
            slots: (0..n).map(|_| None).collect(),
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Fills `slot` with `buf`; an error if the slot does not exist or is already filled.
    pub fn put(&mut self, slot: usize, buf: B::Buf, layer: &str) -> Result<()> {
        let n = self.slots.len();
        match self.slots.get_mut(slot) {
            None => Err(EngineError::layer(
                layer,
                format!("stash slot {slot} does not exist (the stash has {n})"),
            )),
            Some(Some(_)) => Err(EngineError::layer(layer, format!("stash slot {slot} is filled twice"))),
            Some(place) => {
                *place = Some(buf);
                Ok(())
            }
        }
    }

    /// The buffer in `slot`; an error if it is empty (backward before forward, or taken already).
    pub fn get(&self, slot: usize, layer: &str) -> Result<&B::Buf> {
        self.slots
            .get(slot)
            .and_then(Option::as_ref)
            .ok_or_else(|| missing(layer, slot))
    }

    /// Takes the buffer out of `slot`; an error if it is empty.
    pub fn take(&mut self, slot: usize, layer: &str) -> Result<B::Buf> {
        self.slots
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| missing(layer, slot))
    }

    /// Frees `slot` (what `backward_weight` will not need); a no-op on an empty or missing slot.
    pub fn drop_slot(&mut self, slot: usize) {
        if let Some(place) = self.slots.get_mut(slot) {
            *place = None;
        }
    }

    /// Bytes held on the device.
    pub fn bytes(&self, be: &B) -> usize {
        self.slots.iter().flatten().map(|b| be.bytes(b)).sum()
    }
}

/// Checks a batched weight-gradient call: one stash per micro-batch, at least one, all of one sequence length.
fn check_batch<B: Backend>(layer: &str, stashes: usize, mbs: &[&MicroBatch<B>]) -> Result<()> {
    if stashes != mbs.len() || mbs.is_empty() {
        return Err(EngineError::layer(
            layer,
            format!(
                "batched weight gradients need one stash per micro-batch and at least one: got {stashes} stashes \
                 for {} micro-batches",
                mbs.len()
            ),
        ));
    }
    if let Some(mb) = mbs.iter().find(|mb| mb.t != mbs[0].t) {
        return Err(EngineError::layer(
            layer,
            format!(
                "batched weight gradients need one sequence length: {} and {}",
                mbs[0].t, mb.t
            ),
        ));
    }
    Ok(())
}

/// The micro-batches' stashes joined slot by slot for a batched weight gradient: every slot filled in the first
/// stash (what `backward_input` left for the weight half; each other stash must have it too) holds the rows of
/// micro-batch 0, then 1, and so on (each part is freed as soon as it is copied), and the micro-batch returned has
/// their total sequences (no tokens: the weight-gradient halves of the block and head read only `b` and `t`). One
/// stash is returned as it is.
fn join_stashes<B: Backend>(
    be: &B,
    mut saved: Vec<Saved<B>>,
    mbs: &[&MicroBatch<B>],
    layer: &str,
) -> Result<(Saved<B>, MicroBatch<B>)> {
    check_batch(layer, saved.len(), mbs)?;
    let whole = MicroBatch {
        inputs: None,
        targets: None,
        b: mbs.iter().map(|mb| mb.b).sum(),
        t: mbs[0].t,
        loss_scale: mbs[0].loss_scale,
    };
    if saved.len() == 1 {
        return Ok((saved.swap_remove(0), whole));
    }
    let mut joined = Saved::with_slots(saved[0].slots());
    let filled: Vec<usize> = (0..saved[0].slots())
        .filter(|&slot| saved[0].slots[slot].is_some())
        .collect();
    for slot in filled {
        let parts = saved
            .iter_mut()
            .map(|s| s.take(slot, layer))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&B::Buf> = parts.iter().collect();
        joined.put(slot, be.concat(&refs)?, layer)?;
    }
    Ok((joined, whole))
}

fn missing(layer: &str, slot: usize) -> EngineError {
    EngineError::layer(layer, format!("stash slot {slot} is empty (backward before forward?)"))
}

/// What a forward returns: the activation for the next layer (or nothing after the head), the
/// summed token losses (head only), and the stash.
pub struct Forward<B: Backend> {
    /// Output activation `(b, t, c)`.
    pub out: Option<B::Buf>,
    /// The per-token losses of the micro-batch (head only), left on the device: the executor reads their sum
    /// back once, after the stage's last action, so no forward waits on the host.
    pub losses: Option<B::Buf>,
    /// What backward needs.
    pub saved: Saved<B>,
}

/// A model layer: named parameters, forward, and the two halves of backward.
pub trait Layer<B: Backend>: Send + Sync {
    /// Human-readable name (`block 3`).
    fn name(&self) -> String;
    /// The parameters, in a fixed order.
    fn params(&self) -> &[Param<B>];
    /// The parameters, mutable.
    fn params_mut(&mut self) -> &mut [Param<B>];
    /// Forward on `x` (`None` for the embedding, which reads the micro-batch's tokens).
    fn forward(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>>;
    /// Input gradient from `dout` (`None` for the head, which starts from the loss); returns
    /// `None` for the embedding. Leaves in `saved` exactly what `backward_weight` needs.
    fn backward_input(
        &self,
        be: &B,
        saved: &mut Saved<B>,
        dout: Option<B::Buf>,
        mb: &MicroBatch<B>,
    ) -> Result<Option<B::Buf>>;
    /// Accumulates the parameter gradients from what `backward_input` left in `saved`.
    fn backward_weight(&mut self, be: &B, saved: Saved<B>, mb: &MicroBatch<B>) -> Result<()>;
    /// Accumulates the parameter gradients of several micro-batches of one step at once (the executor's
    /// batched weight gradients, [`crate::TrainOptions::batch_weight_grads`]): `saved[i]` is what
    /// `backward_input` left for micro-batch `mbs[i]`, in micro-batch order. The default runs
    /// [`Layer::backward_weight`] on each in turn. GPT-2's block and head override it with one product per weight
    /// over the tokens of all the micro-batches, read once instead of once per micro-batch.
    fn backward_weight_batched(&mut self, be: &B, saved: Vec<Saved<B>>, mbs: &[&MicroBatch<B>]) -> Result<()> {
        check_batch(&self.name(), saved.len(), mbs)?;
        for (s, mb) in saved.into_iter().zip(mbs) {
            self.backward_weight(be, s, mb)?;
        }
        Ok(())
    }
    /// Inference forward: the next activation, or the logits `(b·t, V)` for the head. Needs no
    /// targets and keeps no stash.
    fn infer(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<B::Buf> {
        let name = self.name();
        self.forward(be, x, mb)?
            .out
            .ok_or_else(|| EngineError::layer(name, "no output"))
    }
}

/// Builds global layer `unit` of `cfg` on `be` with deterministic weights from `seed`.
pub fn build_layer<B: Backend>(cfg: &GptConfig, unit: usize, be: &B, seed: u64) -> Result<Box<dyn Layer<B>>> {
    Ok(match cfg.layer_kind(unit) {
        LayerKind::Embedding => Box::new(Embedding::new(cfg, be, seed)?),
        LayerKind::Block(i) => Box::new(Block::new(cfg, i, be, seed)?),
        LayerKind::Head => Box::new(Head::new(cfg, be, seed)?),
    })
}

// ---------------------------------------------------------------------------------------------
/// Token + position embedding. Parameters: `wte (V, C)`, `wpe (maxT, C)`.
pub struct Embedding<B: Backend> {
    params: Vec<Param<B>>,
    c: usize,
}

impl<B: Backend> Embedding<B> {
    /// GPT-2's embedding for `cfg` on `be`, weights drawn from `seed`.
    pub fn new(cfg: &GptConfig, be: &B, seed: u64) -> Result<Self> {
        let (v, t, c) = (cfg.vocab_size, cfg.max_seq, cfg.d_model);
        let params = vec![
            Param::new(be, "wte", vec![v, c], normal(seed, "wte", v * c, INIT_STD), true)?,
            Param::new(be, "wpe", vec![t, c], normal(seed, "wpe", t * c, INIT_STD / 2.0), true)?,
        ];
        Ok(Embedding { params, c })
    }
}

impl<B: Backend> Layer<B> for Embedding<B> {
    fn name(&self) -> String {
        "embedding".into()
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn forward(&self, be: &B, _x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let toks = mb.input_tokens("embedding")?;
        let mut out = be.scratch(mb.b * mb.t * self.c)?;
        be.embedding_forward(
            &mut out,
            toks,
            &self.params[0].value,
            &self.params[1].value,
            mb.b,
            mb.t,
            self.c,
        )?;
        Ok(Forward {
            out: Some(out),
            losses: None,
            saved: Saved::with_slots(1),
        })
    }
    fn backward_input(
        &self,
        _be: &B,
        saved: &mut Saved<B>,
        dout: Option<B::Buf>,
        _mb: &MicroBatch<B>,
    ) -> Result<Option<B::Buf>> {
        let dout = dout.ok_or_else(|| EngineError::layer("embedding", "no output gradient"))?;
        saved.put(0, dout, "embedding")?;
        Ok(None)
    }
    fn backward_weight(&mut self, be: &B, mut saved: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let dout = saved.take(0, "embedding")?;
        let toks = mb.input_tokens("embedding")?;
        let (wte, wpe) = self.params.split_at_mut(1);
        be.embedding_backward(&mut wte[0].grad, &mut wpe[0].grad, &dout, toks, mb.b, mb.t, self.c)
    }
}

// ---------------------------------------------------------------------------------------------
/// Pre-LN transformer block: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
pub struct Block<B: Backend> {
    index: usize,
    params: Vec<Param<B>>,
    c: usize,
    nh: usize,
}

// Parameter indices.
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const QKV_W: usize = 2;
const QKV_B: usize = 3;
const PROJ_W: usize = 4;
const PROJ_B: usize = 5;
const LN2_W: usize = 6;
const LN2_B: usize = 7;
const FC_W: usize = 8;
const FC_B: usize = 9;
const FCPROJ_W: usize = 10;
const FCPROJ_B: usize = 11;

// Stash slots: forward activations, then the output gradients `backward_weight` needs.
const S_X: usize = 0;
const S_LN1: usize = 1;
const S_MEAN1: usize = 2;
const S_RSTD1: usize = 3;
const S_QKV: usize = 4;
const S_ATT: usize = 5;
const S_ATTY: usize = 6;
const S_X2: usize = 7;
const S_LN2: usize = 8;
const S_MEAN2: usize = 9;
const S_RSTD2: usize = 10;
const S_FC: usize = 11;
const S_GELU: usize = 12;
const S_DFCPROJ: usize = 13;
const S_DFC: usize = 14;
const S_DLN2: usize = 15;
const S_DPROJ: usize = 16;
const S_DQKV: usize = 17;
const S_DLN1: usize = 18;
const BLOCK_SLOTS: usize = 19;

impl<B: Backend> Block<B> {
    /// Transformer block `index` of `cfg` on `be`, weights drawn from `seed`.
    pub fn new(cfg: &GptConfig, index: usize, be: &B, seed: u64) -> Result<Self> {
        let c = cfg.d_model;
        let proj_std = INIT_STD / (2.0 * cfg.layers as f32).sqrt();
        let p = |suffix: &str| format!("h.{index}.{suffix}");
        let ones = |n: usize| vec![1.0f32; n];
        let zeros = |n: usize| vec![0.0f32; n];
        let params = vec![
            Param::new(be, p("ln_1.weight"), vec![c], ones(c), false)?,
            Param::new(be, p("ln_1.bias"), vec![c], zeros(c), false)?,
            Param::new(
                be,
                p("attn.c_attn.weight"),
                vec![3 * c, c],
                normal(seed, &p("attn.c_attn.weight"), 3 * c * c, INIT_STD),
                true,
            )?,
            Param::new(be, p("attn.c_attn.bias"), vec![3 * c], zeros(3 * c), false)?,
            Param::new(
                be,
                p("attn.c_proj.weight"),
                vec![c, c],
                normal(seed, &p("attn.c_proj.weight"), c * c, proj_std),
                true,
            )?,
            Param::new(be, p("attn.c_proj.bias"), vec![c], zeros(c), false)?,
            Param::new(be, p("ln_2.weight"), vec![c], ones(c), false)?,
            Param::new(be, p("ln_2.bias"), vec![c], zeros(c), false)?,
            Param::new(
                be,
                p("mlp.c_fc.weight"),
                vec![4 * c, c],
                normal(seed, &p("mlp.c_fc.weight"), 4 * c * c, INIT_STD),
                true,
            )?,
            Param::new(be, p("mlp.c_fc.bias"), vec![4 * c], zeros(4 * c), false)?,
            Param::new(
                be,
                p("mlp.c_proj.weight"),
                vec![c, 4 * c],
                normal(seed, &p("mlp.c_proj.weight"), 4 * c * c, proj_std),
                true,
            )?,
            Param::new(be, p("mlp.c_proj.bias"), vec![c], zeros(c), false)?,
        ];
        Ok(Block {
            index,
            params,
            c,
            nh: cfg.heads,
        })
    }

    fn w(&self, i: usize) -> &B::Buf {
        &self.params[i].value
    }
}

impl<B: Backend> Layer<B> for Block<B> {
    fn name(&self) -> String {
        format!("block {}", self.index)
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn forward(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let name = self.name();
        let x = x.ok_or_else(|| EngineError::layer(&name, "no input activation"))?;
        let (b, t, c, nh) = (mb.b, mb.t, self.c, self.nh);
        let n = b * t;
        let mut s = Saved::with_slots(BLOCK_SLOTS);
        let (mut ln1, mut mean1, mut rstd1) = (be.scratch(n * c)?, be.scratch(n)?, be.scratch(n)?);
        be.layernorm_forward(&mut ln1, &mut mean1, &mut rstd1, &x, self.w(LN1_W), self.w(LN1_B), n, c)?;
        let mut qkv = be.scratch(n * 3 * c)?;
        be.matmul_forward(&mut qkv, &ln1, self.w(QKV_W), Some(self.w(QKV_B)), n, c, 3 * c)?;
        let (mut atty, mut att) = (be.scratch(n * c)?, be.scratch(be.attention_stash_len(b, t, c, nh))?);
        be.attention_forward(&mut atty, &mut att, &qkv, b, t, c, nh)?;
        let mut proj = be.scratch(n * c)?;
        be.matmul_forward(&mut proj, &atty, self.w(PROJ_W), Some(self.w(PROJ_B)), n, c, c)?;
        let mut x2 = be.scratch(n * c)?;
        let (mut ln2, mut mean2, mut rstd2) = (be.scratch(n * c)?, be.scratch(n)?, be.scratch(n)?);
        be.residual_layernorm_forward(
            &mut x2,
            &mut ln2,
            &mut mean2,
            &mut rstd2,
            &x,
            &proj,
            self.w(LN2_W),
            self.w(LN2_B),
            n,
            c,
        )?;
        let (mut fc, mut gelu) = (be.scratch(n * 4 * c)?, be.scratch(n * 4 * c)?);
        be.matmul_gelu_forward(&mut gelu, &mut fc, &ln2, self.w(FC_W), Some(self.w(FC_B)), n, c, 4 * c)?;
        let mut mlp = be.scratch(n * c)?;
        be.matmul_forward(&mut mlp, &gelu, self.w(FCPROJ_W), Some(self.w(FCPROJ_B)), n, 4 * c, c)?;
        let mut out = be.scratch(n * c)?;
        be.residual_forward(&mut out, &x2, &mlp)?;
        for (slot, buf) in [
            (S_X, x),
            (S_LN1, ln1),
            (S_MEAN1, mean1),
            (S_RSTD1, rstd1),
            (S_QKV, qkv),
            (S_ATT, att),
            (S_ATTY, atty),
            (S_X2, x2),
            (S_LN2, ln2),
            (S_MEAN2, mean2),
            (S_RSTD2, rstd2),
            (S_FC, fc),
            (S_GELU, gelu),
        ] {
            s.put(slot, buf, &name)?;
        }
        Ok(Forward {
            out: Some(out),
            losses: None,
            saved: s,
        })
    }

    fn backward_input(
        &self,
        be: &B,
        s: &mut Saved<B>,
        dout: Option<B::Buf>,
        mb: &MicroBatch<B>,
    ) -> Result<Option<B::Buf>> {
        let name = self.name();
        let dout = dout.ok_or_else(|| EngineError::layer(&name, "no output gradient"))?;
        let (b, t, c, nh) = (mb.b, mb.t, self.c, self.nh);
        let n = b * t;
        // MLP branch.
        let mut dfc = be.scratch(n * 4 * c)?;
        be.matmul_backward_input_gelu(&mut dfc, &dout, self.w(FCPROJ_W), s.get(S_FC, &name)?, n, 4 * c, c)?;
        let mut dln2 = be.scratch(n * c)?;
        be.matmul_backward_input_overwrite(&mut dln2, &dfc, self.w(FC_W), n, c, 4 * c)?;
        let mut dx2 = be.scratch(n * c)?;
        be.layernorm_backward_input_residual(
            &mut dx2,
            &dout,
            &dln2,
            s.get(S_X2, &name)?,
            self.w(LN2_W),
            s.get(S_MEAN2, &name)?,
            s.get(S_RSTD2, &name)?,
            n,
            c,
        )?;
        // Attention branch.
        let mut datty = be.scratch(n * c)?;
        be.matmul_backward_input_overwrite(&mut datty, &dx2, self.w(PROJ_W), n, c, c)?;
        let mut dqkv = be.scratch(n * 3 * c)?;
        be.attention_backward_overwrite(
            &mut dqkv,
            &datty,
            s.get(S_QKV, &name)?,
            s.get(S_ATTY, &name)?,
            s.get(S_ATT, &name)?,
            b,
            t,
            c,
            nh,
        )?;
        let mut dln1 = be.scratch(n * c)?;
        be.matmul_backward_input_overwrite(&mut dln1, &dqkv, self.w(QKV_W), n, c, 3 * c)?;
        let mut dx = be.scratch(n * c)?;
        be.layernorm_backward_input_residual(
            &mut dx,
            &dx2,
            &dln1,
            s.get(S_X, &name)?,
            self.w(LN1_W),
            s.get(S_MEAN1, &name)?,
            s.get(S_RSTD1, &name)?,
            n,
            c,
        )?;
        // Keep what the weight gradients need; free what they do not.
        for slot in [S_QKV, S_ATT, S_FC] {
            s.drop_slot(slot);
        }
        for (slot, buf) in [
            (S_DFCPROJ, dout),
            (S_DFC, dfc),
            (S_DLN2, dln2),
            (S_DPROJ, dx2),
            (S_DQKV, dqkv),
            (S_DLN1, dln1),
        ] {
            s.put(slot, buf, &name)?;
        }
        Ok(Some(dx))
    }

    fn backward_weight_batched(&mut self, be: &B, saved: Vec<Saved<B>>, mbs: &[&MicroBatch<B>]) -> Result<()> {
        let (s, whole) = join_stashes(be, saved, mbs, &self.name())?;
        self.backward_weight(be, s, &whole)
    }

    fn backward_weight(&mut self, be: &B, mut s: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let name = self.name();
        let (n, c) = (mb.b * mb.t, self.c);
        let g = &mut self.params;
        let (fcproj_w, fcproj_b) = pair(g, FCPROJ_W, FCPROJ_B);
        be.matmul_backward_weight(
            fcproj_w,
            Some(fcproj_b),
            &s.take(S_DFCPROJ, &name)?,
            &s.take(S_GELU, &name)?,
            n,
            4 * c,
            c,
        )?;
        let (fc_w, fc_b) = pair(g, FC_W, FC_B);
        be.matmul_backward_weight(
            fc_w,
            Some(fc_b),
            &s.take(S_DFC, &name)?,
            &s.take(S_LN2, &name)?,
            n,
            c,
            4 * c,
        )?;
        let (ln2_w, ln2_b) = pair(g, LN2_W, LN2_B);
        be.layernorm_backward_weight(
            ln2_w,
            ln2_b,
            &s.take(S_DLN2, &name)?,
            &s.take(S_X2, &name)?,
            &s.take(S_MEAN2, &name)?,
            &s.take(S_RSTD2, &name)?,
            n,
            c,
        )?;
        let (proj_w, proj_b) = pair(g, PROJ_W, PROJ_B);
        be.matmul_backward_weight(
            proj_w,
            Some(proj_b),
            &s.take(S_DPROJ, &name)?,
            &s.take(S_ATTY, &name)?,
            n,
            c,
            c,
        )?;
        let (qkv_w, qkv_b) = pair(g, QKV_W, QKV_B);
        be.matmul_backward_weight(
            qkv_w,
            Some(qkv_b),
            &s.take(S_DQKV, &name)?,
            &s.take(S_LN1, &name)?,
            n,
            c,
            3 * c,
        )?;
        let (ln1_w, ln1_b) = pair(g, LN1_W, LN1_B);
        be.layernorm_backward_weight(
            ln1_w,
            ln1_b,
            &s.take(S_DLN1, &name)?,
            &s.take(S_X, &name)?,
            &s.take(S_MEAN1, &name)?,
            &s.take(S_RSTD1, &name)?,
            n,
            c,
        )?;
        Ok(())
    }
}

/// The gradients of parameters `i` (weight) and `i + 1` (bias), borrowed together.
fn pair<B: Backend>(params: &mut [Param<B>], i: usize, j: usize) -> (&mut B::Buf, &mut B::Buf) {
    debug_assert_eq!(j, i + 1);
    let (a, b) = params.split_at_mut(j);
    (&mut a[i].grad, &mut b[0].grad)
}

// ---------------------------------------------------------------------------------------------
/// Final layer norm, LM head tied to `wte`, and the cross-entropy loss.
/// Parameters: `ln_f.weight`, `ln_f.bias`, `lm_head.weight (V, C)` (a copy of `wte`).
pub struct Head<B: Backend> {
    params: Vec<Param<B>>,
    c: usize,
    v: usize,
}

const H_LNF_W: usize = 0;
const H_LNF_B: usize = 1;
const H_WTE: usize = 2;
const HS_X: usize = 0;
const HS_LNF: usize = 1;
const HS_MEAN: usize = 2;
const HS_RSTD: usize = 3;
const HS_LOGITS: usize = 4;
const HS_DLOGITS: usize = 5;
const HS_DLNF: usize = 6;
const HEAD_SLOTS: usize = 7;

impl<B: Backend> Head<B> {
    /// GPT-2's head for `cfg` on `be` (its `lm_head.weight` starts as a copy of `wte`), weights drawn from `seed`.
    pub fn new(cfg: &GptConfig, be: &B, seed: u64) -> Result<Self> {
        let (v, c) = (cfg.vocab_size, cfg.d_model);
        // A copy of `wte` (same initial values); the model's tied group keeps the two bitwise equal.
        let wte = Param::new(
            be,
            "lm_head.weight",
            vec![v, c],
            normal(seed, "wte", v * c, INIT_STD),
            true,
        )?;
        let params = vec![
            Param::new(be, "ln_f.weight", vec![c], vec![1.0; c], false)?,
            Param::new(be, "ln_f.bias", vec![c], vec![0.0; c], false)?,
            wte,
        ];
        Ok(Head { params, c, v })
    }

    /// Logits `(n, V)` for activations `x` of `n` tokens (for sampling; no loss, no stash).
    pub fn logits(&self, be: &B, x: &B::Buf, n: usize) -> Result<B::Buf> {
        let c = self.c;
        let (mut lnf, mut mean, mut rstd) = (be.scratch(n * c)?, be.scratch(n)?, be.scratch(n)?);
        be.layernorm_forward(
            &mut lnf,
            &mut mean,
            &mut rstd,
            x,
            &self.params[H_LNF_W].value,
            &self.params[H_LNF_B].value,
            n,
            c,
        )?;
        let mut logits = be.scratch(n * self.v)?;
        be.matmul_forward(&mut logits, &lnf, &self.params[H_WTE].value, None, n, c, self.v)?;
        Ok(logits)
    }
}

impl<B: Backend> Layer<B> for Head<B> {
    fn name(&self) -> String {
        "head".into()
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn forward(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let x = x.ok_or_else(|| EngineError::layer("head", "no input activation"))?;
        let targets = mb.target_tokens("head")?;
        let (n, c, v) = (mb.b * mb.t, self.c, self.v);
        let (mut lnf, mut mean, mut rstd) = (be.scratch(n * c)?, be.scratch(n)?, be.scratch(n)?);
        be.layernorm_forward(
            &mut lnf,
            &mut mean,
            &mut rstd,
            &x,
            &self.params[H_LNF_W].value,
            &self.params[H_LNF_B].value,
            n,
            c,
        )?;
        let mut logits = be.scratch(n * v)?;
        be.matmul_forward(&mut logits, &lnf, &self.params[H_WTE].value, None, n, c, v)?;
        let mut losses = be.scratch(n)?;
        be.cross_entropy_forward(&mut losses, &logits, targets, n, v)?;
        let mut s = Saved::with_slots(HEAD_SLOTS);
        for (slot, buf) in [
            (HS_X, x),
            (HS_LNF, lnf),
            (HS_MEAN, mean),
            (HS_RSTD, rstd),
            (HS_LOGITS, logits),
        ] {
            s.put(slot, buf, "head")?;
        }
        Ok(Forward {
            out: None,
            losses: Some(losses),
            saved: s,
        })
    }
    fn infer(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<B::Buf> {
        let x = x.ok_or_else(|| EngineError::layer("head", "no input activation"))?;
        self.logits(be, &x, mb.b * mb.t)
    }
    fn backward_input(
        &self,
        be: &B,
        s: &mut Saved<B>,
        _dout: Option<B::Buf>,
        mb: &MicroBatch<B>,
    ) -> Result<Option<B::Buf>> {
        let targets = mb.target_tokens("head")?;
        let (n, c, v) = (mb.b * mb.t, self.c, self.v);
        let mut dlogits = be.scratch(n * v)?;
        be.cross_entropy_backward_overwrite(&mut dlogits, &s.take(HS_LOGITS, "head")?, targets, mb.loss_scale, n, v)?;
        let mut dlnf = be.scratch(n * c)?;
        be.matmul_backward_input_overwrite(&mut dlnf, &dlogits, &self.params[H_WTE].value, n, c, v)?;
        let mut dx = be.zeros(n * c)?;
        be.layernorm_backward_input(
            &mut dx,
            &dlnf,
            s.get(HS_X, "head")?,
            &self.params[H_LNF_W].value,
            s.get(HS_MEAN, "head")?,
            s.get(HS_RSTD, "head")?,
            n,
            c,
        )?;
        s.put(HS_DLOGITS, dlogits, "head")?;
        s.put(HS_DLNF, dlnf, "head")?;
        Ok(Some(dx))
    }
    fn backward_weight_batched(&mut self, be: &B, saved: Vec<Saved<B>>, mbs: &[&MicroBatch<B>]) -> Result<()> {
        let (s, whole) = join_stashes(be, saved, mbs, "head")?;
        self.backward_weight(be, s, &whole)
    }
    fn backward_weight(&mut self, be: &B, mut s: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let (n, c, v) = (mb.b * mb.t, self.c, self.v);
        be.matmul_backward_weight(
            &mut self.params[H_WTE].grad,
            None,
            &s.take(HS_DLOGITS, "head")?,
            &s.take(HS_LNF, "head")?,
            n,
            c,
            v,
        )?;
        let (w, b) = pair(&mut self.params, H_LNF_W, H_LNF_B);
        be.layernorm_backward_weight(
            w,
            b,
            &s.take(HS_DLNF, "head")?,
            &s.take(HS_X, "head")?,
            &s.take(HS_MEAN, "head")?,
            &s.take(HS_RSTD, "head")?,
            n,
            c,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    fn mb(b: usize, t: usize) -> MicroBatch<Cpu> {
        MicroBatch {
            inputs: None,
            targets: None,
            b,
            t,
            loss_scale: 1.0,
        }
    }

    /// A batched weight-gradient call with no micro-batch, a stash count that does not match, or two sequence
    /// lengths is an error naming the layer, before anything is computed.
    #[test]
    fn malformed_batched_weight_gradient_calls_are_errors_naming_the_layer() {
        let cfg = GptConfig {
            vocab_size: 16,
            max_seq: 8,
            layers: 1,
            d_model: 8,
            heads: 2,
        };
        let be = Cpu;
        let mut block = Block::new(&cfg, 0, &be, 1).unwrap();
        let e = block
            .backward_weight_batched(&be, Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("block 0") && e.contains("at least one"), "{e}");
        let (a, b) = (mb(1, 8), mb(1, 4));
        let e = block
            .backward_weight_batched(&be, vec![Saved::empty()], &[&a, &a])
            .unwrap_err()
            .to_string();
        assert!(e.contains("got 1 stashes for 2 micro-batches"), "{e}");
        let e = block
            .backward_weight_batched(&be, vec![Saved::empty(), Saved::empty()], &[&a, &b])
            .unwrap_err()
            .to_string();
        assert!(e.contains("one sequence length: 8 and 4"), "{e}");
        let mut head = Head::new(&cfg, &be, 1).unwrap();
        let e = head
            .backward_weight_batched(&be, Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("head"), "{e}");
    }
}
