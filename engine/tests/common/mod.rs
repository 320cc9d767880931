//! Shared helpers for the engine's integration tests: a tiny model and deterministic batches.

#![allow(dead_code)]

use baton_engine::data::Batch;
use baton_engine::GptConfig;

/// Sequences per batch.
pub const BATCH: usize = 8;
/// Tokens per sequence.
pub const SEQ: usize = 8;
/// Vocabulary.
pub const VOCAB: usize = 29;

/// A 6-block model: 8 layer units, enough for 4 stages × 2 chunks.
pub fn tiny_model() -> GptConfig {
    GptConfig {
        vocab_size: VOCAB,
        max_seq: SEQ,
        layers: 6,
        d_model: 16,
        heads: 2,
    }
}

/// `n` deterministic pseudo-random batches (xorshift), different per step.
pub fn batches(n: usize) -> Vec<Batch> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % VOCAB as u64) as u32
    };
    (0..n)
        .map(|_| {
            let stream: Vec<u32> = (0..BATCH * (SEQ + 1)).map(|_| next()).collect();
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for row in stream.chunks(SEQ + 1) {
                inputs.extend_from_slice(&row[..SEQ]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch: BATCH,
                seq: SEQ,
            }
        })
        .collect()
}
