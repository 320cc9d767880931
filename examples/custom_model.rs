//! A model that is not GPT-2, defined here, outside the engine: a decoder whose blocks run attention and the MLP
//! in **parallel** from one shared layer norm (`x + attn(ln(x)) + mlp(ln(x))`, the GPT-J block), with its own
//! parameter names and an output projection tied to the token embedding under other names (`tok.weight` and
//! `out.weight`). The author splits it into 3 stages by unit name and trains it with Baton's `Trainer` on the
//! embedded corpus; the example checks that the validation loss falls and the tied copies stay bitwise equal.
//!
//! ```sh
//! cargo run --release --example custom_model            # 200 steps
//! cargo run --release --example custom_model -- --quick # 40 steps (what the test command runs)
//! ```

use std::sync::Arc;

use baton::engine::backend::Backend;
use baton::engine::data::{default_corpus, Split, Tokenizer};
use baton::engine::model::init::normal;
use baton::engine::model::{Forward, Layer, MicroBatch, Model, Param, Saved, TiedGroup};
use baton::engine::trainer::{EvalEvent, Observer};
use baton::engine::{
    EngineError, OptimizerConfig, Pipeline, Result, SplitData, StageSplit, TrainOptions, Trainer, TrainerConfig,
};
use baton::schedules::{generate, ScheduleKind};

/// Sizes of the model.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    vocab: usize,
    seq: usize,
    width: usize,
    heads: usize,
    blocks: usize,
    seed: u64,
}

/// The model: unit 0 embeds tokens, units 1..=blocks are parallel blocks, the last unit is the tied head + loss.
struct ParallelLm {
    s: Sizes,
}

impl<B: Backend> Model<B> for ParallelLm {
    fn kind(&self) -> String {
        "parallel-lm".into()
    }
    fn describe(&self) -> serde_json::Value {
        let s = self.s;
        serde_json::json!({"vocab": s.vocab, "seq": s.seq, "width": s.width, "heads": s.heads, "blocks": s.blocks, "seed": s.seed})
    }
    fn num_units(&self) -> usize {
        self.s.blocks + 2
    }
    fn unit_name(&self, unit: usize) -> String {
        match unit {
            0 => "tok".into(),
            u if u <= self.s.blocks => format!("blk.{}", u - 1),
            _ => "out".into(),
        }
    }
    fn build_unit(&self, unit: usize, be: &B) -> Result<Box<dyn Layer<B>>> {
        Ok(match unit {
            0 => Box::new(TokenEmbedding::new(self.s, be)?),
            u if u <= self.s.blocks => Box::new(ParallelBlock::new(self.s, u - 1, be)?),
            _ => Box::new(TiedHead::new(self.s, be)?),
        })
    }
    fn tied_groups(&self) -> Vec<TiedGroup> {
        vec![TiedGroup::new(["tok.weight", "out.weight"])]
    }
    fn vocab_size(&self) -> usize {
        self.s.vocab
    }
    fn max_seq(&self) -> usize {
        self.s.seq
    }
}

fn param<B: Backend>(be: &B, s: Sizes, name: &str, shape: Vec<usize>, std: f32) -> Result<Param<B>> {
    let n = shape.iter().product();
    Param::new(be, name, shape, normal(s.seed, name, n, std), true)
}

fn norm_params<B: Backend>(be: &B, prefix: &str, c: usize) -> Result<[Param<B>; 2]> {
    Ok([
        Param::new(be, format!("{prefix}.weight"), vec![c], vec![1.0; c], false)?,
        Param::new(be, format!("{prefix}.bias"), vec![c], vec![0.0; c], false)?,
    ])
}

// --- unit 0: token + position embedding -------------------------------------------------------------------
struct TokenEmbedding<B: Backend> {
    params: Vec<Param<B>>,
    c: usize,
}

impl<B: Backend> TokenEmbedding<B> {
    fn new(s: Sizes, be: &B) -> Result<Self> {
        Ok(TokenEmbedding {
            params: vec![
                param(be, s, "tok.weight", vec![s.vocab, s.width], 0.02)?,
                param(be, s, "pos.weight", vec![s.seq, s.width], 0.01)?,
            ],
            c: s.width,
        })
    }
}

impl<B: Backend> Layer<B> for TokenEmbedding<B> {
    fn name(&self) -> String {
        "tok".into()
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn forward(&self, be: &B, _x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let mut out = be.zeros(mb.b * mb.t * self.c)?;
        let toks = mb.input_tokens("tok")?;
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
        let dout = dout.ok_or_else(|| EngineError::layer("tok", "no output gradient"))?;
        saved.put(0, dout, "tok")?;
        Ok(None)
    }
    fn backward_weight(&mut self, be: &B, mut saved: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let dout = saved.take(0, "tok")?;
        let toks = mb.input_tokens("tok")?;
        let (tok, pos) = self.params.split_at_mut(1);
        be.embedding_backward(&mut tok[0].grad, &mut pos[0].grad, &dout, toks, mb.b, mb.t, self.c)
    }
}

// --- units 1..=blocks: x + attn(ln(x)) + mlp(ln(x)) -------------------------------------------------------
const LN_W: usize = 0;
const LN_B: usize = 1;
const QKV_W: usize = 2;
const QKV_B: usize = 3;
const AO_W: usize = 4;
const AO_B: usize = 5;
const FC_W: usize = 6;
const FC_B: usize = 7;
const MO_W: usize = 8;
const MO_B: usize = 9;

// Stash slots.
const X: usize = 0;
const H: usize = 1;
const MEAN: usize = 2;
const RSTD: usize = 3;
const QKV: usize = 4;
const ATT: usize = 5;
const A: usize = 6;
const PRE: usize = 7;
const F: usize = 8;
const DOUT: usize = 9;
const DPRE: usize = 10;
const DQKV: usize = 11;
const DH: usize = 12;
const SLOTS: usize = 13;

struct ParallelBlock<B: Backend> {
    name: String,
    params: Vec<Param<B>>,
    c: usize,
    nh: usize,
}

impl<B: Backend> ParallelBlock<B> {
    fn new(s: Sizes, i: usize, be: &B) -> Result<Self> {
        let (c, p) = (s.width, |x: &str| format!("blk.{i}.{x}"));
        let out_std = 0.02 / (2.0 * s.blocks as f32).sqrt();
        let [ln_w, ln_b] = norm_params(be, &p("ln"), c)?;
        let zeros = |n: usize| vec![0.0f32; n];
        let params = vec![
            ln_w,
            ln_b,
            param(be, s, &p("qkv.weight"), vec![3 * c, c], 0.02)?,
            Param::new(be, p("qkv.bias"), vec![3 * c], zeros(3 * c), false)?,
            param(be, s, &p("attn_out.weight"), vec![c, c], out_std)?,
            Param::new(be, p("attn_out.bias"), vec![c], zeros(c), false)?,
            param(be, s, &p("fc.weight"), vec![4 * c, c], 0.02)?,
            Param::new(be, p("fc.bias"), vec![4 * c], zeros(4 * c), false)?,
            param(be, s, &p("mlp_out.weight"), vec![c, 4 * c], out_std)?,
            Param::new(be, p("mlp_out.bias"), vec![c], zeros(c), false)?,
        ];
        Ok(ParallelBlock {
            name: format!("blk.{i}"),
            params,
            c,
            nh: s.heads,
        })
    }
    fn w(&self, i: usize) -> &B::Buf {
        &self.params[i].value
    }
}

impl<B: Backend> Layer<B> for ParallelBlock<B> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn forward(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let x = x.ok_or_else(|| EngineError::layer(&self.name, "no input activation"))?;
        let (b, t, c, nh) = (mb.b, mb.t, self.c, self.nh);
        let n = b * t;
        let (mut h, mut mean, mut rstd) = (be.zeros(n * c)?, be.zeros(n)?, be.zeros(n)?);
        be.layernorm_forward(&mut h, &mut mean, &mut rstd, &x, self.w(LN_W), self.w(LN_B), n, c)?;
        // Attention branch.
        let mut qkv = be.zeros(n * 3 * c)?;
        be.matmul_forward(&mut qkv, &h, self.w(QKV_W), Some(self.w(QKV_B)), n, c, 3 * c)?;
        let (mut a, mut att) = (be.zeros(n * c)?, be.zeros(be.attention_stash_len(b, t, c, nh))?);
        be.attention_forward(&mut a, &mut att, &qkv, b, t, c, nh)?;
        let mut ao = be.zeros(n * c)?;
        be.matmul_forward(&mut ao, &a, self.w(AO_W), Some(self.w(AO_B)), n, c, c)?;
        // MLP branch, from the same normalised input.
        let (mut f, mut pre) = (be.zeros(n * 4 * c)?, be.zeros(n * 4 * c)?);
        be.matmul_gelu_forward(&mut f, &mut pre, &h, self.w(FC_W), Some(self.w(FC_B)), n, c, 4 * c)?;
        let mut mo = be.zeros(n * c)?;
        be.matmul_forward(&mut mo, &f, self.w(MO_W), Some(self.w(MO_B)), n, 4 * c, c)?;
        let (mut y, mut out) = (be.zeros(n * c)?, be.zeros(n * c)?);
        be.residual_forward(&mut y, &x, &ao)?;
        be.residual_forward(&mut out, &y, &mo)?;
        let mut s = Saved::with_slots(SLOTS);
        for (slot, buf) in [
            (X, x),
            (H, h),
            (MEAN, mean),
            (RSTD, rstd),
            (QKV, qkv),
            (ATT, att),
            (A, a),
            (PRE, pre),
            (F, f),
        ] {
            s.put(slot, buf, &self.name)?;
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
        let name = &self.name;
        let dout = dout.ok_or_else(|| EngineError::layer(name, "no output gradient"))?;
        let (b, t, c, nh) = (mb.b, mb.t, self.c, self.nh);
        let n = b * t;
        // Both branches receive `dout`; their input gradients meet in `dh`.
        let mut dpre = be.zeros(n * 4 * c)?;
        be.matmul_backward_input_gelu(&mut dpre, &dout, self.w(MO_W), s.get(PRE, name)?, n, 4 * c, c)?;
        let mut dh = be.zeros(n * c)?;
        be.matmul_backward_input(&mut dh, &dpre, self.w(FC_W), n, c, 4 * c)?;
        let mut da = be.zeros(n * c)?;
        be.matmul_backward_input(&mut da, &dout, self.w(AO_W), n, c, c)?;
        let mut dqkv = be.zeros(n * 3 * c)?;
        be.attention_backward(
            &mut dqkv,
            &da,
            s.get(QKV, name)?,
            s.get(A, name)?,
            s.get(ATT, name)?,
            b,
            t,
            c,
            nh,
        )?;
        be.matmul_backward_input(&mut dh, &dqkv, self.w(QKV_W), n, c, 3 * c)?;
        let mut dx = be.duplicate(&dout)?; // the residual path
        be.layernorm_backward_input(
            &mut dx,
            &dh,
            s.get(X, name)?,
            self.w(LN_W),
            s.get(MEAN, name)?,
            s.get(RSTD, name)?,
            n,
            c,
        )?;
        for slot in [QKV, ATT, PRE] {
            s.drop_slot(slot);
        }
        for (slot, buf) in [(DOUT, dout), (DPRE, dpre), (DQKV, dqkv), (DH, dh)] {
            s.put(slot, buf, name)?;
        }
        Ok(Some(dx))
    }
    fn backward_weight(&mut self, be: &B, mut s: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let name = self.name.clone();
        let (n, c) = (mb.b * mb.t, self.c);
        let dout = s.take(DOUT, &name)?;
        let h = s.take(H, &name)?;
        let g = &mut self.params;
        // Each weight's gradient and its bias's (the next parameter), borrowed together with `split_at_mut`.
        let (w, rest) = g.split_at_mut(MO_B);
        be.matmul_backward_weight(
            &mut w[MO_W].grad,
            Some(&mut rest[0].grad),
            &dout,
            &s.take(F, &name)?,
            n,
            4 * c,
            c,
        )?;
        let (w, rest) = g.split_at_mut(FC_B);
        be.matmul_backward_weight(
            &mut w[FC_W].grad,
            Some(&mut rest[0].grad),
            &s.take(DPRE, &name)?,
            &h,
            n,
            c,
            4 * c,
        )?;
        let (w, rest) = g.split_at_mut(AO_B);
        be.matmul_backward_weight(
            &mut w[AO_W].grad,
            Some(&mut rest[0].grad),
            &dout,
            &s.take(A, &name)?,
            n,
            c,
            c,
        )?;
        let (w, rest) = g.split_at_mut(QKV_B);
        be.matmul_backward_weight(
            &mut w[QKV_W].grad,
            Some(&mut rest[0].grad),
            &s.take(DQKV, &name)?,
            &h,
            n,
            c,
            3 * c,
        )?;
        let (w, rest) = g.split_at_mut(LN_B);
        be.layernorm_backward_weight(
            &mut w[LN_W].grad,
            &mut rest[0].grad,
            &s.take(DH, &name)?,
            &s.take(X, &name)?,
            &s.take(MEAN, &name)?,
            &s.take(RSTD, &name)?,
            n,
            c,
        )
    }
}

// --- the last unit: layer norm, output projection tied to `tok.weight`, cross-entropy ---------------------
/// The head's forward intermediates: normalised input, its mean and rstd, and the logits.
type Normed<B> = (
    <B as Backend>::Buf,
    <B as Backend>::Buf,
    <B as Backend>::Buf,
    <B as Backend>::Buf,
);

struct TiedHead<B: Backend> {
    params: Vec<Param<B>>,
    c: usize,
    v: usize,
}

impl<B: Backend> TiedHead<B> {
    fn new(s: Sizes, be: &B) -> Result<Self> {
        let [w, b] = norm_params(be, "out.ln", s.width)?;
        // Starts as a copy of `tok.weight` (same name-keyed draw); the tied group keeps the two equal.
        let out = Param::new(
            be,
            "out.weight",
            vec![s.vocab, s.width],
            normal(s.seed, "tok.weight", s.vocab * s.width, 0.02),
            true,
        )?;
        Ok(TiedHead {
            params: vec![w, b, out],
            c: s.width,
            v: s.vocab,
        })
    }
    /// `(normalised input, mean, rstd, logits)` for activations `x` of `n` tokens.
    fn logits(&self, be: &B, x: &B::Buf, n: usize) -> Result<Normed<B>> {
        let (mut h, mut mean, mut rstd) = (be.zeros(n * self.c)?, be.zeros(n)?, be.zeros(n)?);
        be.layernorm_forward(
            &mut h,
            &mut mean,
            &mut rstd,
            x,
            &self.params[0].value,
            &self.params[1].value,
            n,
            self.c,
        )?;
        let mut logits = be.zeros(n * self.v)?;
        be.matmul_forward(&mut logits, &h, &self.params[2].value, None, n, self.c, self.v)?;
        Ok((h, mean, rstd, logits))
    }
}

impl<B: Backend> Layer<B> for TiedHead<B> {
    fn name(&self) -> String {
        "out".into()
    }
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn forward(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<Forward<B>> {
        let x = x.ok_or_else(|| EngineError::layer("out", "no input activation"))?;
        let n = mb.b * mb.t;
        let (h, mean, rstd, logits) = self.logits(be, &x, n)?;
        let mut losses = be.zeros(n)?;
        be.cross_entropy_forward(&mut losses, &logits, mb.target_tokens("out")?, n, self.v)?;
        let mut s = Saved::with_slots(6);
        for (slot, buf) in [(0, x), (1, h), (2, mean), (3, rstd), (4, logits)] {
            s.put(slot, buf, "out")?;
        }
        Ok(Forward {
            out: None,
            losses: Some(losses),
            saved: s,
        })
    }
    fn infer(&self, be: &B, x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<B::Buf> {
        let x = x.ok_or_else(|| EngineError::layer("out", "no input activation"))?;
        Ok(self.logits(be, &x, mb.b * mb.t)?.3)
    }
    fn backward_input(
        &self,
        be: &B,
        s: &mut Saved<B>,
        _dout: Option<B::Buf>,
        mb: &MicroBatch<B>,
    ) -> Result<Option<B::Buf>> {
        let (n, c, v) = (mb.b * mb.t, self.c, self.v);
        let mut dlogits = be.zeros(n * v)?;
        be.cross_entropy_backward(
            &mut dlogits,
            &s.take(4, "out")?,
            mb.target_tokens("out")?,
            mb.loss_scale,
            n,
            v,
        )?;
        let mut dh = be.zeros(n * c)?;
        be.matmul_backward_input(&mut dh, &dlogits, &self.params[2].value, n, c, v)?;
        let mut dx = be.zeros(n * c)?;
        be.layernorm_backward_input(
            &mut dx,
            &dh,
            s.get(0, "out")?,
            &self.params[0].value,
            s.get(2, "out")?,
            s.get(3, "out")?,
            n,
            c,
        )?;
        s.put(4, dlogits, "out")?;
        s.put(5, dh, "out")?;
        Ok(Some(dx))
    }
    fn backward_weight(&mut self, be: &B, mut s: Saved<B>, mb: &MicroBatch<B>) -> Result<()> {
        let (n, c, v) = (mb.b * mb.t, self.c, self.v);
        be.matmul_backward_weight(
            &mut self.params[2].grad,
            None,
            &s.take(4, "out")?,
            &s.take(1, "out")?,
            n,
            c,
            v,
        )?;
        let (w, b) = self.params.split_at_mut(1);
        be.layernorm_backward_weight(
            &mut w[0].grad,
            &mut b[0].grad,
            &s.take(5, "out")?,
            &s.take(0, "out")?,
            &s.take(2, "out")?,
            &s.take(3, "out")?,
            n,
            c,
        )
    }
}

/// Prints validation losses as they come.
struct Print;
impl Observer for Print {
    fn on_eval(&mut self, e: &EvalEvent) {
        println!(
            "step {:>4}: train loss {:.4}, val loss {:.4}",
            e.step, e.train_loss, e.val_loss
        );
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 40 } else { 200 };
    let tokenizer = Tokenizer::bytes();
    let sizes = Sizes {
        vocab: tokenizer.vocab_size(),
        seq: 64,
        width: 64,
        heads: 4,
        blocks: 4,
        seed: 7,
    };
    let (batch, microbatches) = (8, 4);
    let model: Arc<dyn Model<baton::engine::Cpu>> = Arc::new(ParallelLm { s: sizes });
    // The author's split: 3 stages, by unit name (6 units: tok, blk.0 … blk.3, out).
    let split = StageSplit::parse("tok..=blk.1,blk.2..=blk.3,out")?;
    let options = TrainOptions {
        optimizer: OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 10,
            total_steps: steps,
            ..OptimizerConfig::default()
        },
        ..TrainOptions::default()
    };
    let build = || {
        Pipeline::builder(model.clone())
            .schedule(generate(ScheduleKind::OneFOneB, 3, microbatches, 1)?)
            .split(split.clone())
            .options(options.clone())
            .build(vec![baton::engine::Cpu; 3])
    };
    let config = TrainerConfig {
        steps,
        eval_every: steps / 4,
        eval_batches: 4,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(config, build)?;
    println!(
        "{} stages, units per part {:?}",
        trainer.pipeline().num_stages(),
        trainer.pipeline().ranges()
    );
    let tokens = tokenizer.encode(default_corpus());
    let mut data = SplitData::new(Split::new(&tokens, 0.1, batch, sizes.seq)?, 1)?;
    let run = trainer.run(&mut data, &mut Print)?;
    let (first, last) = (
        run.first_val.ok_or("no evaluation")?,
        run.last_val.ok_or("no evaluation")?,
    );
    println!("validation loss {first:.4} -> {last:.4} in {:.1} s", run.elapsed_s);
    if last >= first - 0.5 {
        return Err(format!("the loss did not fall: {first:.4} -> {last:.4}").into());
    }
    let params = trainer.pipeline().parameters()?;
    let (tok, out) = (&params["tok.weight"].data, &params["out.weight"].data);
    if tok.iter().zip(out).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err("the tied copies tok.weight and out.weight differ".into());
    }
    println!(
        "tied copies tok.weight and out.weight are bitwise equal after {} steps",
        run.step
    );
    Ok(())
}
