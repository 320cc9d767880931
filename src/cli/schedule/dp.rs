//! `baton schedule --data-parallel D`: the data-parallel flags, their checks, and the prediction of the
//! step with each stage's gradients reduced across `D` replicas (see `baton_schedules::simulate_data_parallel`).
//!
//! The command's time unit is then the millisecond: `--costs` is read in ms and the link is expressed per ms, so
//! the simulation, the timeline and the prediction share one unit.

use std::fmt::Write as _;

use clap::Args;

use super::CliError;
use crate::engine::data::TokenizerKind;
use crate::engine::GptConfig;
use crate::schedules::{data_parallel_from_sim, DpCosts, DpReport, Schedule, SimReport, REPLICAS_MAX};

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// Bytes of one gradient element of the default model (fp32, as the CPU backend trains).
const GRAD_ELEM_BYTES: f64 = 4.0;

/// The data-parallel flags of `baton schedule`.
#[derive(Debug, Args)]
pub struct DpArgs {
    /// Data-parallel replicas D. With D > 1 each stage's gradients are reduced across its D copies and the text
    /// output adds the predicted step time, the exposed communication and the bubble, with overlap and after the
    /// flush side by side; --costs is then read in milliseconds.
    #[arg(long, value_name = "D", default_value_t = 1)]
    pub data_parallel: u32,
    /// Bandwidth of each stage's data-parallel link, Gbit/s.
    #[arg(long, value_name = "G", default_value_t = 100.0)]
    pub link_gbps: f64,
    /// Latency of one message on that link, microseconds (a bucket pays it 2(D-1) times).
    #[arg(long, value_name = "US", default_value_t = 5.0)]
    pub link_latency_us: f64,
    /// Gradient MiB each part reduces per step: one number for every part, or one per part, comma-separated.
    /// Default: the default `baton train` model's fp32 gradients (4 layers, d_model 128, byte vocabulary, the
    /// head's copy of the tied embedding included: 3.34 MiB) split evenly over the parts.
    #[arg(long, value_name = "MIB[,MIB...]")]
    pub grad_mib: Option<String>,
    /// Largest gradient bucket, MiB (PyTorch DDP's default; `inf`: one bucket per part).
    #[arg(long, value_name = "MIB", default_value_t = 25.0)]
    pub bucket_mib: f64,
    /// Predict only reductions that start after the pipeline has flushed (as Baton's step does), not also
    /// reductions that start as soon as a part's gradients are final.
    #[arg(long)]
    pub no_overlap: bool,
}

impl DpArgs {
    /// Whether data parallelism was asked for (D > 1).
    pub fn enabled(&self) -> bool {
        self.data_parallel > 1
    }

    /// Checks every flag, so that a bad value is refused before anything is generated.
    pub fn check(&self) -> Result<(), CliError> {
        if self.data_parallel == 0 || self.data_parallel > REPLICAS_MAX {
            return Err(CliError::usage(format!(
                "--data-parallel {} must be in 1..={REPLICAS_MAX}",
                self.data_parallel
            )));
        }
        if !self.link_gbps.is_finite() || self.link_gbps <= 0.0 {
            return Err(CliError::usage(format!(
                "--link-gbps {} must be finite and > 0",
                self.link_gbps
            )));
        }
        if !self.link_latency_us.is_finite() || self.link_latency_us < 0.0 {
            return Err(CliError::usage(format!(
                "--link-latency-us {} must be finite and >= 0",
                self.link_latency_us
            )));
        }
        if self.bucket_mib.is_nan() || self.bucket_mib <= 0.0 {
            return Err(CliError::usage(format!(
                "--bucket-mib {} must be > 0 (inf: one bucket per part)",
                self.bucket_mib
            )));
        }
        if let Some(text) = &self.grad_mib {
            parse_grad_mib(text)?;
        }
        Ok(())
    }

    /// The cost model in milliseconds for `parts` parts, with or without overlap.
    fn costs(&self, parts: u32, overlap: bool) -> Result<DpCosts, CliError> {
        let mib = match &self.grad_mib {
            None => vec![default_model_grad_bytes() / MIB / f64::from(parts.max(1)); parts as usize],
            Some(text) => {
                let list = parse_grad_mib(text)?;
                match list.len() {
                    1 => vec![list[0]; parts as usize],
                    n if n == parts as usize => list,
                    n => {
                        return Err(CliError::usage(format!(
                            "--grad-mib lists {n} values; give one for every part or one per part ({parts})"
                        )))
                    }
                }
            }
        };
        Ok(DpCosts {
            replicas: self.data_parallel,
            grad_bytes: mib.iter().map(|m| m * MIB).collect(),
            // Bytes per millisecond and milliseconds: the unit of --costs.
            link_bytes_per_s: self.link_gbps * 1e9 / 8.0 / 1e3,
            link_latency_s: self.link_latency_us / 1e3,
            bucket_bytes: self.bucket_mib * MIB,
            overlap,
        })
    }

    /// The predictions to show: (label, report), with overlap first unless `--no-overlap`.
    pub fn predict(&self, schedule: &Schedule, sim: &SimReport) -> Result<Vec<(&'static str, DpReport)>, CliError> {
        let modes: &[(&'static str, bool)] = if self.no_overlap {
            &[("after flush", false)]
        } else {
            &[("overlap", true), ("after flush", false)]
        };
        modes
            .iter()
            .map(|&(label, overlap)| {
                let dp = self.costs(schedule.placement.num_parts(), overlap)?;
                let report =
                    data_parallel_from_sim(schedule, sim, &dp).map_err(|e| CliError::failure(e.to_string()))?;
                Ok((label, report))
            })
            .collect()
    }

    /// The JSON object `--format json` adds under `data_parallel`: the link and one report per mode, times in ms.
    pub fn json(&self, reports: &[(&'static str, DpReport)]) -> Result<serde_json::Value, CliError> {
        let mut modes = serde_json::Map::new();
        for (label, report) in reports {
            let value = serde_json::to_value(report).map_err(|e| CliError::failure(e.to_string()))?;
            modes.insert(label.replace(' ', "_"), value);
        }
        Ok(serde_json::json!({
            "unit": "ms",
            "replicas": self.data_parallel,
            "link_gbps": self.link_gbps,
            "link_latency_us": self.link_latency_us,
            "bucket_mib": self.bucket_mib,
            "modes": modes,
        }))
    }

    /// The lines the text output appends: the settings, one column per mode, then one line per stage.
    pub fn text(&self, reports: &[(&'static str, DpReport)]) -> String {
        let mut out = String::new();
        let Some((_, first)) = reports.first() else {
            return out;
        };
        let _ = writeln!(
            out,
            "data parallel: {} replicas, link {} Gbit/s and {} us per message, buckets of {} MiB; --costs in ms",
            self.data_parallel, self.link_gbps, self.link_latency_us, self.bucket_mib
        );
        let _ = writeln!(
            out,
            "  gradients per replica per step: {:.2} MiB reduced, {:.2} MiB sent (2(D-1)/D of them)",
            first.grad_bytes / MIB,
            first.wire_bytes / MIB
        );
        let mut header = format!("  {:<20}", "");
        for (label, _) in reports {
            let _ = write!(header, "{label:>14}");
        }
        let _ = writeln!(out, "{}", header.trim_end());
        let rows: [TableRow; 6] = [
            ("step time", |r| format!("{:.4} ms", r.step_time)),
            ("compute makespan", |r| format!("{:.4} ms", r.compute_makespan)),
            ("exposed comm", |r| format!("{:.4} ms", r.exposed_comm)),
            ("  share of the step", |r| format!("{:.2}%", r.exposed_share * 100.0)),
            ("bubble (compute)", |r| format!("{:.2}%", r.bubble * 100.0)),
            ("idle in the step", |r| format!("{:.2}%", r.step_idle * 100.0)),
        ];
        for (name, cell) in rows {
            let mut line = format!("  {name:<20}");
            for (_, report) in reports {
                let _ = write!(line, "{:>14}", cell(report));
            }
            let _ = writeln!(out, "{line}");
        }
        for (s, stage) in first.stages.iter().enumerate() {
            let mut line = format!(
                "  stage {s}: {:.2} MiB in {} bucket(s), link busy {:.4} ms",
                stage.bytes / MIB,
                stage.buckets,
                stage.busy
            );
            for (label, report) in reports {
                if let Some(st) = report.stages.get(s) {
                    let _ = write!(
                        line,
                        "; {label} {:.4}..{:.4} ms (exposed {:.4})",
                        st.start, st.end, st.exposed
                    );
                }
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// One row of the text table: its name and how a report's cell reads.
type TableRow = (&'static str, fn(&DpReport) -> String);

/// Parses `--grad-mib`: comma-separated MiB, each finite and >= 0.
fn parse_grad_mib(text: &str) -> Result<Vec<f64>, CliError> {
    text.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, field)| match field.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            Ok(v) => Err(CliError::usage(format!(
                "--grad-mib: value {} = {v} must be finite and >= 0",
                i + 1
            ))),
            Err(_) => Err(CliError::usage(format!(
                "--grad-mib: value {} = `{field}` is not a number",
                i + 1
            ))),
        })
        .collect()
}

/// Gradient bytes of the default `baton train` model: every parameter plus the head's copy of the tied
/// embedding, fp32.
fn default_model_grad_bytes() -> f64 {
    let c = super::super::train::TrainConfig::default();
    let vocab = TokenizerKind::from_name(&c.tokenizer).map_or(256, TokenizerKind::vocab_size);
    let model = GptConfig {
        vocab_size: vocab,
        max_seq: c.seq,
        layers: c.layers,
        d_model: c.d_model,
        heads: c.heads,
    };
    (model.num_params() + model.vocab_size * model.d_model) as f64 * GRAD_ELEM_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_reduces_3_34_mib() {
        // 4 blocks of 12·128² + 13·128, embeddings (256 + 128)·128, final norm, the head's 256·128 copy.
        let params = 4 * (12 * 128 * 128 + 13 * 128) + (256 + 128) * 128 + 2 * 128 + 256 * 128;
        assert_eq!(default_model_grad_bytes(), params as f64 * 4.0);
        assert_eq!(format!("{:.2}", default_model_grad_bytes() / MIB), "3.34");
    }
}
