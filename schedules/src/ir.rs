//! The schedule IR: compute actions, the placement of model parts on stages, and schedules.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ScheduleError;

/// Most stages a schedule may have (a limit on everything: keeps every index in `u32`).
pub const STAGES_MAX: u32 = 4096;
/// Most micro-batches a schedule may have.
pub const MICROBATCHES_MAX: u32 = 1 << 20;
/// Most model chunks per stage.
pub const CHUNKS_MAX: u32 = 64;

/// What a compute action does to one micro-batch on one model part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    /// Forward pass.
    F,
    /// Full backward pass (input gradient and weight gradient together).
    B,
    /// Input-gradient half of the backward pass (zero-bubble schedules).
    I,
    /// Weight-gradient half of the backward pass; needs what `I` stashed.
    W,
}

impl Op {
    /// All ops, in a fixed order.
    pub const ALL: [Op; 4] = [Op::F, Op::B, Op::I, Op::W];

    /// The one-letter name used by PyTorch's action strings.
    pub fn letter(self) -> char {
        match self {
            Op::F => 'F',
            Op::B => 'B',
            Op::I => 'I',
            Op::W => 'W',
        }
    }

    /// Parses the one-letter name.
    pub fn from_letter(c: char) -> Option<Op> {
        match c {
            'F' => Some(Op::F),
            'B' => Some(Op::B),
            'I' => Some(Op::I),
            'W' => Some(Op::W),
            _ => None,
        }
    }

    /// True for the ops that produce the gradient sent to the previous part (B and I).
    pub fn is_input_grad(self) -> bool {
        matches!(self, Op::B | Op::I)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// One compute action in a stage's ordered list: `op` on micro-batch `mb` for the stage's chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Action {
    /// What is computed.
    pub op: Op,
    /// Micro-batch index, `0..microbatches`.
    pub mb: u32,
    /// Chunk index on the stage, `0..chunks`; the placement maps it to a model part.
    pub chunk: u32,
}

impl Action {
    /// Shorthand constructor.
    pub fn new(op: Op, mb: u32, chunk: u32) -> Self {
        Action { op, mb, chunk }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.op, self.mb)?;
        if self.chunk > 0 {
            write!(f, ".{}", self.chunk)?;
        }
        Ok(())
    }
}

/// Which model part each (stage, chunk) holds. Parts `0..stages*chunks` run in order:
/// part k's forward output is part k+1's input.
///
/// Invariant (checked by [`Placement::new`]): every part appears exactly once, and every
/// stage holds the same number of chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    parts: Vec<Vec<u32>>,
    /// `owner[part] = (stage, chunk)`, derived from `parts`.
    #[serde(skip)]
    owner: Vec<(u32, u32)>,
}

impl Placement {
    /// Builds a placement from `parts[stage][chunk] = part`, checking that it is a permutation.
    pub fn new(parts: Vec<Vec<u32>>) -> Result<Self, ScheduleError> {
        let stages = parts.len();
        if stages == 0 {
            return Err(ScheduleError::Placement("no stages".into()));
        }
        let chunks = parts[0].len();
        if chunks == 0 {
            return Err(ScheduleError::Placement("stage 0 holds no chunk".into()));
        }
        let total = stages * chunks;
        let mut owner = vec![(u32::MAX, u32::MAX); total];
        for (s, row) in parts.iter().enumerate() {
            if row.len() != chunks {
                return Err(ScheduleError::Placement(format!(
                    "stage {s} holds {} chunks but stage 0 holds {chunks}; every stage must hold the same number",
                    row.len()
                )));
            }
            for (c, &part) in row.iter().enumerate() {
                let Some(slot) = owner.get_mut(part as usize) else {
                    return Err(ScheduleError::Placement(format!(
                        "stage {s} chunk {c} holds part {part}, but there are only {total} parts"
                    )));
                };
                if slot.0 != u32::MAX {
                    return Err(ScheduleError::Placement(format!(
                        "part {part} is held twice: by stage {} chunk {} and by stage {s} chunk {c}",
                        slot.0, slot.1
                    )));
                }
                *slot = (s as u32, c as u32);
            }
        }
        // Every slot was filled: `total` distinct in-range parts were placed.
        debug_assert!(owner.iter().all(|o| o.0 != u32::MAX));
        Ok(Placement { parts, owner })
    }

    /// One chunk per stage, stage s holds part s.
    pub fn linear(stages: u32) -> Self {
        Self::looped(stages, 1)
    }

    /// Megatron's looped placement: stage s chunk c holds part `c * stages + s`.
    pub fn looped(stages: u32, chunks: u32) -> Self {
        let parts = (0..stages)
            .map(|s| (0..chunks).map(|c| c * stages + s).collect())
            .collect();
        Self::new(parts).expect("looped placement is a permutation by construction")
    }

    /// The V-shaped placement of ZB-V: stage s holds part s (chunk 0) and part `2*stages-1-s` (chunk 1).
    pub fn v_shape(stages: u32) -> Self {
        let parts = (0..stages).map(|s| vec![s, 2 * stages - 1 - s]).collect();
        Self::new(parts).expect("V placement is a permutation by construction")
    }

    /// Number of stages.
    pub fn stages(&self) -> u32 {
        self.parts.len() as u32
    }

    /// Number of chunks per stage.
    pub fn chunks(&self) -> u32 {
        self.parts[0].len() as u32
    }

    /// Number of model parts (`stages * chunks`).
    pub fn num_parts(&self) -> u32 {
        self.owner.len() as u32
    }

    /// The part held by `(stage, chunk)`, if both are in range.
    pub fn part(&self, stage: u32, chunk: u32) -> Option<u32> {
        self.parts.get(stage as usize)?.get(chunk as usize).copied()
    }

    /// The `(stage, chunk)` holding `part`, if it is in range.
    pub fn owner(&self, part: u32) -> Option<(u32, u32)> {
        self.owner.get(part as usize).copied()
    }

    /// `parts[stage][chunk]`, as in the JSON format.
    pub fn as_rows(&self) -> &[Vec<u32>] {
        &self.parts
    }
}

/// The schedule families Baton generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// All forwards, then all backwards.
    GPipe,
    /// PipeDream-Flush one-forward-one-backward.
    OneFOneB,
    /// Megatron's interleaved 1F1B over looped chunks.
    Interleaved,
    /// Zero-bubble H1: 1F1B memory, W deferred into the bubbles.
    ZbH1,
    /// Zero-bubble V: two chunks per stage in a V, near-zero bubble.
    ZbV,
    /// PipeDream-2BW: 1F1B without a flush, weights updated every window of micro-batches, at
    /// most two weight versions per stage (see [`crate::weight_versions`]).
    TwoBw,
    /// Imported from outside (for example a PyTorch CSV).
    Custom,
}

impl ScheduleKind {
    /// Every generated kind, in the CLI's order.
    pub const GENERATED: [ScheduleKind; 6] = [
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
        ScheduleKind::ZbV,
        ScheduleKind::TwoBw,
    ];

    /// The CLI / JSON name (`gpipe`, `1f1b`, `interleaved`, `zb-h1`, `zb-v`, `2bw`, `custom`).
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::ZbH1 => "zb-h1",
            ScheduleKind::ZbV => "zb-v",
            ScheduleKind::TwoBw => "2bw",
            ScheduleKind::Custom => "custom",
        }
    }

    /// Parses a CLI / JSON name.
    pub fn from_name(name: &str) -> Result<Self, ScheduleError> {
        match name {
            "gpipe" => Ok(ScheduleKind::GPipe),
            "1f1b" => Ok(ScheduleKind::OneFOneB),
            "interleaved" => Ok(ScheduleKind::Interleaved),
            "zb-h1" => Ok(ScheduleKind::ZbH1),
            "zb-v" => Ok(ScheduleKind::ZbV),
            "2bw" => Ok(ScheduleKind::TwoBw),
            "custom" => Ok(ScheduleKind::Custom),
            other => Err(ScheduleError::UnknownKind(other.to_string())),
        }
    }

    /// True when the schedule accumulates each part's weight gradients in micro-batch order
    /// 0, 1, 2, ... (so a pipelined run can be bitwise equal to an unpipelined one).
    pub fn keeps_accumulation_order(self) -> bool {
        !matches!(self, ScheduleKind::Custom)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pipeline schedule: one ordered list of compute actions per stage, and the placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Which family produced it.
    pub kind: ScheduleKind,
    /// Number of micro-batches per step.
    pub microbatches: u32,
    /// Which part each (stage, chunk) holds.
    pub placement: Placement,
    /// `actions[stage]` is the stage's ordered action list.
    pub actions: Vec<Vec<Action>>,
}

impl Schedule {
    /// Number of stages.
    pub fn stages(&self) -> u32 {
        self.placement.stages()
    }

    /// Chunks per stage.
    pub fn chunks(&self) -> u32 {
        self.placement.chunks()
    }

    /// Total number of compute actions over all stages.
    pub fn num_actions(&self) -> usize {
        self.actions.iter().map(Vec::len).sum()
    }

    /// The model part that `action` on `stage` computes, if the chunk is in range.
    pub fn part_of(&self, stage: u32, action: &Action) -> Option<u32> {
        self.placement.part(stage, action.chunk)
    }
}
