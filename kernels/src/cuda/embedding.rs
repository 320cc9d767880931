//! Launchers of `embedding.cu`, and [`Tokens`]: token ids on the device with their host copy, which bounds every
//! id (so no kernel can index out of a table) and drives the deterministic embedding backward.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{dim_u32, grid_1d, launch_kernel, pack_len, Device, Elem, GRID_YZ_MAX};
use super::error::{check_len, CudaError, Result};
use super::registry::EMBEDDING;

/// Threads per block of the embedding kernels (`EMBEDDING_BLOCK`).
const EMBEDDING_BLOCK: u32 = 256;

/// Token ids (or targets) on the device, with the host copy they were uploaded from.
#[derive(Debug)]
pub struct Tokens {
    host: Vec<u32>,
    device: CudaSlice<u32>,
    bound: u64,
}

impl Tokens {
    /// Uploads `ids` to `dev`.
    pub fn upload(dev: &Device, ids: &[u32]) -> Result<Self> {
        Ok(Tokens {
            host: ids.to_vec(),
            device: dev.upload(ids)?,
            bound: ids.iter().map(|&t| u64::from(t) + 1).max().unwrap_or(0),
        })
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The ids on the host.
    pub fn host(&self) -> &[u32] {
        &self.host
    }

    /// The ids on the device.
    pub fn device(&self) -> &CudaSlice<u32> {
        &self.device
    }

    /// Returns a [`CudaError::Shape`] unless every id is below `limit` (a vocabulary size).
    pub fn check_below(&self, op: &'static str, limit: usize) -> Result<()> {
        if self.bound <= limit as u64 {
            Ok(())
        } else {
            Err(CudaError::shape(
                op,
                format!("token id {} is out of the vocabulary ({limit})", self.bound - 1),
            ))
        }
    }
}

/// `out (b, t, c) = wte[tokens] + wpe[position]`; `wte` is (v, c), `wpe` (max_t ≥ t, c).
#[allow(clippy::too_many_arguments)] // typed buffers + the (b, t, c) shape
pub fn embedding_forward<T: Elem>(
    dev: &Device,
    out: &mut CudaSlice<T>,
    tokens: &Tokens,
    wte: &CudaSlice<T>,
    wpe: &CudaSlice<T>,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    let n = b * t;
    check_shapes(OP, out.len(), tokens, wte.len(), wpe.len(), b, t, c)?;
    let (n32, t32, c32) = (dim_u32(OP, "n", n)?, dim_u32(OP, "t", t)?, dim_u32(OP, "c", c)?);
    let unit = if c % pack_len::<T>() == 0 { pack_len::<T>() } else { 1 };
    let Some(cfg) = grid_1d(OP, (n * (c / unit)) as u64, EMBEDDING_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: embedding_forward_{f32,bf16}(T* out, const u32* tokens, const T* wte, const T* wpe, u32 n, u32 t,
    // u32 c). out holds n*c elements, tokens n ids all below v = wte.len()/c, wpe at least t rows (check_shapes);
    // the kernel's unit matches `unit` and it indexes rows < n only.
    launch_kernel!(
        dev,
        EMBEDDING,
        T::pick(["embedding_forward_f32", "embedding_forward_bf16"]),
        cfg,
        [out, tokens.device(), wte, wpe, &n32, &t32, &c32]
    )
}

/// `dwte[tokens] += dout`, `dwpe[position] += dout`, deterministically: the positions are bucketed by token on
/// the host (stable counting sort), then one block row per used token sums its positions in ascending order, and
/// one thread per (position, channel) sums over the batch in order. No atomics.
#[allow(clippy::too_many_arguments)] // typed buffers + the (b, t, c) shape
pub fn embedding_backward<T: Elem>(
    dev: &Device,
    dwte: &mut CudaSlice<T>,
    dwpe: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    tokens: &Tokens,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    check_shapes(OP, dout.len(), tokens, dwte.len(), dwpe.len(), b, t, c)?;
    let n = b * t;
    if n == 0 || c == 0 {
        return Ok(());
    }
    let (b32, t32, c32) = (dim_u32(OP, "b", b)?, dim_u32(OP, "t", t)?, dim_u32(OP, "c", c)?);
    dim_u32(OP, "b*t", n)?; // positions are u32
    let buckets = TokenBuckets::new(tokens.host(), dwte.len() / c);
    let positions = dev.upload(&buckets.positions)?;
    let starts = dev.upload(&buckets.starts)?;
    let ids = dev.upload(&buckets.tokens)?;
    let gy = c.div_ceil(EMBEDDING_BLOCK as usize);
    if gy as u64 > GRID_YZ_MAX {
        return Err(CudaError::shape(
            OP,
            format!("c = {c} needs more than {GRID_YZ_MAX} blocks"),
        ));
    }
    let cfg = LaunchConfig {
        grid_dim: (dim_u32(OP, "buckets", buckets.tokens.len())?, gy as u32, 1),
        block_dim: (EMBEDDING_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: embedding_backward_wte_{f32,bf16}(T* dwte, const T* dout, const u32* bucket_positions,
    // const u32* bucket_starts, const u32* bucket_tokens, u32 c). grid.x = number of buckets = bucket_tokens.len(),
    // bucket_starts has one more entry, every position is < n (dout has n*c elements) and every token < v (dwte
    // has v*c elements): TokenBuckets builds them from ids checked below v; channels stop at c.
    launch_kernel!(
        dev,
        EMBEDDING,
        T::pick(["embedding_backward_wte_f32", "embedding_backward_wte_bf16"]),
        cfg,
        [dwte, dout, &positions, &starts, &ids, &c32]
    )?;
    let Some(cfg) = grid_1d(OP, (t * c) as u64, EMBEDDING_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: embedding_backward_wpe_{f32,bf16}(T* dwpe, const T* dout, u32 b, u32 t, u32 c); dwpe holds at least
    // t*c elements and dout b*t*c (check_shapes); the kernel indexes i < t*c.
    launch_kernel!(
        dev,
        EMBEDDING,
        T::pick(["embedding_backward_wpe_f32", "embedding_backward_wpe_bf16"]),
        cfg,
        [dwpe, dout, &b32, &t32, &c32]
    )
}

#[allow(clippy::too_many_arguments)] // the buffers' lengths and the shape
fn check_shapes(
    op: &'static str,
    rows_len: usize,
    tokens: &Tokens,
    wte_len: usize,
    wpe_len: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    if c == 0 || wte_len % c != 0 || wpe_len % c != 0 || wpe_len < t * c {
        return Err(CudaError::shape(
            op,
            format!("wte ({wte_len}) and wpe ({wpe_len}) must be whole rows of c = {c}, wpe at least t = {t} rows"),
        ));
    }
    check_len(op, "activations", rows_len, b * t * c)?;
    check_len(op, "tokens", tokens.len(), b * t)?;
    tokens.check_below(op, wte_len / c)
}

/// Positions grouped by token: bucket `i` holds token `tokens[i]` at positions
/// `positions[starts[i]..starts[i + 1]]`, ascending; buckets are in ascending token order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBuckets {
    /// All positions, grouped by token.
    pub positions: Vec<u32>,
    /// Bucket boundaries into `positions` (one more than the number of buckets).
    pub starts: Vec<u32>,
    /// The token of each bucket.
    pub tokens: Vec<u32>,
}

impl TokenBuckets {
    /// Buckets of `ids` (every id must be below `vocab`; ids at or above it are dropped).
    pub fn new(ids: &[u32], vocab: usize) -> Self {
        let mut counts = vec![0u32; vocab];
        for &id in ids {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1;
            }
        }
        let mut offset = vec![0u32; vocab];
        let (mut starts, mut tokens, mut total) = (vec![0u32], Vec::new(), 0u32);
        for (tok, &count) in counts.iter().enumerate() {
            if count > 0 {
                offset[tok] = total;
                total += count;
                tokens.push(tok as u32);
                starts.push(total);
            }
        }
        let mut positions = vec![0u32; total as usize];
        for (pos, &id) in ids.iter().enumerate() {
            if let Some(o) = offset.get_mut(id as usize) {
                if counts[id as usize] > 0 {
                    positions[*o as usize] = pos as u32;
                    *o += 1;
                }
            }
        }
        TokenBuckets {
            positions,
            starts,
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBuckets;

    #[test]
    fn buckets_are_stable_and_sorted_by_token() {
        let b = TokenBuckets::new(&[3, 1, 3, 0, 1, 3], 5);
        assert_eq!(b.tokens, [0, 1, 3]);
        assert_eq!(b.starts, [0, 1, 3, 6]);
        assert_eq!(b.positions, [3, 1, 4, 0, 2, 5]);
        let empty = TokenBuckets::new(&[], 4);
        assert_eq!(
            (empty.tokens.len(), empty.starts, empty.positions.len()),
            (0, vec![0], 0)
        );
    }
}
