//! How the model's layers are divided among the pipeline's parts.
//!
//! A model is a sequence of units (for GPT-2: 0 is the embedding, 1..=L the transformer blocks, L+1 the head —
//! final layer norm, tied LM head, loss). A split gives each part (stage × chunk, in pipeline order)
//! a contiguous, non-empty range of units; together the ranges cover every unit exactly once,
//! in order. Anything else is refused — peers silently dropped layers; Baton never does.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::Model;

/// A stage split as the model author states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageSplit {
    /// The model's even split ([`Model::uniform_split`]; for GPT-2: blocks spread evenly, earlier parts taking
    /// the extra ones, the embedding joining the first part and the head the last).
    Uniform,
    /// Explicit unit ranges, one per part.
    Ranges(Vec<Range<usize>>),
    /// Unit names, one `(first, last)` pair per part (both inclusive), e.g. `("embedding", "h.1")`.
    Names(Vec<(String, String)>),
}

impl StageSplit {
    /// Explicit ranges, checked when the pipeline is built.
    pub fn ranges(ranges: Vec<Range<usize>>) -> Self {
        StageSplit::Ranges(ranges)
    }

    /// Parses the CLI's `--split`: unit ranges `0..2,2..4,4..6` (end exclusive), or unit names
    /// `embedding..=h.1,h.2..=head` (both ends inclusive; a single name is a part of one unit).
    pub fn parse(text: &str) -> Result<Self> {
        let pieces: Vec<&str> = text.split(',').map(str::trim).collect();
        let numeric = |piece: &str| -> Option<Range<usize>> {
            let (a, b) = piece.split_once("..")?;
            if b.starts_with('=') {
                return None;
            }
            Some(a.trim().parse().ok()?..b.trim().parse().ok()?)
        };
        if let Some(ranges) = pieces.iter().map(|p| numeric(p)).collect::<Option<Vec<_>>>() {
            return Ok(StageSplit::Ranges(ranges));
        }
        let mut names = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let (a, b) = piece.split_once("..=").unwrap_or((piece, piece));
            let (a, b) = (a.trim(), b.trim());
            if a.is_empty() || b.is_empty() || a.contains("..") || b.contains("..") {
                return Err(EngineError::Split(format!(
                    "`{piece}` is not a range like 0..3 or unit names like embedding..=h.1 (in --split `{text}`)"
                )));
            }
            names.push((a.to_string(), b.to_string()));
        }
        Ok(StageSplit::Names(names))
    }

    /// The unit ranges for `parts` parts of `model`, checked: contiguous, non-empty, every unit once, in order.
    pub fn resolve<B: Backend>(&self, model: &dyn Model<B>, parts: usize) -> Result<Vec<Range<usize>>> {
        let units = model.num_units();
        if parts == 0 {
            return Err(EngineError::Split("zero parts".into()));
        }
        if parts > units {
            return Err(EngineError::Split(format!(
                "{parts} parts (stages × chunks) but the model has only {units} layers ({} … {}); use at most {units} parts (fewer stages or chunks) or a model with more layers",
                model.unit_name(0),
                model.unit_name(units - 1)
            )));
        }
        let ranges = match self {
            StageSplit::Uniform => model.uniform_split(parts),
            StageSplit::Ranges(r) => r.clone(),
            StageSplit::Names(names) => {
                let index = |name: &str| {
                    (0..units).find(|&u| model.unit_name(u) == name).ok_or_else(|| {
                        EngineError::Split(format!(
                            "no unit is named `{name}`; the units are {} … {}",
                            model.unit_name(0),
                            model.unit_name(units - 1)
                        ))
                    })
                };
                names
                    .iter()
                    .map(|(a, b)| Ok(index(a)?..index(b)? + 1))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        check(&ranges, units, parts)?;
        Ok(ranges)
    }
}

fn check(ranges: &[Range<usize>], units: usize, parts: usize) -> Result<()> {
    if ranges.len() != parts {
        return Err(EngineError::Split(format!(
            "{} ranges given but the pipeline has {parts} parts (stages × chunks)",
            ranges.len()
        )));
    }
    let mut next = 0;
    for (i, r) in ranges.iter().enumerate() {
        if r.start >= r.end {
            return Err(EngineError::Split(format!(
                "part {i} gets the empty range {}..{}",
                r.start, r.end
            )));
        }
        if r.start > next {
            return Err(EngineError::Split(format!(
                "layers {next}..{} are dropped (part {i} starts at {})",
                r.start, r.start
            )));
        }
        if r.start < next {
            return Err(EngineError::Split(format!(
                "part {i} ({}..{}) repeats or reorders layers: the previous part ends at {next}",
                r.start, r.end
            )));
        }
        next = r.end;
    }
    if next != units {
        let reason = if next < units {
            format!("layers {next}..{units} are dropped (the last part ends at {next})")
        } else {
            format!("the last part ends at {next} but the model has {units} layers (0..{units})")
        };
        return Err(EngineError::Split(reason));
    }
    Ok(())
}
