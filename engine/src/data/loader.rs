//! Batching: the train/validation split, the shuffled resumable training loader, and the
//! sequential validation iterator.
//!
//! A token stream of `n` tokens holds `(n - 1) / seq` *windows*: the non-overlapping positions
//! `k * seq` from which `seq + 1` consecutive tokens fit. A window gives one row of a batch:
//! its first `seq` tokens are the inputs and its last `seq` the targets (shifted by one).
//!
//! The training loader visits every window once per epoch, in an order shuffled by a
//! ChaCha8 RNG seeded from `(seed, epoch)` alone, so the order of an epoch does not depend on
//! what came before and a loader resumed from a [`LoaderState`] continues exactly where the
//! saved one stood. Windows left over at the end of an epoch (fewer than `batch`) are skipped.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::DataError;

/// One batch: `batch` rows of `seq` tokens each, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input tokens, `batch * seq` of them.
    pub inputs: Vec<u32>,
    /// Target tokens (the inputs shifted left by one), `batch * seq` of them.
    pub targets: Vec<u32>,
    /// Number of rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
}

/// Where a [`DataLoader`] stands; save it with a checkpoint and hand it to
/// [`DataLoader::resume`] to carry on with the same batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderState {
    /// The loader's seed.
    pub seed: u64,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// Windows of the current epoch already served.
    pub cursor: u64,
}

/// Checks `batch` and `seq` and returns the number of windows in `len` tokens, or the error
/// saying why one batch does not fit.
fn count_windows(len: usize, batch: usize, seq: usize, part: &'static str) -> Result<usize, DataError> {
    if batch == 0 {
        return Err(DataError::ZeroSize { name: "batch" });
    }
    if seq == 0 {
        return Err(DataError::ZeroSize { name: "seq" });
    }
    let needed = batch.saturating_mul(seq).saturating_add(1);
    if len < needed {
        return Err(DataError::TooFewTokens {
            part,
            batch,
            seq,
            needed,
            have: len,
        });
    }
    Ok((len - 1) / seq)
}

/// Copies the windows `starts` (window indices) of `tokens` into a batch.
fn gather(tokens: &[u32], seq: usize, windows: impl ExactSizeIterator<Item = usize>) -> Batch {
    let batch = windows.len();
    let mut inputs = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for window in windows {
        let start = window * seq;
        inputs.extend_from_slice(&tokens[start..start + seq]);
        targets.extend_from_slice(&tokens[start + 1..start + seq + 1]);
    }
    Batch {
        inputs,
        targets,
        batch,
        seq,
    }
}

/// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-and-reject method.
///
/// Written out here rather than taken from `rand`'s distributions so that the sampling (and
/// hence every epoch's order) cannot change with `rand`'s version or feature flags.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(n);
        if product as u64 >= threshold {
            return (product >> 64) as u64;
        }
    }
}

/// The window order of `epoch`: a permutation of `0..windows` from a ChaCha8 RNG whose 32-byte
/// seed is `seed` (little-endian) then `epoch` (little-endian) then zeros.
fn epoch_order(seed: u64, epoch: u64, windows: usize) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<usize> = (0..windows).collect();
    // Fisher–Yates (Durstenfeld).
    for i in (1..windows).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A deterministic, seeded, resumable loader of shuffled training batches.
#[derive(Debug, Clone)]
pub struct DataLoader {
    tokens: Arc<[u32]>,
    batch: usize,
    seq: usize,
    windows: usize,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
}

impl DataLoader {
    /// A loader over `tokens` serving batches of `batch` rows of `seq` tokens, shuffled by `seed`,
    /// starting at epoch 0.
    ///
    /// Errors if `batch` or `seq` is zero, or if `tokens` holds fewer than `batch * seq + 1` tokens.
    pub fn new(tokens: impl Into<Arc<[u32]>>, batch: usize, seq: usize, seed: u64) -> Result<Self, DataError> {
        Self::resume(
            tokens,
            batch,
            seq,
            LoaderState {
                seed,
                epoch: 0,
                cursor: 0,
            },
        )
    }

    /// A loader that continues from a saved [`LoaderState`]: given the same tokens, `batch` and
    /// `seq` as the loader the state was taken from, it yields exactly the batches that loader
    /// would have yielded next.
    ///
    /// Errors as [`DataLoader::new`], or if the state's cursor is past the end of an epoch.
    pub fn resume(
        tokens: impl Into<Arc<[u32]>>,
        batch: usize,
        seq: usize,
        state: LoaderState,
    ) -> Result<Self, DataError> {
        Self::build(tokens.into(), batch, seq, state, "loader")
    }

    fn build(
        tokens: Arc<[u32]>,
        batch: usize,
        seq: usize,
        state: LoaderState,
        part: &'static str,
    ) -> Result<Self, DataError> {
        let windows = count_windows(tokens.len(), batch, seq, part)?;
        let cursor = usize::try_from(state.cursor)
            .ok()
            .filter(|&c| c <= windows)
            .ok_or(DataError::InvalidState {
                cursor: state.cursor,
                windows,
            })?;
        let mut loader = DataLoader {
            tokens,
            batch,
            seq,
            windows,
            seed: state.seed,
            epoch: state.epoch,
            cursor,
            order: Vec::new(),
        };
        if loader.cursor + batch > windows {
            loader.epoch = loader.epoch.wrapping_add(1);
            loader.cursor = 0;
        }
        loader.order = epoch_order(loader.seed, loader.epoch, windows);
        Ok(loader)
    }

    /// The next training batch. Moves on to the next epoch (a new order) once fewer than
    /// `batch` windows of the current one are left.
    pub fn next_batch(&mut self) -> Batch {
        let rows = &self.order[self.cursor..self.cursor + self.batch];
        let batch = gather(&self.tokens, self.seq, rows.iter().copied());
        self.cursor += self.batch;
        if self.cursor + self.batch > self.windows {
            self.epoch = self.epoch.wrapping_add(1);
            self.cursor = 0;
            self.order = epoch_order(self.seed, self.epoch, self.windows);
        }
        batch
    }

    /// Where the loader stands: the batch [`DataLoader::next_batch`] returns next is the one a
    /// loader resumed from this state returns first.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            seed: self.seed,
            epoch: self.epoch,
            cursor: self.cursor as u64,
        }
    }

    /// The first `max` batches of this loader's windows in their natural order (window 0, 1, 2…),
    /// unshuffled and independent of the loader's state: the evaluation pass over these tokens.
    pub fn eval_batches(&self, max: usize) -> EvalBatches {
        EvalBatches::from_parts(Arc::clone(&self.tokens), self.batch, self.seq, self.windows, max)
    }

    /// Rows per batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens per row.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Windows (rows) in the token stream: `(tokens - 1) / seq`.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// Batches served per epoch: `windows / batch`.
    pub fn batches_per_epoch(&self) -> usize {
        self.windows / self.batch
    }

    /// The loader's tokens.
    pub fn tokens(&self) -> &Arc<[u32]> {
        &self.tokens
    }
}

/// A fixed, sequential (unshuffled) iterator over batches of consecutive windows, for evaluation.
#[derive(Debug, Clone)]
pub struct EvalBatches {
    tokens: Arc<[u32]>,
    batch: usize,
    seq: usize,
    next_window: usize,
    remaining: usize,
}

impl EvalBatches {
    /// At most `max` batches over `tokens`, windows in order; the tail that does not fill a
    /// batch is skipped.
    ///
    /// Errors if `batch` or `seq` is zero, or if `tokens` holds fewer than `batch * seq + 1` tokens.
    pub fn new(tokens: impl Into<Arc<[u32]>>, batch: usize, seq: usize, max: usize) -> Result<Self, DataError> {
        let tokens = tokens.into();
        let windows = count_windows(tokens.len(), batch, seq, "validation")?;
        Ok(Self::from_parts(tokens, batch, seq, windows, max))
    }

    fn from_parts(tokens: Arc<[u32]>, batch: usize, seq: usize, windows: usize, max: usize) -> Self {
        EvalBatches {
            tokens,
            batch,
            seq,
            next_window: 0,
            remaining: (windows / batch).min(max),
        }
    }
}

impl Iterator for EvalBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.remaining == 0 {
            return None;
        }
        let start = self.next_window;
        self.next_window += self.batch;
        self.remaining -= 1;
        Some(gather(&self.tokens, self.seq, start..start + self.batch))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for EvalBatches {}

/// A token stream cut into a training part and a validation part (the last `val_fraction` of
/// the tokens), each checked to hold at least one batch.
#[derive(Debug, Clone)]
pub struct Split {
    train: Arc<[u32]>,
    val: Arc<[u32]>,
    batch: usize,
    seq: usize,
}

impl Split {
    /// The default validation fraction.
    pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

    /// Splits `tokens`: validation is the last `round(len * val_fraction)` tokens, training the
    /// rest. Both must hold at least one batch of `batch` rows of `seq` tokens
    /// (`batch * seq + 1` tokens); when the fraction leaves validation short of one batch but the
    /// tokens hold a batch for each part, validation takes exactly one batch's worth instead (large
    /// batches on a small corpus).
    ///
    /// Errors if `val_fraction` is not strictly between 0 and 1, if `batch` or `seq` is zero, or
    /// if either part is too short (saying how many tokens it needs and has).
    pub fn new(tokens: &[u32], val_fraction: f64, batch: usize, seq: usize) -> Result<Self, DataError> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(DataError::InvalidValFraction { value: val_fraction });
        }
        let one_batch = batch.saturating_mul(seq).saturating_add(1);
        let mut val_len = ((tokens.len() as f64) * val_fraction).round() as usize;
        if val_len < one_batch && tokens.len() >= one_batch.saturating_mul(2) {
            val_len = one_batch;
        }
        let (train, val) = tokens.split_at(tokens.len() - val_len.min(tokens.len()));
        count_windows(train.len(), batch, seq, "training")?;
        count_windows(val.len(), batch, seq, "validation")?;
        Ok(Split {
            train: Arc::from(train),
            val: Arc::from(val),
            batch,
            seq,
        })
    }

    /// The training tokens.
    pub fn train(&self) -> &Arc<[u32]> {
        &self.train
    }

    /// The validation tokens.
    pub fn val(&self) -> &Arc<[u32]> {
        &self.val
    }

    /// Rows per batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens per row.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// A shuffled training loader over the training tokens, starting at epoch 0.
    pub fn train_loader(&self, seed: u64) -> Result<DataLoader, DataError> {
        self.resume_train_loader(LoaderState {
            seed,
            epoch: 0,
            cursor: 0,
        })
    }

    /// A training loader over the training tokens, resumed from `state`.
    pub fn resume_train_loader(&self, state: LoaderState) -> Result<DataLoader, DataError> {
        DataLoader::build(Arc::clone(&self.train), self.batch, self.seq, state, "training")
    }

    /// At most `max` sequential validation batches.
    pub fn eval_batches(&self, max: usize) -> EvalBatches {
        let windows = (self.val.len() - 1) / self.seq;
        EvalBatches::from_parts(Arc::clone(&self.val), self.batch, self.seq, windows, max)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ramp(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    fn take(loader: &mut DataLoader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch()).collect()
    }

    #[test]
    fn batches_have_shifted_targets_and_window_starts() {
        let tokens = ramp(1000);
        let mut loader = DataLoader::new(tokens, 4, 16, 1).unwrap();
        assert_eq!(loader.windows(), 999 / 16);
        for _ in 0..20 {
            let b = loader.next_batch();
            assert_eq!((b.batch, b.seq), (4, 16));
            assert_eq!(b.inputs.len(), 64);
            assert_eq!(b.targets.len(), 64);
            for row in 0..4 {
                let inp = &b.inputs[row * 16..(row + 1) * 16];
                let tgt = &b.targets[row * 16..(row + 1) * 16];
                assert_eq!(inp[0] % 16, 0, "window starts at a multiple of seq");
                for t in 0..16 {
                    assert_eq!(inp[t], inp[0] + t as u32);
                    assert_eq!(tgt[t], inp[t] + 1);
                }
            }
        }
    }

    #[test]
    fn each_epoch_visits_every_window_once_and_drops_the_tail() {
        // 101 tokens, seq 10 -> 10 windows; batch 3 -> 3 batches per epoch, 1 window dropped.
        let mut loader = DataLoader::new(ramp(101), 3, 10, 42).unwrap();
        assert_eq!(loader.windows(), 10);
        assert_eq!(loader.batches_per_epoch(), 3);
        let mut epochs = Vec::new();
        for epoch in 0..4u64 {
            assert_eq!(
                loader.state(),
                LoaderState {
                    seed: 42,
                    epoch,
                    cursor: 0
                }
            );
            let mut starts = Vec::new();
            for _ in 0..3 {
                let b = loader.next_batch();
                starts.extend((0..3).map(|r| b.inputs[r * 10] / 10));
            }
            let distinct: BTreeSet<u32> = starts.iter().copied().collect();
            assert_eq!(distinct.len(), 9, "no window twice in an epoch: {starts:?}");
            epochs.push(starts);
        }
        assert_eq!(loader.epoch(), 4);
        assert!(
            epochs.windows(2).any(|w| w[0] != w[1]),
            "epochs are shuffled differently"
        );
    }

    #[test]
    fn same_seed_same_batches_different_seed_differs() {
        let tokens: Arc<[u32]> = ramp(5000).into();
        let mut a = DataLoader::new(Arc::clone(&tokens), 4, 8, 7).unwrap();
        let mut b = DataLoader::new(Arc::clone(&tokens), 4, 8, 7).unwrap();
        let mut c = DataLoader::new(Arc::clone(&tokens), 4, 8, 8).unwrap();
        let (ba, bb, bc) = (take(&mut a, 400), take(&mut b, 400), take(&mut c, 400));
        assert_eq!(ba, bb);
        assert_ne!(ba, bc);
        assert_ne!(ba[..5], bc[..5]);
    }

    #[test]
    fn epoch_order_is_fixed_by_seed_and_epoch() {
        // Pin the order so that any change in the RNG or shuffle (which would break resuming old
        // checkpoints) is caught.
        assert_eq!(epoch_order(0, 0, 0), Vec::<usize>::new());
        assert_eq!(epoch_order(0, 0, 1), vec![0]);
        let order = epoch_order(1234, 5, 10);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(order, epoch_order(1234, 5, 10));
        assert_ne!(order, epoch_order(1234, 6, 10));
        assert_ne!(order, epoch_order(1235, 5, 10));
        assert_eq!(order, PINNED_ORDER_1234_5_10);
    }

    const PINNED_ORDER_1234_5_10: [usize; 10] = [9, 1, 0, 8, 5, 2, 6, 4, 7, 3];

    #[test]
    fn below_is_in_range() {
        let mut rng = ChaCha8Rng::from_seed([3; 32]);
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(below(&mut rng, n) < n);
            }
        }
    }

    #[test]
    fn resume_yields_the_same_batches() {
        let tokens: Arc<[u32]> = ramp(3000).into();
        let mut original = DataLoader::new(Arc::clone(&tokens), 4, 16, 99).unwrap();
        take(&mut original, 7);
        let state = original.state();
        let json = serde_json::to_string(&state).unwrap();
        let expected = take(&mut original, 5);

        let restored: LoaderState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, state);
        let mut resumed = DataLoader::resume(Arc::clone(&tokens), 4, 16, restored).unwrap();
        assert_eq!(take(&mut resumed, 5), expected);
        assert_eq!(resumed.state(), original.state());
    }

    #[test]
    fn resume_across_epoch_boundaries() {
        // 46 batches per epoch: resuming at every step of two epochs matches the original.
        let tokens: Arc<[u32]> = ramp(3000).into();
        let mut original = DataLoader::new(Arc::clone(&tokens), 4, 16, 5).unwrap();
        assert_eq!(original.batches_per_epoch(), 46);
        for _ in 0..100 {
            let mut resumed = DataLoader::resume(Arc::clone(&tokens), 4, 16, original.state()).unwrap();
            assert_eq!(resumed.next_batch(), original.next_batch());
        }
        assert_eq!(original.epoch(), 2);
    }

    #[test]
    fn resume_rejects_a_cursor_past_the_epoch() {
        let err = DataLoader::resume(
            ramp(101),
            3,
            10,
            LoaderState {
                seed: 0,
                epoch: 0,
                cursor: 11,
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DataError::InvalidState {
                    cursor: 11,
                    windows: 10
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("11"), "{err}");
        // A cursor at the end of an epoch rolls over to the next one.
        let loader = DataLoader::resume(
            ramp(101),
            3,
            10,
            LoaderState {
                seed: 0,
                epoch: 2,
                cursor: 10,
            },
        )
        .unwrap();
        assert_eq!(
            loader.state(),
            LoaderState {
                seed: 0,
                epoch: 3,
                cursor: 0
            }
        );
    }

    #[test]
    fn loader_errors() {
        let err = DataLoader::new(ramp(100), 0, 8, 0).unwrap_err();
        assert!(matches!(err, DataError::ZeroSize { name: "batch" }), "{err:?}");
        assert_eq!(err.to_string(), "batch must be at least 1, got 0");
        let err = DataLoader::new(ramp(100), 2, 0, 0).unwrap_err();
        assert!(matches!(err, DataError::ZeroSize { name: "seq" }), "{err:?}");

        // 4 * 8 + 1 = 33 tokens needed.
        let err = DataLoader::new(ramp(32), 4, 8, 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    needed: 33,
                    have: 32,
                    batch: 4,
                    seq: 8,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("need 33") && msg.contains("there are 32"), "{msg}");
        assert!(DataLoader::new(ramp(33), 4, 8, 0).is_ok());
        let err = DataLoader::new(Vec::new(), 1, 1, 0).unwrap_err();
        assert!(
            matches!(err, DataError::TooFewTokens { needed: 2, have: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn smallest_stream_serves_its_one_batch_every_epoch() {
        // 9 tokens, seq 4 -> 2 windows = one batch of 2 per epoch, rows in a per-epoch order.
        let mut loader = DataLoader::new(ramp(9), 2, 4, 0).unwrap();
        for epoch in 1..=6 {
            let b = loader.next_batch();
            assert_eq!(loader.epoch(), epoch);
            let mut rows = [b.inputs[..4].to_vec(), b.inputs[4..].to_vec()];
            rows.sort();
            assert_eq!(rows, [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        }
    }

    #[test]
    fn eval_batches_are_sequential_and_bounded() {
        let loader = DataLoader::new(ramp(101), 3, 10, 0).unwrap();
        let all: Vec<Batch> = loader.eval_batches(usize::MAX).collect();
        assert_eq!(all.len(), 3);
        for (i, b) in all.iter().enumerate() {
            let expected: Vec<u32> = (i as u32 * 30..i as u32 * 30 + 30).collect();
            assert_eq!(b.inputs, expected);
            assert_eq!(b.targets, expected.iter().map(|t| t + 1).collect::<Vec<_>>());
        }
        let two = loader.eval_batches(2);
        assert_eq!(two.len(), 2);
        assert_eq!(two.collect::<Vec<_>>(), all[..2]);
        assert_eq!(loader.eval_batches(0).count(), 0);
        // Fixed: the same every time.
        assert_eq!(loader.eval_batches(3).collect::<Vec<_>>(), all);

        let direct: Vec<Batch> = EvalBatches::new(ramp(101), 3, 10, 10).unwrap().collect();
        assert_eq!(direct, all);
        let err = EvalBatches::new(ramp(30), 3, 10, 1).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    part: "validation",
                    needed: 31,
                    have: 30,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn split_takes_the_last_fraction_for_validation() {
        let tokens = ramp(1000);
        let split = Split::new(&tokens, Split::DEFAULT_VAL_FRACTION, 2, 8).unwrap();
        assert_eq!(split.train().len(), 900);
        assert_eq!(split.val().len(), 100);
        assert_eq!(split.train()[..], tokens[..900]);
        assert_eq!(split.val()[..], tokens[900..]);
        assert_eq!((split.batch(), split.seq()), (2, 8));

        let mut train = split.train_loader(3).unwrap();
        for _ in 0..200 {
            assert!(train.next_batch().targets.iter().all(|&t| t < 900));
        }
        let state = train.state();
        let expected = train.next_batch();
        assert_eq!(split.resume_train_loader(state).unwrap().next_batch(), expected);

        let val: Vec<Batch> = split.eval_batches(usize::MAX).collect();
        assert_eq!(val.len(), (99 / 8) / 2);
        assert_eq!(val[0].inputs[0], 900);
        assert!(val.iter().all(|b| b.inputs.iter().all(|&t| t >= 900)));
    }

    #[test]
    fn split_errors() {
        let tokens = ramp(1000);
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let err = Split::new(&tokens, bad, 2, 8).unwrap_err();
            assert!(matches!(err, DataError::InvalidValFraction { .. }), "{bad}: {err:?}");
        }
        // 10% is 100 tokens, short of one batch of 4 x 32 (129): validation takes 129, training the rest.
        let split = Split::new(&tokens, 0.1, 4, 32).unwrap();
        assert_eq!((split.val().len(), split.train().len()), (129, 871));
        assert_eq!(split.val()[0], 871, "validation is still the tail");
        // 200 tokens cannot hold a batch for each part: validation (20 tokens) is reported short.
        let err = Split::new(&ramp(200), 0.1, 4, 32).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    part: "validation",
                    needed: 129,
                    have: 20,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("validation"), "{err}");
        // Training gets 100 tokens.
        let err = Split::new(&tokens, 0.9, 4, 32).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    part: "training",
                    needed: 129,
                    have: 100,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = Split::new(&tokens, 0.1, 0, 32).unwrap_err();
        assert!(matches!(err, DataError::ZeroSize { name: "batch" }), "{err:?}");
        let err = Split::new(&[], 0.1, 1, 1).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    part: "training",
                    have: 0,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn loads_the_default_corpus() {
        let tokens = crate::data::Tokenizer::bytes().encode(crate::data::default_corpus());
        let split = Split::new(&tokens, 0.1, 8, 64).unwrap();
        let mut loader = split.train_loader(0).unwrap();
        let batch = loader.next_batch();
        assert_eq!(batch.inputs.len(), 8 * 64);
        assert!(split.eval_batches(4).count() == 4);
    }
}
