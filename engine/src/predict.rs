//! Predicting other pipeline layouts from one measured run: per-layer costs are estimated from
//! the measured per-action times (each part's time split over its layers in proportion to their
//! FLOPs), regrouped for another stage count, and simulated with the transfer latency implied by
//! the activation size and a copy bandwidth. This is how a single-GPU run predicts 2-, 4- and
//! 8-GPU step times and bubbles.

use std::ops::Range;

use serde::Serialize;

use baton_schedules::{generate, simulate, Costs, Op, ScheduleKind};

use crate::error::Result;
use crate::model::{GptConfig, LayerKind};
use crate::split::StageSplit;

/// Seconds of F, B, I, W for one micro-batch through one global layer unit.
pub type UnitCosts = [f64; 4];

/// Relative forward FLOPs per token of global layer `unit` (embedding, block, head).
fn unit_weight(model: &GptConfig, seq: usize, unit: usize) -> f64 {
    let c = model.d_model as f64;
    match model.layer_kind(unit) {
        // A gather and an add: negligible FLOPs, but not free.
        LayerKind::Embedding => 2.0 * c,
        // 12·C² weights (2 FLOPs each) + attention scores and mixing (2·2·C·T / 2 causal).
        LayerKind::Block(_) => 24.0 * c * c + 2.0 * c * seq as f64,
        // LM head (V·C weights) + final layer norm.
        LayerKind::Head => 2.0 * model.vocab_size as f64 * c + 8.0 * c,
    }
}

/// Splits measured per-part costs over the parts' layer units in proportion to their FLOPs.
pub fn unit_costs(model: &GptConfig, seq: usize, ranges: &[Range<usize>], measured: &Costs) -> Vec<UnitCosts> {
    let mut out = vec![[0.0; 4]; model.num_units()];
    for (part, range) in ranges.iter().enumerate() {
        let total: f64 = range.clone().map(|u| unit_weight(model, seq, u)).sum();
        for u in range.clone() {
            let share = if total > 0.0 {
                unit_weight(model, seq, u) / total
            } else {
                0.0
            };
            for (k, op) in Op::ALL.iter().enumerate() {
                out[u][k] = measured.of(*op, part as u32) * share;
            }
        }
    }
    out
}

/// One predicted layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// Stages (one per GPU).
    pub stages: u32,
    /// Predicted step time, seconds (pipeline phase only).
    pub step_s: f64,
    /// Predicted bubble fraction.
    pub bubble: f64,
}

/// Predicts the step time and bubble of `kind` with `microbatches` micro-batches for each stage
/// count in `stages` (uniform split; counts the schedule or the model cannot serve are skipped).
/// `activation_bytes` is one micro-batch's activation (or gradient) crossing a stage boundary;
/// `copy_bytes_per_s` the measured copy bandwidth (`f64::INFINITY` for free transfers).
pub fn predict(
    model: &GptConfig,
    units: &[UnitCosts],
    kind: ScheduleKind,
    microbatches: u32,
    chunks: u32,
    stages: &[u32],
    activation_bytes: f64,
    copy_bytes_per_s: f64,
) -> Result<Vec<Prediction>> {
    let latency = if copy_bytes_per_s.is_finite() && copy_bytes_per_s > 0.0 {
        activation_bytes / copy_bytes_per_s
    } else {
        0.0
    };
    let mut out = Vec::new();
    for &p in stages {
        let Ok(schedule) = generate(kind, p, microbatches, chunks) else {
            continue;
        };
        let parts = schedule.placement.num_parts() as usize;
        let gpt = crate::model::Gpt2 {
            config: model.clone(),
            seed: 0,
        };
        let Ok(ranges) = StageSplit::Uniform.resolve::<crate::backend::Cpu>(&gpt, parts) else {
            continue;
        };
        let sum = |range: &Range<usize>, k: usize| range.clone().map(|u| units[u][k]).sum::<f64>();
        let costs = Costs {
            forward: ranges.iter().map(|r| sum(r, 0)).collect(),
            backward: ranges.iter().map(|r| sum(r, 1)).collect(),
            backward_input: ranges.iter().map(|r| sum(r, 2)).collect(),
            backward_weight: ranges.iter().map(|r| sum(r, 3)).collect(),
            latency,
        };
        let sim = simulate(&schedule, &costs)?;
        out.push(Prediction {
            stages: p,
            step_s: sim.makespan,
            bubble: sim.bubble,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> GptConfig {
        GptConfig {
            vocab_size: 64,
            max_seq: 16,
            layers: 8,
            d_model: 32,
            heads: 4,
        }
    }

    #[test]
    fn unit_costs_add_up_to_the_measured_part_costs() {
        let m = model();
        let gpt = crate::model::Gpt2 {
            config: m.clone(),
            seed: 0,
        };
        let ranges = StageSplit::Uniform.resolve::<crate::backend::Cpu>(&gpt, 2).unwrap();
        let measured = Costs {
            forward: vec![3.0, 5.0],
            backward: vec![6.0, 10.0],
            backward_input: vec![0.0; 2],
            backward_weight: vec![0.0; 2],
            latency: 0.0,
        };
        let units = unit_costs(&m, 16, &ranges, &measured);
        for (part, r) in ranges.iter().enumerate() {
            let f: f64 = r.clone().map(|u| units[u][0]).sum();
            assert!((f - measured.forward[part]).abs() < 1e-12);
        }
        // Blocks in the same part cost the same.
        assert_eq!(units[1][0], units[2][0]);
    }

    #[test]
    fn uniform_blocks_give_the_closed_form_bubble_and_latency_adds_time() {
        // Only blocks cost anything: with 8 blocks over p stages every stage is equal.
        let m = model();
        let mut units = vec![[0.0; 4]; m.num_units()];
        for u in units.iter_mut().take(m.layers + 1).skip(1) {
            *u = [1.0, 2.0, 0.0, 0.0];
        }
        let got = predict(
            &m,
            &units,
            ScheduleKind::OneFOneB,
            8,
            1,
            &[1, 2, 4, 8],
            0.0,
            f64::INFINITY,
        )
        .unwrap();
        assert_eq!(got.iter().map(|p| p.stages).collect::<Vec<_>>(), [1, 2, 4, 8]);
        for pr in &got {
            let p = f64::from(pr.stages);
            assert!((pr.bubble - (p - 1.0) / (8.0 + p - 1.0)).abs() < 1e-12, "{pr:?}");
            // Work per stage: 8 micro-batches × (8 / p blocks) × 3 s.
            assert!((pr.step_s - (8.0 + p - 1.0) * (8.0 / p) * 3.0).abs() < 1e-9, "{pr:?}");
        }
        let slow = predict(&m, &units, ScheduleKind::OneFOneB, 8, 1, &[4], 1e6, 1e6).unwrap();
        assert!(slow[0].step_s > got[2].step_s);
        // Stage counts the model cannot serve are skipped, not errors.
        assert!(
            predict(&m, &units, ScheduleKind::OneFOneB, 8, 1, &[64], 0.0, f64::INFINITY)
                .unwrap()
                .is_empty()
        );
    }
}
