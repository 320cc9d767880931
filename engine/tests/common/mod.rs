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
    batches_with(n, BATCH, SEQ, VOCAB, 0x9e37_79b9_7f4a_7c15)
}

/// `n` batches of `batch` sequences of `seq` tokens below `vocab`, from a xorshift seeded by `seed`.
pub fn batches_with(n: usize, batch: usize, seq: usize, vocab: usize, seed: u64) -> Vec<Batch> {
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    (0..n)
        .map(|_| {
            let stream: Vec<u32> = (0..batch * (seq + 1)).map(|_| next()).collect();
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for row in stream.chunks(seq + 1) {
                inputs.extend_from_slice(&row[..seq]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch,
                seq,
            }
        })
        .collect()
}
