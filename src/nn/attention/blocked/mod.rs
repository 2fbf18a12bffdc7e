//! Key-blocked causal attention with an online softmax (FlashAttention's recurrence, in tensor ops).
//!
//! Neither prefill nor decode ever materialises a `[S, S]` (or `[S_q, S_k]`) score matrix: the
//! workspace is `[b, g, rows, block]`, independent of the sequence length. Softmax statistics are
//! kept in f32.

use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};

/// A large negative used instead of -inf (keeps `exp(m_old - m_new)` finite).
const NEG: f32 = -1.0e30;

/// Query rows processed together, summed over groups: bounds the score workspace
/// (`ROW_TILE x block` scores) for every variant alike, whatever the head layout.
pub const ROW_TILE: usize = 2048;

/// Causal attention of `q` against the first `kv_len` cached positions, key block by key block.
///
/// Rows of `q` are `(head-in-group, query)` pairs flattened: row `r` of sequence `i` is query
/// `r % q_len`, at absolute position `q_starts[i] + r % q_len` (one start per sequence: they
/// differ when each sequence of a batch keeps its own length, as in speculative decoding; keys
/// after a row's position, including stale entries past a sequence's length, are masked). Heads that share a key/value group are folded into
/// rows, so GQA and absorbed MLA (one latent shared by every head) need no broadcast matmul.
///
/// # Shapes
/// - q: `[b, g, rows, dk]`, already multiplied by the softmax scale
/// - k_src: `[b, g, cap, >= dk]` (keys are its first `dk` columns)
/// - v_src: `[b, g, cap, >= dv]` (values are its first `dv` columns; may be the same tensor)
/// - returns `[b, g, rows, dv]`
///
/// `widen` turns on the shape buckets of partial key blocks ([`attention_with`]).
/// Rows are processed in tiles of `ROW_TILE / g`, so the workspace is bounded by the tile and
/// the key block for every head layout (MHA, GQA, absorbed MLA alike).
#[allow(clippy::too_many_arguments)]
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k_src: &Tensor<B, 4>,
    v_src: &Tensor<B, 4>,
    dv: usize,
    q_starts: &[usize],
    q_len: usize,
    kv_len: usize,
    block: usize,
    widen: bool,
) -> Tensor<B, 4> {
    // few rows at a short context on the CPU backend: one fused pass (see `fused`)
    let q = match super::fused::attention(q, k_src, v_src, dv, q_starts, q_len) {
        Ok(o) => return o,
        Err(q) => q,
    };
    attention_with(q, k_src, v_src, dv, q_starts, q_len, kv_len, block, widen)
}

/// [`attention`] in tensor ops only (no fused pass). `widen` switches the shape buckets of
/// partial key blocks (the model's `shape_buckets` flag: on for backends that compile kernels
/// per shape).
#[allow(clippy::too_many_arguments)]
pub fn attention_with<B: Backend>(
    q: Tensor<B, 4>,
    k_src: &Tensor<B, 4>,
    v_src: &Tensor<B, 4>,
    dv: usize,
    q_starts: &[usize],
    q_len: usize,
    kv_len: usize,
    block: usize,
    widen: bool,
) -> Tensor<B, 4> {
    let [b, g, rows, dk] = q.dims();
    assert_eq!(q_starts.len(), b, "one start position per sequence");
    assert!(
        q_starts.iter().all(|&st| kv_len >= st + q_len),
        "keys must cover every query position"
    );
    // Few query rows (decode, verify steps): widen the key block up to 4x, fewer and larger
    // matmuls; the workspace (scores and the copied K/V block) still does not grow with kv_len.
    let block = block.max(1);
    let block = block.max((block * block / rows.max(1)).min(4 * block));
    let tile = (ROW_TILE / g).max(1);
    if rows <= tile {
        return attention_rows(q, k_src, v_src, dv, q_starts, q_len, 0, block, widen);
    }
    let mut outs = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + tile).min(rows);
        let qt = q.clone().slice([0..b, 0..g, r0..r1, 0..dk]);
        outs.push(attention_rows(
            qt, k_src, v_src, dv, q_starts, q_len, r0, block, widen,
        ));
        r0 = r1;
    }
    Tensor::cat(outs, 2)
}

/// The key-block loop for one tile of rows; `row0` is the tile's first row index.
#[allow(clippy::too_many_arguments)]
fn attention_rows<B: Backend>(
    q: Tensor<B, 4>,
    k_src: &Tensor<B, 4>,
    v_src: &Tensor<B, 4>,
    dv: usize,
    q_starts: &[usize],
    q_len: usize,
    row0: usize,
    block: usize,
    widen: bool,
) -> Tensor<B, 4> {
    let [b, g, rows, dk] = q.dims();
    let device = q.device();
    let cap = k_src.dims()[2].min(v_src.dims()[2]);
    // Softmax statistics and the running numerator are f32 whatever the model's dtype (as
    // DeepSeek's reference: `softmax(dim=-1, dtype=float32)`); scores are cast up, the
    // probabilities cast back down to the values' dtype for the matmul.
    let f32_opts = (&device, DType::F32);
    let mut m = Tensor::<B, 4>::full([b, g, rows, 1], NEG, f32_opts); // running max
    let mut l = Tensor::<B, 4>::zeros([b, g, rows, 1], f32_opts); // running denominator
    let mut acc = Tensor::<B, 4>::zeros([b, g, rows, dv], f32_opts); // running numerator
    let out_dtype = q.dtype();
    // the last key any row of this tile may see
    let offsets = || (row0..row0 + rows).map(|r| r % q_len);
    // (an empty batch or tile has no rows to mask: 0 is as good as any bound)
    let last_q = q_starts.iter().max().unwrap_or(&0) + offsets().max().unwrap_or(0);
    let first_q = q_starts.iter().min().unwrap_or(&0) + offsets().min().unwrap_or(0);
    // every row's absolute position, uploaded once: the masks of all key blocks are built on
    // the device from it (not one host mask per block and sequence)
    let mut positions = None;
    let mut ks = 0;
    while ks <= last_q {
        let ke = (ks + block).min(last_q + 1);
        // Shape buckets (`widen`): a partial block [ks, ke) is read as a bucket-sized window
        // [k0, k1) (see `bucket`): backwards over keys the previous block already counted, or,
        // for the first block, forwards into the pre-sized cache past the last position; the
        // extra keys are masked. Backends that compile kernels per shape would otherwise see a
        // new shape at almost every decode step. At most a third of one block is extra work.
        let kw = bucket(ke - ks).min(block);
        let (k0, k1) = if !widen || kw <= ke - ks {
            (ks, ke)
        } else if ke >= kw {
            (ke - kw, ke)
        } else if ks + kw <= cap {
            (ks, ks + kw)
        } else {
            (ks, ke)
        };
        let kb = k1 - k0;
        let k = k_src.clone().slice([0..b, 0..g, k0..k1, 0..dk]);
        let mut s = to_dtype(q.clone().matmul(k.swap_dims(2, 3)), DType::F32); // [b, g, rows, kb]
        if k1 - 1 > first_q || k0 < ks {
            // keys after some row's position, or before this block's own start: masked
            let pos = positions
                .get_or_insert_with(|| row_positions::<B>(q_starts, rows, row0, q_len, &device));
            let mask = device_mask(pos, k0, ks, kb);
            s = s.mask_fill(mask.expand([b, g, rows, kb]), NEG);
        }
        let m_new = m.clone().max_pair(s.clone().max_dim(3));
        let p = (s - m_new.clone().expand([b, g, rows, kb])).exp();
        let corr = (m - m_new.clone()).exp();
        l = l * corr.clone() + p.clone().sum_dim(3);
        let v = v_src.clone().slice([0..b, 0..g, k0..k1, 0..dv]);
        let pv = to_dtype(to_dtype(p, v.dtype()).matmul(v), DType::F32);
        acc = acc * corr.expand([b, g, rows, dv]) + pv;
        m = m_new;
        ks = ke;
    }
    to_dtype(acc / l.expand([b, g, rows, dv]), out_dtype)
}

/// `t` in `dtype` (no operation when it already is).
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// The bucket size for `n` keys or rows: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, …
/// (powers of two and 1.5 times them) that is >= `n`. Few distinct shapes, at most a third
/// wasted.
pub fn bucket(n: usize) -> usize {
    let mut p = 1usize;
    loop {
        if n <= p {
            return p;
        }
        if p >= 2 && n <= p + p / 2 {
            return p + p / 2;
        }
        p *= 2;
    }
}

/// Absolute position of every query row, `[1, 1, rows, 1]` when the starts agree, else
/// `[b, 1, rows, 1]` (row `r` of sequence `i`: `q_starts[i] + (row0 + r) % q_len`).
fn row_positions<B: Backend>(
    q_starts: &[usize],
    rows: usize,
    row0: usize,
    q_len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Int> {
    let starts = match crate::nn::rope::uniform(q_starts) {
        Some(st) => vec![st],
        None => q_starts.to_vec(),
    };
    let n = starts.len();
    let pos: Vec<i64> = starts
        .iter()
        .flat_map(|&st| (row0..row0 + rows).map(move |r| (st + r % q_len) as i64))
        .collect();
    Tensor::from_data(TensorData::new(pos, [n, 1, rows, 1]), device)
}

/// The mask of keys `k0..k0+kb` built on the device from the row positions: `true` where a key
/// lies after the row's position, or before `valid_from` (keys a widened block repeats).
/// Equals the host-built `batch_mask` (a test checks it).
fn device_mask<B: Backend>(
    positions: &Tensor<B, 4, Int>,
    k0: usize,
    valid_from: usize,
    kb: usize,
) -> Tensor<B, 4, Bool> {
    let [n, _, rows, _] = positions.dims();
    let shape = [n, 1, rows, kb];
    let keys = Tensor::<B, 1, Int>::arange(k0 as i64..(k0 + kb) as i64, &positions.device())
        .reshape([1, 1, 1, kb])
        .expand(shape);
    let after = keys.clone().greater(positions.clone().expand(shape));
    if k0 < valid_from {
        after.bool_or(keys.lower_elem(valid_from as i64))
    } else {
        after
    }
}

/// [`causal_mask`] for every sequence: `[1, 1, rows, kb]` when the starts agree, else
/// `[b, 1, rows, kb]` (host-built; the reference for [`device_mask`]).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn batch_mask<B: Backend>(
    q_starts: &[usize],
    rows: usize,
    row0: usize,
    q_len: usize,
    k0: usize,
    valid_from: usize,
    kb: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let one = |st| causal_mask::<B>(rows, row0, q_len, st, k0, valid_from, kb, device);
    if let Some(st) = crate::nn::rope::uniform(q_starts) {
        return one(st).unsqueeze::<4>();
    }
    let masks = q_starts
        .iter()
        .map(|&st| one(st).unsqueeze::<3>())
        .collect();
    Tensor::cat(masks, 0).unsqueeze_dim::<4>(1)
}

/// `true` where key `k0 + t` lies after the position of row `row0 + r` (query
/// `(row0 + r) % q_len`), or before `valid_from` (keys a widened block repeats).
#[allow(clippy::too_many_arguments)]
fn causal_mask<B: Backend>(
    rows: usize,
    row0: usize,
    q_len: usize,
    q_start: usize,
    k0: usize,
    valid_from: usize,
    kb: usize,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let mut m = Vec::with_capacity(rows * kb);
    for r in row0..row0 + rows {
        let pos = q_start + r % q_len;
        m.extend((0..kb).map(|t| k0 + t > pos || k0 + t < valid_from));
    }
    Tensor::from_data(TensorData::new(m, [rows, kb]), device)
}

/// Reference: plain causal softmax attention with the full score matrix (tests only).
pub fn reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_start: usize,
    q_len: usize,
) -> Tensor<B, 4> {
    let [b, g, rows, _] = q.dims();
    let kv_len = k.dims()[2];
    let s = q.matmul(k.swap_dims(2, 3));
    let mask = causal_mask::<B>(rows, 0, q_len, q_start, 0, 0, kv_len, &s.device());
    let s = s.mask_fill(mask.unsqueeze::<4>().expand([b, g, rows, kv_len]), NEG);
    burn::tensor::activation::softmax(s, 3).matmul(v)
}

#[cfg(test)]
mod tests;
