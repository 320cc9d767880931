//! Deterministic parameter initialisation, keyed by parameter name and seed, so every stage
//! split builds bitwise the same initial model.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// GPT-2's initialisation standard deviation.
pub const INIT_STD: f32 = 0.02;

/// A seeded RNG for one named parameter: FNV-1a of the name mixed with the seed.
fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&h.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A uniform sample in [0, 1) with 53 random bits.
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `len` samples of N(0, std²) for parameter `name` (Box–Muller on the seeded stream).
pub fn normal(seed: u64, name: &str, len: usize, std: f32) -> Vec<f32> {
    let mut rng = rng_for(seed, name);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // u1 in (0, 1] so the log is finite.
        let u1 = 1.0 - unit(&mut rng);
        let u2 = unit(&mut rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32 * std);
        out.push((r * theta.sin()) as f32 * std);
    }
    out.truncate(len);
    out
}
