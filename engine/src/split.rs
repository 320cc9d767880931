//! How the model's layers are divided among the pipeline's parts.
//!
//! Global layer units: 0 is the embedding, 1..=L the transformer blocks, L+1 the head (final
//! layer norm, tied LM head, loss). A split gives each part (stage × chunk, in pipeline order)
//! a contiguous, non-empty range of units; together the ranges cover every unit exactly once,
//! in order. Anything else is refused — peers silently dropped layers; Baton never does.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::model::GptConfig;

/// A stage split as the model author states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageSplit {
    /// Blocks spread evenly (earlier parts take the extra ones); the embedding joins the first
    /// part and the head the last. With more parts than blocks, units are spread evenly.
    Uniform,
    /// Explicit unit ranges, one per part.
    Ranges(Vec<Range<usize>>),
}

impl StageSplit {
    /// Explicit ranges, checked when the pipeline is built.
    pub fn ranges(ranges: Vec<Range<usize>>) -> Self {
        StageSplit::Ranges(ranges)
    }

    /// Parses `0..2,2..4,4..6` (the CLI's `--split`).
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Vec::new();
        for piece in text.split(',') {
            let piece = piece.trim();
            let bad = || EngineError::Split(format!("`{piece}` is not a range like 0..3 (in --split `{text}`)"));
            let (a, b) = piece.split_once("..").ok_or_else(bad)?;
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            out.push(a..b);
        }
        Ok(StageSplit::Ranges(out))
    }

    /// The unit ranges for `parts` parts of `cfg`, checked.
    pub fn resolve(&self, cfg: &GptConfig, parts: usize) -> Result<Vec<Range<usize>>> {
        let units = cfg.num_units();
        if parts == 0 {
            return Err(EngineError::Split("zero parts".into()));
        }
        if parts > units {
            return Err(EngineError::Split(format!(
                "{parts} parts (stages × chunks) but the model has only {units} layers (embedding, {} blocks, head); use at most {units} parts or add layers",
                cfg.layers
            )));
        }
        let ranges = match self {
            StageSplit::Uniform => uniform(cfg.layers, parts),
            StageSplit::Ranges(r) => r.clone(),
        };
        check(&ranges, units, parts)?;
        Ok(ranges)
    }
}

fn even(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

fn uniform(blocks: usize, parts: usize) -> Vec<Range<usize>> {
    let sizes = if parts <= blocks {
        let mut sizes = even(blocks, parts);
        sizes[0] += 1; // embedding
        sizes[parts - 1] += 1; // head
        sizes
    } else {
        even(blocks + 2, parts)
    };
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
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
