//! Gradient compression for the data-parallel reduction: bf16, PowerSGD and top-k with error feedback, and the
//! per-bucket choice of `auto`.
//!
//! A compressed bucket is reduced through host memory in three moves, each one order-fixed:
//!
//! 1. every replica adds its carried residual (error feedback) to its gradients and **encodes** them (bf16
//!    values; PowerSGD's `P = M·Q`, then `Q = Mᵀ·P`; top-k's `(index, value)` pairs);
//! 2. the payloads travel through the stage's [`Collective::all_gather_host`] (each process passes the replicas it
//!    hosts), so every replica holds every replica's payload, in replica order;
//! 3. every replica **decodes** and sums them in replica order — the same bits everywhere — and keeps as its new
//!    residual what its own payload left out.
//!
//! So a compressed run is bitwise reproducible run to run and every replica ends each step with the same
//! gradients; randomness (PowerSGD's first `Q`) is seeded by the tensor's name. Bytes are counted as what one
//! replica's payload holds (`comm_bytes`; fp32 gradients count 4 bytes per element).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::comm::Collective;
use crate::error::{EngineError, Result};
use crate::executor::Slot;

/// Largest PowerSGD rank.
pub const POWERSGD_RANK_MAX: u32 = 64;
/// PowerSGD's default number of uncompressed warm-up steps (PyTorch's `start_powerSGD_iter` is 10 too).
pub const POWERSGD_WARMUP_DEFAULT: u32 = 10;
/// Seed of PowerSGD's first `Q` (mixed with the tensor's name).
const POWERSGD_SEED: u64 = 0x5057_5253_4744;

/// How the data-parallel reduction encodes gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compression {
    /// fp32, exact.
    #[default]
    None,
    /// Each replica's gradients rounded to bf16, summed in fp32, the sum rounded to bf16 (2 bytes per element).
    Bf16,
    /// PowerSGD (Vogels et al. 2019): rank-`rank` factors `P`, `Q` per matrix, error feedback, `Q` warm-started from
    /// the previous step, `P` orthogonalised; vectors and matrices the factors would not halve travel as fp32; the
    /// first `warmup` steps are uncompressed.
    PowerSgd {
        /// Rank of the factors, `1..=POWERSGD_RANK_MAX`.
        rank: u32,
        /// Uncompressed steps first.
        warmup: u32,
    },
    /// The `fraction` of each bucket's entries largest in magnitude, as `(index, value)` pairs (8 bytes each), with
    /// error feedback.
    TopK {
        /// Share of the bucket's entries sent, in `(0, 1]`.
        fraction: f64,
    },
    /// Per bucket, the least lossy of the settings above whose communication hides under the step's remaining
    /// compute (see [`auto_ladder`]).
    Auto,
}

impl Compression {
    /// True for the settings that carry a residual between steps.
    pub fn has_error_feedback(self) -> bool {
        matches!(self, Compression::PowerSgd { .. } | Compression::TopK { .. })
    }

    /// The setting in force at optimizer step `step` (0-based): PowerSGD is uncompressed during its warm-up.
    pub fn at_step(self, step: u64) -> Compression {
        match self {
            Compression::PowerSgd { warmup, .. } if step < u64::from(warmup) => Compression::None,
            other => other,
        }
    }

    /// Checks the parameters.
    pub fn validate(self) -> Result<()> {
        match self {
            Compression::PowerSgd { rank, .. } if rank == 0 || rank > POWERSGD_RANK_MAX => Err(EngineError::config(
                "compress",
                self,
                format!("the PowerSGD rank must be in 1..={POWERSGD_RANK_MAX}"),
            )),
            Compression::TopK { fraction } if !(fraction > 0.0 && fraction <= 1.0) => Err(EngineError::config(
                "compress",
                self,
                "the top-k fraction must be in (0, 1]",
            )),
            _ => Ok(()),
        }
    }
}

/// `auto`'s candidates, least lossy first.
pub fn auto_ladder() -> [Compression; 6] {
    [
        Compression::None,
        Compression::Bf16,
        Compression::PowerSgd { rank: 4, warmup: 0 },
        Compression::PowerSgd { rank: 2, warmup: 0 },
        Compression::PowerSgd { rank: 1, warmup: 0 },
        Compression::TopK { fraction: 0.01 },
    ]
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Bf16 => f.write_str("bf16"),
            Compression::PowerSgd { rank, warmup } if *warmup == POWERSGD_WARMUP_DEFAULT => {
                write!(f, "powersgd:{rank}")
            }
            Compression::PowerSgd { rank, warmup } => write!(f, "powersgd:{rank}:{warmup}"),
            Compression::TopK { fraction } => write!(f, "topk:{fraction}"),
            Compression::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for Compression {
    type Err = EngineError;

    /// `none`, `bf16`, `powersgd:R` (`powersgd:R:W` for W warm-up steps), `topk:F`, `auto`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            EngineError::config(
                "compress",
                s,
                format!("{why}; expected none, bf16, powersgd:RANK[:WARMUP], topk:FRACTION or auto"),
            )
        };
        let mut it = s.split(':');
        let c = match (it.next(), it.next(), it.next(), it.next()) {
            (Some("none"), None, ..) => Compression::None,
            (Some("bf16"), None, ..) => Compression::Bf16,
            (Some("auto"), None, ..) => Compression::Auto,
            (Some("powersgd"), Some(r), w, None) => Compression::PowerSgd {
                rank: r.parse().map_err(|_| bad("the rank is not a whole number"))?,
                warmup: match w {
                    Some(w) => w
                        .parse()
                        .map_err(|_| bad("the warm-up is not a whole number of steps"))?,
                    None => POWERSGD_WARMUP_DEFAULT,
                },
            },
            (Some("topk"), Some(f), None, _) => Compression::TopK {
                fraction: f.parse().map_err(|_| bad("the fraction is not a number"))?,
            },
            _ => return Err(bad("unknown setting")),
        };
        c.validate()?;
        Ok(c)
    }
}

impl TryFrom<String> for Compression {
    type Error = EngineError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Compression> for String {
    fn from(c: Compression) -> String {
        c.to_string()
    }
}

/// A tensor of a bucket, as compression sees it.
#[derive(Clone, Debug)]
pub(crate) struct TensorInfo {
    /// Global parameter name (seeds PowerSGD's `Q`).
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// `(rows, cols, rank)` when PowerSGD compresses the tensor at `rank`: a matrix whose factors take at most half
    /// its elements.
    fn low_rank(&self, rank: u32) -> Option<(usize, usize, usize)> {
        if self.shape.len() < 2 {
            return None;
        }
        let n = self.shape[0];
        let m = self.shape[1..].iter().product::<usize>();
        let r = (rank as usize).min(n).min(m);
        (r > 0 && 2 * r * (n + m) <= n * m).then_some((n, m, r))
    }
}

/// What compression carries between steps for one stage.
#[derive(Clone, Debug, Default)]
pub(crate) struct CompressState {
    /// `error[replica][slot]`: what the replica's payloads have left out so far (error feedback), fp32.
    pub error: Vec<BTreeMap<Slot, Vec<f32>>>,
    /// PowerSGD's `Q` per matrix (`cols × rank`, row-major), the same on every replica.
    pub q: BTreeMap<Slot, Vec<f32>>,
}

impl CompressState {
    /// State for `replicas` replicas.
    pub fn new(replicas: usize) -> Self {
        CompressState {
            error: vec![BTreeMap::new(); replicas],
            q: BTreeMap::new(),
        }
    }

    /// True when some replica carries a residual for one of `items`.
    pub fn owes(&self, items: &[Slot]) -> bool {
        self.error.iter().any(|e| items.iter().any(|s| e.contains_key(s)))
    }
}

/// Payload bytes per replica of one bucket under `mode` (already resolved: not `Auto`).
pub(crate) fn payload_bytes(mode: Compression, items: &[&TensorInfo]) -> usize {
    let elems: usize = items.iter().map(|t| t.len()).sum();
    match mode {
        Compression::None | Compression::Auto => 4 * elems,
        Compression::Bf16 => 2 * elems,
        Compression::TopK { fraction } => 8 * topk_count(fraction, elems),
        Compression::PowerSgd { rank, .. } => items
            .iter()
            .map(|t| match t.low_rank(rank) {
                Some((n, m, r)) => 4 * r * (n + m),
                None => 4 * t.len(),
            })
            .sum(),
    }
}

fn topk_count(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).ceil() as usize).clamp(1, n.max(1))
}

/// One replica's side of a bucket: its member index in the stage's group, its backend, and its gradient buffers for
/// the bucket's items, in item order. The buffers are replaced by the reduced gradients.
pub(crate) struct Side<'a, B: Backend> {
    /// Member index (= replica).
    pub member: usize,
    /// The replica's backend for this stage.
    pub backend: &'a B,
    /// The bucket's gradients.
    pub bufs: Vec<&'a mut B::Buf>,
}

/// Sums one bucket over the replicas under `mode` (resolved: not `Auto`; `None` here is the host path that also
/// pays back any carried residual), leaving the same reduced gradients in every side's buffers. Returns the
/// payload bytes per replica.
pub(crate) fn reduce_bucket<B: Backend>(
    group: &dyn Collective<B>,
    stage: usize,
    mode: Compression,
    items: &[(Slot, &TensorInfo)],
    sides: &mut [Side<'_, B>],
    state: &mut CompressState,
) -> Result<usize> {
    let fail = |reason: String| EngineError::Comm {
        seam: "compression",
        stage: stage as u32,
        reason,
    };
    // 1. Gradients plus the carried residual, per local replica.
    let mut acc: Vec<Vec<Vec<f32>>> = Vec::with_capacity(sides.len());
    for side in sides.iter() {
        if side.bufs.len() != items.len() {
            return Err(fail(format!(
                "replica {} passed {} gradients for a bucket of {}",
                side.member,
                side.bufs.len(),
                items.len()
            )));
        }
        let errors = state
            .error
            .get_mut(side.member)
            .ok_or_else(|| fail(format!("no compression state for replica {}", side.member)))?;
        let mut mine = Vec::with_capacity(items.len());
        for ((slot, info), buf) in items.iter().zip(side.bufs.iter()) {
            let mut g = side.backend.download(buf)?;
            if g.len() != info.len() {
                return Err(fail(format!(
                    "`{}` has {} gradient elements, its shape {:?} says {}",
                    info.name,
                    g.len(),
                    info.shape,
                    info.len()
                )));
            }
            if let Some(e) = errors.remove(slot) {
                for (x, e) in g.iter_mut().zip(e) {
                    *x += e;
                }
            }
            mine.push(g);
        }
        acc.push(mine);
    }
    let infos: Vec<&TensorInfo> = items.iter().map(|(_, i)| *i).collect();
    let members: Vec<usize> = sides.iter().map(|s| s.member).collect();
    let (sums, bytes) = match mode {
        Compression::None | Compression::Auto => {
            (dense(group, &fail, &members, &acc, None)?, payload_bytes(mode, &infos))
        }
        Compression::Bf16 => (
            dense(group, &fail, &members, &acc, Some(round_bf16))?,
            payload_bytes(mode, &infos),
        ),
        Compression::TopK { fraction } => {
            let (sums, residuals) = top_k(group, &fail, &members, &acc, &infos, fraction)?;
            keep_residuals(state, sides, items, residuals);
            (sums, payload_bytes(mode, &infos))
        }
        Compression::PowerSgd { rank, .. } => {
            let (sums, residuals) = power_sgd(group, &fail, &members, &acc, items, rank, state)?;
            keep_residuals(state, sides, items, residuals);
            (sums, payload_bytes(mode, &infos))
        }
    };
    // 3. The same reduced gradients into every local replica's buffers.
    for side in sides.iter_mut() {
        for (buf, sum) in side.bufs.iter_mut().zip(&sums) {
            **buf = side.backend.upload(sum)?;
        }
    }
    Ok(bytes)
}

/// `residuals[local side][item]`: `Some` where the item carries a residual.
type Residuals = Vec<Vec<Option<Vec<f32>>>>;

fn keep_residuals<B: Backend>(
    state: &mut CompressState,
    sides: &[Side<'_, B>],
    items: &[(Slot, &TensorInfo)],
    residuals: Residuals,
) {
    for (side, res) in sides.iter().zip(residuals) {
        for ((slot, _), r) in items.iter().zip(res) {
            if let Some(r) = r {
                state.error[side.member].insert(*slot, r);
            }
        }
    }
}

fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Every replica's payload, in member order, through the group.
fn exchange<B: Backend>(group: &dyn Collective<B>, payloads: Vec<(usize, Vec<f64>)>) -> Result<Vec<Vec<f64>>> {
    group.all_gather_host(&payloads)
}

/// Dense payloads (each value passed through `round` first, and the sum after), summed in member order.
fn dense<B: Backend>(
    group: &dyn Collective<B>,
    fail: &dyn Fn(String) -> EngineError,
    members: &[usize],
    acc: &[Vec<Vec<f32>>],
    round: Option<fn(f32) -> f32>,
) -> Result<Vec<Vec<f32>>> {
    let r = round.unwrap_or(|x| x);
    let lens: Vec<usize> = acc
        .first()
        .map(|a| a.iter().map(Vec::len).collect())
        .unwrap_or_default();
    let payloads = acc
        .iter()
        .enumerate()
        .map(|(i, a)| (members[i], a.iter().flatten().map(|&x| f64::from(r(x))).collect()))
        .collect();
    let all = exchange(group, payloads)?;
    let mut sums = sum_members(fail, &all, &lens)?;
    if round.is_some() {
        sums.iter_mut().flatten().for_each(|x| *x = r(*x));
    }
    Ok(sums)
}

fn split(flat: &[f32], lens: &[usize]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &n in lens {
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    out
}

/// Top-k over the whole bucket: each replica sends its `k` largest-magnitude entries (ties: the lower index), the
/// sums are scattered in member order, each replica keeps the rest as its residual.
fn top_k<B: Backend>(
    group: &dyn Collective<B>,
    fail: &dyn Fn(String) -> EngineError,
    members: &[usize],
    acc: &[Vec<Vec<f32>>],
    infos: &[&TensorInfo],
    fraction: f64,
) -> Result<(Vec<Vec<f32>>, Residuals)> {
    let lens: Vec<usize> = infos.iter().map(|t| t.len()).collect();
    let n: usize = lens.iter().sum();
    let k = topk_count(fraction, n);
    let mut payloads = Vec::with_capacity(acc.len());
    let mut residuals = Vec::with_capacity(acc.len());
    for (i, a) in acc.iter().enumerate() {
        let mut flat: Vec<f32> = a.iter().flatten().copied().collect();
        let mut order: Vec<usize> = (0..n).collect();
        let key = |&i: &usize| (std::cmp::Reverse(TotalAbs(flat[i])), i);
        if k < n {
            order.select_nth_unstable_by_key(k, key);
        }
        let mut chosen = order[..k].to_vec();
        chosen.sort_unstable();
        let mut payload = Vec::with_capacity(2 * k);
        for &j in &chosen {
            payload.push(j as f64);
            payload.push(f64::from(flat[j]));
            flat[j] = 0.0;
        }
        payloads.push((members[i], payload));
        residuals.push(split(&flat, &lens).into_iter().map(Some).collect());
    }
    let all = exchange(group, payloads)?;
    let mut sum = vec![0.0f32; n];
    for (j, payload) in all.iter().enumerate() {
        if payload.len() != 2 * k {
            return Err(fail(format!(
                "replica {j}'s top-k payload holds {} values, expected {} (k = {k})",
                payload.len(),
                2 * k
            )));
        }
        for pair in payload.chunks_exact(2) {
            let at = pair[0] as usize;
            if pair[0] < 0.0 || at >= n || pair[0].fract() != 0.0 {
                return Err(fail(format!("replica {j} sent index {} for a bucket of {n}", pair[0])));
            }
            sum[at] += pair[1] as f32;
        }
    }
    Ok((split(&sum, &lens), residuals))
}

/// `|x|` ordered totally (NaN largest, so a non-finite gradient is sent and seen).
#[derive(Clone, Copy, PartialEq)]
struct TotalAbs(f32);

impl Eq for TotalAbs {}

impl PartialOrd for TotalAbs {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TotalAbs {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.abs().total_cmp(&other.0.abs())
    }
}

/// PowerSGD over a bucket: round 1 sends `P = M·Q` for every compressible matrix (and the other tensors dense), round
/// 2 sends `Q = Mᵀ·P̂` with `P̂` the orthonormalised sum; the reduced gradient is `P̂·Qᵀ`, each replica's residual
/// `M − P̂·Qᵀ/D`, and `Q` is kept for the next step.
fn power_sgd<B: Backend>(
    group: &dyn Collective<B>,
    fail: &dyn Fn(String) -> EngineError,
    members: &[usize],
    acc: &[Vec<Vec<f32>>],
    items: &[(Slot, &TensorInfo)],
    rank: u32,
    state: &mut CompressState,
) -> Result<(Vec<Vec<f32>>, Residuals)> {
    let shapes: Vec<Option<(usize, usize, usize)>> = items.iter().map(|(_, t)| t.low_rank(rank)).collect();
    let mut qs: Vec<Option<Vec<f32>>> = Vec::with_capacity(items.len());
    for ((slot, info), shape) in items.iter().zip(&shapes) {
        qs.push(match shape {
            Some((_, m, r)) => {
                let q = state.q.entry(*slot).or_insert_with(|| {
                    crate::model::init::normal(POWERSGD_SEED, &format!("powersgd.q.{}", info.name), m * r, 1.0)
                });
                if q.len() != m * r {
                    return Err(fail(format!(
                        "`{}`'s PowerSGD Q holds {} values, expected {m}×{r}",
                        info.name,
                        q.len()
                    )));
                }
                Some(q.clone())
            }
            None => None,
        });
    }
    // Round 1: P per matrix, other tensors as they are.
    let round1: Vec<(usize, Vec<f64>)> = acc
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut payload = Vec::new();
            for ((g, shape), q) in a.iter().zip(&shapes).zip(&qs) {
                match (shape, q) {
                    (Some((n, m, r)), Some(q)) => {
                        payload.extend(matmul(g, q, *n, *m, *r).iter().map(|&x| f64::from(x)))
                    }
                    _ => payload.extend(g.iter().map(|&x| f64::from(x))),
                }
            }
            (members[i], payload)
        })
        .collect();
    let sizes1: Vec<usize> = shapes
        .iter()
        .zip(items)
        .map(|(s, (_, t))| s.map_or(t.len(), |(n, _, r)| n * r))
        .collect();
    let all1 = exchange(group, round1)?;
    let summed1 = sum_members(fail, &all1, &sizes1)?;
    let mut ps: Vec<Option<Vec<f32>>> = Vec::with_capacity(items.len());
    for (shape, s) in shapes.iter().zip(&summed1) {
        ps.push(shape.map(|(n, _, r)| {
            let mut p = s.clone();
            orthonormalise(&mut p, n, r);
            p
        }));
    }
    // Round 2: Q = Mᵀ·P̂ per matrix.
    let round2: Vec<(usize, Vec<f64>)> = acc
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut payload = Vec::new();
            for ((g, shape), p) in a.iter().zip(&shapes).zip(&ps) {
                if let (Some((n, m, r)), Some(p)) = (shape, p) {
                    payload.extend(matmul_tn(g, p, *n, *m, *r).iter().map(|&x| f64::from(x)));
                }
            }
            (members[i], payload)
        })
        .collect();
    let sizes2: Vec<usize> = shapes.iter().flatten().map(|&(_, m, r)| m * r).collect();
    let all2 = exchange(group, round2)?;
    let mut summed2 = sum_members(fail, &all2, &sizes2)?.into_iter();
    let mut sums = Vec::with_capacity(items.len());
    let mut approx: Vec<Option<Vec<f32>>> = Vec::with_capacity(items.len());
    for (((slot, _), shape), (dense_sum, p)) in items.iter().zip(&shapes).zip(summed1.into_iter().zip(ps)) {
        match (shape, p) {
            (Some((n, m, r)), Some(p)) => {
                let q = summed2
                    .next()
                    .ok_or_else(|| fail("PowerSGD's second round came back short".into()))?;
                let a = matmul_nt(&p, &q, *n, *m, *r);
                state.q.insert(*slot, q);
                sums.push(a.clone());
                approx.push(Some(a));
            }
            _ => {
                sums.push(dense_sum);
                approx.push(None);
            }
        }
    }
    // The approximation stands for the sum over replicas: each replica's share is 1/D of it, and what its own
    // gradient exceeds that share by is its residual (PyTorch's hook, which averages, keeps `M − P·Qᵀ` alike).
    let share = 1.0 / group.members() as f32;
    let residuals = acc
        .iter()
        .map(|a| {
            a.iter()
                .zip(&approx)
                .map(|(g, ap)| {
                    ap.as_ref()
                        .map(|ap| g.iter().zip(ap).map(|(x, y)| x - y * share).collect())
                })
                .collect()
        })
        .collect();
    Ok((sums, residuals))
}

/// Member payloads cut into tensors of `sizes` and summed in member order.
fn sum_members(fail: &dyn Fn(String) -> EngineError, all: &[Vec<f64>], sizes: &[usize]) -> Result<Vec<Vec<f32>>> {
    let total: usize = sizes.iter().sum();
    let mut flat = vec![0.0f32; total];
    for (j, payload) in all.iter().enumerate() {
        if payload.len() != total {
            return Err(fail(format!(
                "replica {j}'s payload holds {} values, expected {total}",
                payload.len()
            )));
        }
        for (s, &v) in flat.iter_mut().zip(payload) {
            if j == 0 {
                *s = v as f32;
            } else {
                *s += v as f32;
            }
        }
    }
    Ok(split(&flat, sizes))
}

/// `A (n×m) · B (m×r)`, row-major, accumulated in a fixed order.
fn matmul(a: &[f32], b: &[f32], n: usize, m: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * r];
    for i in 0..n {
        let row = &a[i * m..(i + 1) * m];
        let o = &mut out[i * r..(i + 1) * r];
        for (k, &x) in row.iter().enumerate() {
            for (oj, &bj) in o.iter_mut().zip(&b[k * r..(k + 1) * r]) {
                *oj += x * bj;
            }
        }
    }
    out
}

/// `Aᵀ · P` for `A (n×m)`, `P (n×r)`: `m×r`.
fn matmul_tn(a: &[f32], p: &[f32], n: usize, m: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * r];
    for i in 0..n {
        let pr = &p[i * r..(i + 1) * r];
        for (k, &x) in a[i * m..(i + 1) * m].iter().enumerate() {
            for (oj, &pj) in out[k * r..(k + 1) * r].iter_mut().zip(pr) {
                *oj += x * pj;
            }
        }
    }
    out
}

/// `P (n×r) · Qᵀ` for `Q (m×r)`: `n×m`.
fn matmul_nt(p: &[f32], q: &[f32], n: usize, m: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * m];
    for i in 0..n {
        let pr = &p[i * r..(i + 1) * r];
        for (k, o) in out[i * m..(i + 1) * m].iter_mut().enumerate() {
            *o = pr.iter().zip(&q[k * r..(k + 1) * r]).map(|(a, b)| a * b).sum();
        }
    }
    out
}

/// Modified Gram–Schmidt on the `r` columns of `p (n×r)`, dot products in f64; a column that vanishes stays zero.
fn orthonormalise(p: &mut [f32], n: usize, r: usize) {
    for c in 0..r {
        for prev in 0..c {
            let dot: f64 = (0..n)
                .map(|i| f64::from(p[i * r + c]) * f64::from(p[i * r + prev]))
                .sum();
            for i in 0..n {
                p[i * r + c] -= (dot as f32) * p[i * r + prev];
            }
        }
        let norm = (0..n).map(|i| f64::from(p[i * r + c]).powi(2)).sum::<f64>().sqrt();
        let inv = if norm > 1e-12 { (1.0 / norm) as f32 } else { 0.0 };
        for i in 0..n {
            p[i * r + c] *= inv;
        }
    }
}

/// Per bucket of a stage: what `auto` picks — for each bucket in readiness order, the least lossy rung of
/// [`auto_ladder`] whose reduction (queued behind the earlier buckets) ends by `deadline_s`; the last rung where
/// none does. `ready_s[i]`: when bucket `i`'s gradients are final (seconds since the step began); `seconds(i,
/// mode)`: how long its reduction takes under `mode`.
pub(crate) fn plan_auto(
    ready_s: &[f64],
    deadline_s: f64,
    seconds: impl Fn(usize, Compression) -> f64,
) -> Vec<Compression> {
    let ladder = auto_ladder();
    let mut free_at = 0.0f64;
    let mut plan = Vec::with_capacity(ready_s.len());
    for (i, &ready) in ready_s.iter().enumerate() {
        let start = free_at.max(ready);
        let pick = ladder
            .iter()
            .copied()
            .find(|&m| start + seconds(i, m) <= deadline_s)
            .unwrap_or(ladder[ladder.len() - 1]);
        free_at = start + seconds(i, pick);
        plan.push(pick);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_print_and_refuse_nonsense() {
        for s in ["none", "bf16", "powersgd:2", "powersgd:4:0", "topk:0.01", "auto"] {
            let c: Compression = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(
            "powersgd:1".parse::<Compression>().unwrap(),
            Compression::PowerSgd {
                rank: 1,
                warmup: POWERSGD_WARMUP_DEFAULT
            }
        );
        for bad in [
            "",
            "fp8",
            "powersgd",
            "powersgd:0",
            "powersgd:65",
            "topk:0",
            "topk:1.5",
            "topk:x",
            "bf16:2",
        ] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("compress"), "{bad}: {e}");
        }
        assert_eq!(
            Compression::PowerSgd { rank: 2, warmup: 3 }.at_step(2),
            Compression::None
        );
        assert_eq!(
            Compression::PowerSgd { rank: 2, warmup: 3 }.at_step(3),
            Compression::PowerSgd { rank: 2, warmup: 3 }
        );
    }

    #[test]
    fn factor_products_match_their_definitions() {
        let (n, m, r) = (3, 4, 2);
        let a: Vec<f32> = (0..n * m).map(|i| i as f32 - 5.0).collect();
        let b: Vec<f32> = (0..m * r).map(|i| (i as f32) * 0.5).collect();
        let ab = matmul(&a, &b, n, m, r);
        for i in 0..n {
            for j in 0..r {
                let want: f32 = (0..m).map(|k| a[i * m + k] * b[k * r + j]).sum();
                assert_eq!(ab[i * r + j], want);
            }
        }
        let p: Vec<f32> = (0..n * r).map(|i| i as f32 + 1.0).collect();
        let atp = matmul_tn(&a, &p, n, m, r);
        for k in 0..m {
            for j in 0..r {
                let want: f32 = (0..n).map(|i| a[i * m + k] * p[i * r + j]).sum();
                assert!((atp[k * r + j] - want).abs() < 1e-4);
            }
        }
        let mut q = p.clone();
        orthonormalise(&mut q, n, r);
        for c in 0..r {
            for d in 0..r {
                let dot: f32 = (0..n).map(|i| q[i * r + c] * q[i * r + d]).sum();
                assert!((dot - if c == d { 1.0 } else { 0.0 }).abs() < 1e-5, "{c},{d}: {dot}");
            }
        }
    }

    #[test]
    fn only_matrices_the_factors_halve_are_compressed() {
        let t = |shape: Vec<usize>| TensorInfo {
            name: "w".into(),
            shape,
        };
        assert_eq!(t(vec![64, 64]).low_rank(4), Some((64, 64, 4)));
        assert_eq!(t(vec![64]).low_rank(4), None, "vectors travel dense");
        assert_eq!(t(vec![4, 4]).low_rank(4), None, "factors would not halve it");
        let big = t(vec![64, 64]);
        let bias = t(vec![64]);
        assert_eq!(payload_bytes(Compression::None, &[&big, &bias]), 4 * (4096 + 64));
        assert_eq!(payload_bytes(Compression::Bf16, &[&big, &bias]), 2 * (4096 + 64));
        assert_eq!(
            payload_bytes(Compression::PowerSgd { rank: 2, warmup: 0 }, &[&big, &bias]),
            4 * (2 * 128) + 4 * 64
        );
        assert_eq!(
            payload_bytes(Compression::TopK { fraction: 0.01 }, &[&big, &bias]),
            8 * 42
        );
    }

    use std::sync::Arc;

    use crate::backend::Cpu;
    use crate::comm::{Collectives, LocalCollectives, Workers};

    /// Reduces one bucket of `grads[replica][item]` over a local group of `grads.len()` CPU replicas.
    fn reduce(
        mode: Compression,
        infos: &[TensorInfo],
        grads: &[Vec<Vec<f32>>],
        state: &mut CompressState,
    ) -> (Vec<Vec<Vec<f32>>>, usize) {
        let d = grads.len();
        let workers = Workers::new((0..d).map(|_| Arc::new(vec![Cpu])).collect()).unwrap();
        let group = LocalCollectives::over(workers)
            .group(&(0..d).collect::<Vec<_>>())
            .unwrap();
        let mut bufs: Vec<Vec<<Cpu as Backend>::Buf>> = grads
            .iter()
            .map(|g| g.iter().map(|x| Cpu.upload(x).unwrap()).collect())
            .collect();
        let items: Vec<(Slot, &TensorInfo)> = infos.iter().enumerate().map(|(i, t)| ((0, i, 0), t)).collect();
        let mut sides: Vec<Side<'_, Cpu>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(r, b)| Side {
                member: r,
                backend: &Cpu,
                bufs: b.iter_mut().collect(),
            })
            .collect();
        let bytes = reduce_bucket(group.as_ref(), 0, mode, &items, &mut sides, state).unwrap();
        drop(sides);
        let out = bufs
            .iter()
            .map(|b| b.iter().map(|x| Cpu.download(x).unwrap()).collect())
            .collect();
        (out, bytes)
    }

    fn sample(len: usize, salt: u64) -> Vec<f32> {
        crate::model::init::normal(salt, "compress-test", len, 1.0)
    }

    #[test]
    fn top_k_sends_the_largest_and_keeps_the_rest_as_residual() {
        let infos = [
            TensorInfo {
                name: "a".into(),
                shape: vec![8, 4],
            },
            TensorInfo {
                name: "b".into(),
                shape: vec![8],
            },
        ];
        let grads: Vec<Vec<Vec<f32>>> = (0..3).map(|r| vec![sample(32, r), sample(8, 10 + r)]).collect();
        let mut state = CompressState::new(3);
        let (out, bytes) = reduce(Compression::TopK { fraction: 0.25 }, &infos, &grads, &mut state);
        assert_eq!(bytes, 8 * 10, "k = ceil(0.25 · 40) pairs of 8 bytes");
        // Every replica holds the same sum.
        assert_eq!(out[0], out[1]);
        assert_eq!(out[1], out[2]);
        // Each replica kept exactly n − k entries of its own gradient, and what it sent plus what it kept is its
        // gradient: sum + Σ residuals = Σ gradients.
        for r in 0..3 {
            let kept: usize = state.error[r]
                .values()
                .map(|e| e.iter().filter(|x| **x != 0.0).count())
                .sum();
            assert_eq!(kept, 30, "replica {r}");
        }
        for item in 0..2 {
            for i in 0..grads[0][item].len() {
                let total: f32 = (0..3).map(|r| grads[r][item][i]).sum();
                let back: f32 = out[0][item][i] + (0..3).map(|r| state.error[r][&(0, item, 0)][i]).sum::<f32>();
                assert!(
                    (total - back).abs() <= 1e-5 * (1.0 + total.abs()),
                    "item {item}[{i}]: {total} vs {back}"
                );
            }
        }
        // The next step pays the residual back: with an all-zero gradient, a fraction of 1 sends exactly it.
        let zeros: Vec<Vec<Vec<f32>>> = (0..3).map(|_| vec![vec![0.0; 32], vec![0.0; 8]]).collect();
        let owed: Vec<f32> = (0..32)
            .map(|i| (0..3).map(|r| state.error[r][&(0, 0, 0)][i]).sum())
            .collect();
        let (out2, _) = reduce(Compression::TopK { fraction: 1.0 }, &infos, &zeros, &mut state);
        for (i, o) in owed.iter().enumerate() {
            assert!((out2[0][0][i] - o).abs() <= 1e-6, "{i}");
        }
        assert!(state.error.iter().all(|e| e.values().flatten().all(|x| *x == 0.0)));
    }

    #[test]
    fn power_sgd_reconstructs_a_low_rank_sum_and_warm_starts_q() {
        let (n, m) = (16, 12);
        let infos = [
            TensorInfo {
                name: "w".into(),
                shape: vec![n, m],
            },
            TensorInfo {
                name: "bias".into(),
                shape: vec![n],
            },
        ];
        // Rank-1 gradients sharing their left factor: the sum is rank 1, so rank-1 PowerSGD recovers it.
        let u = sample(n, 1);
        let grads: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|r| {
                let v = sample(m, 2 + r);
                let w: Vec<f32> = (0..n * m).map(|k| u[k / m] * v[k % m]).collect();
                vec![w, sample(n, 7 + r)]
            })
            .collect();
        let mut state = CompressState::new(2);
        let mode = Compression::PowerSgd { rank: 1, warmup: 0 };
        let (out, bytes) = reduce(mode, &infos, &grads, &mut state);
        assert_eq!(bytes, 4 * (n + m) + 4 * n);
        let want: Vec<f32> = (0..n * m).map(|k| grads[0][0][k] + grads[1][0][k]).collect();
        let err = rel(&out[0][0], &want);
        assert!(err < 1e-5, "rank-1 sum recovered: {err:e}");
        // The vector went uncompressed: exact fp32 sum in replica order.
        let bias: Vec<f32> = (0..n).map(|i| grads[0][1][i] + grads[1][1][i]).collect();
        assert_eq!(out[1][1], bias);
        // Residuals are each replica's gradient minus its half of the approximation; Q is kept.
        assert!(state.q.contains_key(&(0, 0, 0)));
        assert!(!state.q.contains_key(&(0, 1, 0)));
        let q1 = state.q[&(0, 0, 0)].clone();
        for (errors, g) in state.error.iter().zip(&grads) {
            let e = &errors[&(0, 0, 0)];
            for k in 0..n * m {
                assert!((e[k] - (g[0][k] - 0.5 * out[0][0][k])).abs() < 1e-5);
            }
        }
        // A second step starts from the kept Q (its values change: they are the new Mᵀ·P).
        let _ = reduce(mode, &infos, &grads, &mut state);
        assert_ne!(state.q[&(0, 0, 0)], q1);
    }

    #[test]
    fn bf16_halves_the_bytes_and_rounds_once_per_hop() {
        let infos = [TensorInfo {
            name: "w".into(),
            shape: vec![64],
        }];
        let grads: Vec<Vec<Vec<f32>>> = (0..2).map(|r| vec![sample(64, 30 + r)]).collect();
        let mut state = CompressState::new(2);
        let (out, bytes) = reduce(Compression::Bf16, &infos, &grads, &mut state);
        assert_eq!(bytes, 2 * 64);
        for i in 0..64 {
            let want = round_bf16(round_bf16(grads[0][0][i]) + round_bf16(grads[1][0][i]));
            assert_eq!(out[0][0][i], want);
            assert_eq!(out[1][0][i], want);
        }
        assert!(state.error.iter().all(BTreeMap::is_empty), "bf16 carries no residual");
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    #[test]
    fn auto_takes_the_least_lossy_rung_that_hides() {
        // Two buckets ready at 1.0 and 2.0 s, the schedule ends at 2.0 s; fp32 takes 1.5 s per bucket, each rung
        // down halves it.
        let ladder = auto_ladder();
        let secs = |_: usize, m: Compression| {
            let rung = ladder.iter().position(|&l| l == m).unwrap_or(0);
            1.5 / f64::from(1u32 << rung)
        };
        let plan = plan_auto(&[1.0, 2.0], 2.0, secs);
        // Bucket 0: fp32 would end at 2.5 > 2.0, bf16 at 1.75: bf16. Bucket 1 starts at 2.0: nothing hides, the
        // last rung.
        assert_eq!(plan, vec![Compression::Bf16, ladder[5]]);
        let slack = plan_auto(&[1.0, 2.0], 4.0, secs);
        assert_eq!(slack, vec![Compression::None, Compression::None]);
    }
}
