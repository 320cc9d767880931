//! How often replicas synchronise: every step (bulk-synchronous, the default) or, with local SGD / DiLoCo
//! (Douillard et al. 2023), every `H` optimizer steps.
//!
//! Under DiLoCo each replica takes `H` inner AdamW steps on its own shard without communicating (its own gradient
//! norm, its own moments); then the outer step: every replica's parameter delta since the last synchronisation,
//! `anchor − θ_r`, is summed across replicas in replica order (through the stage's collective, optionally
//! compressed) and divided by `D` — the outer gradient `g` — and Nesterov momentum moves the anchor:
//! `u ← μ·u + g`, `anchor ← anchor − η·(g + μ·u)` (PyTorch's `SGD(nesterov=True)`), after which every replica
//! restarts from the anchor. The inner moments stay on their replicas, as in DiLoCo.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{EngineError, Result};

/// DiLoCo's outer learning rate.
pub const OUTER_LR_DEFAULT: f32 = 0.7;
/// DiLoCo's outer Nesterov momentum.
pub const OUTER_MOMENTUM_DEFAULT: f32 = 0.9;
/// Most inner steps between synchronisations.
pub const INNER_STEPS_MAX: u32 = 1 << 20;

/// When replicas synchronise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SyncMode {
    /// Gradients summed across replicas every step.
    #[default]
    Bsp,
    /// Local SGD with DiLoCo's outer Nesterov step every `every` inner steps.
    DiLoCo {
        /// Inner steps per outer step (`H`).
        every: u32,
        /// Outer learning rate (η).
        outer_lr: f32,
        /// Outer Nesterov momentum (μ).
        momentum: f32,
    },
}

impl SyncMode {
    /// DiLoCo every `h` steps with its default outer optimizer.
    pub fn diloco(h: u32) -> Self {
        SyncMode::DiLoCo {
            every: h,
            outer_lr: OUTER_LR_DEFAULT,
            momentum: OUTER_MOMENTUM_DEFAULT,
        }
    }

    /// Inner steps per synchronisation (1 for bulk-synchronous).
    pub fn period(self) -> u32 {
        match self {
            SyncMode::Bsp => 1,
            SyncMode::DiLoCo { every, .. } => every,
        }
    }

    /// True for local SGD.
    pub fn is_local(self) -> bool {
        matches!(self, SyncMode::DiLoCo { .. })
    }

    /// Checks the parameters.
    pub fn validate(self) -> Result<()> {
        if let SyncMode::DiLoCo {
            every,
            outer_lr,
            momentum,
        } = self
        {
            if every == 0 || every > INNER_STEPS_MAX {
                return Err(EngineError::config(
                    "sync",
                    self,
                    format!("DiLoCo's inner steps must be in 1..={INNER_STEPS_MAX}"),
                ));
            }
            if !(outer_lr.is_finite() && outer_lr > 0.0) {
                return Err(EngineError::config("sync", self, "the outer learning rate must be > 0"));
            }
            if !(0.0..1.0).contains(&momentum) {
                return Err(EngineError::config(
                    "sync",
                    self,
                    "the outer momentum must be in [0, 1)",
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SyncMode::Bsp => f.write_str("bsp"),
            SyncMode::DiLoCo {
                every,
                outer_lr,
                momentum,
            } if outer_lr == OUTER_LR_DEFAULT && momentum == OUTER_MOMENTUM_DEFAULT => write!(f, "diloco:{every}"),
            SyncMode::DiLoCo {
                every,
                outer_lr,
                momentum,
            } => write!(f, "diloco:{every}:{outer_lr}:{momentum}"),
        }
    }
}

impl FromStr for SyncMode {
    type Err = EngineError;

    /// `bsp`, `diloco:H` or `diloco:H:OUTER_LR:MOMENTUM`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            EngineError::config(
                "sync",
                s,
                format!("{why}; expected bsp, diloco:H or diloco:H:OUTER_LR:MOMENTUM"),
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let mode = match parts.as_slice() {
            ["bsp"] => SyncMode::Bsp,
            ["diloco", h] => SyncMode::diloco(h.parse().map_err(|_| bad("H is not a whole number of steps"))?),
            ["diloco", h, lr, mu] => SyncMode::DiLoCo {
                every: h.parse().map_err(|_| bad("H is not a whole number of steps"))?,
                outer_lr: lr.parse().map_err(|_| bad("the outer learning rate is not a number"))?,
                momentum: mu.parse().map_err(|_| bad("the outer momentum is not a number"))?,
            },
            _ => return Err(bad("unknown setting")),
        };
        mode.validate()?;
        Ok(mode)
    }
}

impl TryFrom<String> for SyncMode {
    type Error = EngineError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<SyncMode> for String {
    fn from(m: SyncMode) -> String {
        m.to_string()
    }
}

/// DiLoCo's outer state: `anchor[replica][stage][i]` and `momentum[replica][stage][i]` for the stage's `i`-th
/// parameter (in [`crate::executor::Stage::params`] order), on the replica's device. Identical on every replica.
pub(crate) struct Outer<B: Backend> {
    /// The parameters at the last synchronisation (the global model).
    pub anchor: Vec<Vec<Vec<B::Buf>>>,
    /// The outer Nesterov momentum.
    pub momentum: Vec<Vec<Vec<B::Buf>>>,
}

/// One outer Nesterov step on one tensor of one replica: `g` is the replica-mean delta `anchor − θ` (scaled in
/// place by `1/replicas` here), then `u ← μ·u + g`, `anchor ← anchor − η·(g + μ·u)`, `θ ← anchor`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn nesterov<B: Backend>(
    be: &B,
    value: &mut B::Buf,
    anchor: &mut B::Buf,
    momentum: &mut B::Buf,
    mut g: B::Buf,
    replicas: usize,
    outer_lr: f32,
    mu: f32,
) -> Result<()> {
    be.scale(&mut g, 1.0 / replicas as f32)?;
    be.scale(momentum, mu)?;
    be.add_assign(momentum, &g)?;
    let mut step = be.duplicate(momentum)?;
    be.scale(&mut step, mu)?;
    be.add_assign(&mut step, &g)?;
    be.scale(&mut step, -outer_lr)?;
    be.add_assign(anchor, &step)?;
    be.copy(value, anchor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_print_and_refuse_nonsense() {
        for s in ["bsp", "diloco:16", "diloco:4:0.5:0.8"] {
            assert_eq!(s.parse::<SyncMode>().unwrap().to_string(), s);
        }
        assert_eq!("diloco:64".parse::<SyncMode>().unwrap().period(), 64);
        assert_eq!(SyncMode::Bsp.period(), 1);
        for bad in [
            "",
            "async",
            "diloco",
            "diloco:0",
            "diloco:x",
            "diloco:4:0:0.9",
            "diloco:4:0.7:1",
        ] {
            let e = bad.parse::<SyncMode>().unwrap_err().to_string();
            assert!(e.contains("sync"), "{bad}: {e}");
        }
    }
}
