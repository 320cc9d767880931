//! Optimizer settings: AdamW with decoupled weight decay, warmup + cosine learning rate, and
//! global gradient-norm clipping.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Optimizer and learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f32,
    /// Final learning rate of the cosine decay.
    pub min_lr: f32,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Steps of the whole run (the cosine reaches `min_lr` here).
    pub total_steps: u64,
    /// AdamW β1.
    pub beta1: f32,
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Decoupled weight decay for matrices and embeddings.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 10,
            total_steps: 200,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

impl OptimizerConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let pos = |field: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(EngineError::config(field, v, "must be finite and > 0"))
            }
        };
        let nonneg = |field: &'static str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(EngineError::config(field, v, "must be finite and >= 0"))
            }
        };
        let unit = |field: &'static str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(EngineError::config(field, v, "must be in [0, 1)"))
            }
        };
        pos("lr", self.lr)?;
        nonneg("min_lr", self.min_lr)?;
        if self.min_lr > self.lr {
            return Err(EngineError::config(
                "min_lr",
                self.min_lr,
                format!("must not exceed lr = {}", self.lr),
            ));
        }
        unit("beta1", self.beta1)?;
        unit("beta2", self.beta2)?;
        pos("eps", self.eps)?;
        nonneg("weight_decay", self.weight_decay)?;
        nonneg("grad_clip", self.grad_clip)?;
        if self.total_steps == 0 {
            return Err(EngineError::config("steps", 0, "must be >= 1"));
        }
        Ok(())
    }

    /// Learning rate for 0-based `step`: linear warmup to `lr`, then cosine decay to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (f64::from(self.min_lr) + cosine * f64::from(self.lr - self.min_lr)) as f32
    }
}
