//! 短上下文的少行注意力（解码步、推测解码的验证步）在 CPU 后端上的一遍式实现。
//!
//! At a short context a decode or verify step's attention is a few hundred floating-point
//! operations per (sequence, head) and the cost of `blocked::attention` there is the tensor ops
//! themselves: per key block a slice, a matmul, a host-built mask (one per sequence when the
//! sequences sit at different positions), a `mask_fill`, five element-wise ops and a second
//! matmul. Measured with perf on `dsopt bench mtp` (flex): 29 % of the CPU time.
//!
//! So on burn-flex (f32) each (sequence, K/V group) is done here in one pass over its cached keys
//! and values, with the same online softmax as `blocked` (f32 statistics): scores of all rows
//! against a block of keys, the running max, the rescaled running sum and numerator. Masking is
//! by position (row `r` of sequence `i` sees keys `0..=q_starts[i] + r % q_len`), so there is no
//! mask tensor at all. The (sequence, group) pairs run in parallel on the rayon pool.
//!
//! Only for few rows and short contexts ([`MAX_ROWS`], [`MAX_KEYS`]): with many rows the
//! matmuls of the blocked path are the better kernel, and at long contexts the blocked path
//! already streams the cache near the memory bandwidth (the MLA report's roofline figures) while
//! this pass would give one thread to a (sequence, group) with nothing to split its keys.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::flex::{from_flex, into_flex};

/// Query rows per (sequence, group) at most.
pub const MAX_ROWS: usize = 64;
/// Keys (the last position any row sees, plus one) at most.
pub const MAX_KEYS: usize = 1024;
/// Keys scored together.
const KEY_BLOCK: usize = 64;

/// The fused pass for `blocked::attention`'s arguments (see there), or `q` back when it does
/// not apply: another backend, not f32, too many rows or keys, a view whose rows are not
/// contiguous in the last dimension.
#[allow(clippy::too_many_arguments)]
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k_src: &Tensor<B, 4>,
    v_src: &Tensor<B, 4>,
    dv: usize,
    q_starts: &[usize],
    q_len: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, g, rows, dk] = q.dims();
    let last = q_starts.iter().max().copied().unwrap_or(0) + q_len.min(rows).max(1);
    if rows > MAX_ROWS || last > MAX_KEYS || rows == 0 || q_len == 0 {
        return Err(q);
    }
    let qf = into_flex(q)?;
    let (kf, vf) = match (into_flex(k_src.clone()), into_flex(v_src.clone())) {
        (Ok(k), Ok(v)) => (k, v),
        _ => return Err(from_flex(qf)),
    };
    let f32_all = [&qf, &kf, &vf].iter().all(|t| t.dtype() == DType::F32);
    let inner = |t: &FlexTensor| {
        let s = t.layout().strides();
        s[3] == 1 && s.iter().all(|&x| x >= 0)
    };
    if !f32_all || !inner(&kf) || !inner(&vf) {
        return Err(from_flex(qf));
    }
    let qf = qf.to_contiguous();
    let qs: &[f32] = &qf.storage()[qf.layout().start_offset()..];
    let (ks, kst, ko) = parts(&kf);
    let (vs, vst, vo) = parts(&vf);
    let mut out = vec![0f32; b * g * rows * dv];
    out.par_chunks_mut(rows * dv)
        .enumerate()
        .for_each(|(bg, o)| {
            let (bi, gi) = (bg / g, bg % g);
            let kbase = ko + bi * kst[0] + gi * kst[1];
            let vbase = vo + bi * vst[0] + gi * vst[1];
            let pos: Vec<usize> = (0..rows).map(|r| q_starts[bi] + r % q_len).collect();
            let qrows = &qs[bg * rows * dk..(bg + 1) * rows * dk];
            one_group(
                qrows,
                |j| &ks[kbase + j * kst[2]..kbase + j * kst[2] + dk],
                |j| &vs[vbase + j * vst[2]..vbase + j * vst[2] + dv],
                &pos,
                dk,
                dv,
                o,
            );
        });
    let layout = Layout::contiguous(Shape::from([b, g, rows, dv]));
    Ok(from_flex(FlexTensor::new(
        Bytes::from_elems(out),
        layout,
        DType::F32,
    )))
}

/// Storage, strides and offset of a flex tensor whose strides are known non-negative.
fn parts(t: &FlexTensor) -> (&[f32], Vec<usize>, usize) {
    let st = t.layout().strides().iter().map(|&s| s as usize).collect();
    (t.storage(), st, t.layout().start_offset())
}

/// One (sequence, group): `rows` queries (`dk` each, row-major) at positions `pos`, keys and
/// values by position; writes `rows x dv` outputs to `out`.
fn one_group<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    pos: &[usize],
    dk: usize,
    dv: usize,
    out: &mut [f32],
) {
    let rows = pos.len();
    let n_keys = pos.iter().max().map_or(0, |p| p + 1);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    out.iter_mut().for_each(|x| *x = 0.0);
    let mut s = vec![0f32; rows * KEY_BLOCK];
    let mut k0 = 0;
    while k0 < n_keys {
        let k1 = (k0 + KEY_BLOCK).min(n_keys);
        let kb = k1 - k0;
        for j in k0..k1 {
            let kj = key(j);
            for (r, &p) in pos.iter().enumerate() {
                s[r * KEY_BLOCK + j - k0] = if j <= p {
                    dot(&q[r * dk..(r + 1) * dk], kj)
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        for r in 0..rows {
            let sr = &mut s[r * KEY_BLOCK..r * KEY_BLOCK + kb];
            let block_max = sr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if block_max == f32::NEG_INFINITY {
                continue; // every key of this block lies after the row's position
            }
            let m_new = m[r].max(block_max);
            let corr = (m[r] - m_new).exp(); // 0 on the first block (m = -inf)
            let mut sum = 0f32;
            for x in sr.iter_mut() {
                *x = (*x - m_new).exp(); // masked: exp(-inf) = 0
                sum += *x;
            }
            l[r] = l[r] * corr + sum;
            let o = &mut out[r * dv..(r + 1) * dv];
            if corr != 1.0 {
                o.iter_mut().for_each(|x| *x *= corr);
            }
            for (t, &p) in sr.iter().enumerate() {
                if p != 0.0 {
                    axpy(p, value(k0 + t), o);
                }
            }
            m[r] = m_new;
        }
        k0 = k1;
    }
    for r in 0..rows {
        let inv = 1.0 / l[r];
        out[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= inv);
    }
}

/// `a · b` with sixteen partial sums (vectorised by the compiler).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a · x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::blocked;

    use crate::nn::test_util::t4;

    #[test]
    fn equals_the_blocked_path_with_per_sequence_positions() {
        // MHA-like (g = 2, rows = q_len), grouped rows (rows = 3 heads x q_len), a K/V tensor
        // wider than dk (MLA's latent: keys and values are column ranges of one tensor)
        for (g, hpg, q_len, dk, dv, starts) in [
            (2, 1, 1, 8, 8, vec![5, 5, 5]),
            (2, 1, 4, 8, 8, vec![0, 17, 70]),
            (1, 3, 4, 20, 12, vec![3, 90, 41]),
            (1, 4, 1, 40, 33, vec![130, 2, 64]),
        ] {
            let b = starts.len();
            let rows = hpg * q_len;
            let cap = 160;
            let q = t4([b, g, rows, dk], 1);
            let kv = t4([b, g, cap, dk.max(dv) + 3], 2);
            let k = kv.clone().slice([0..b, 0..g, 0..cap, 0..dk + 3]);
            let last = starts.iter().max().unwrap() + q_len;
            let fused = attention(q.clone(), &k, &kv, dv, &starts, q_len)
                .unwrap_or_else(|_| panic!("fused path applies"));
            // the tensor-op loop, no fused pass
            let want = blocked::attention_with(q, &k, &kv, dv, &starts, q_len, last, 16, false);
            assert_eq!(fused.dims(), want.dims());
            let d: f32 = (fused - want).abs().max().into_scalar();
            assert!(d < 1e-5, "g {g}, rows {rows}, starts {starts:?}: {d}");
        }
    }

    #[test]
    fn many_rows_long_contexts_and_half_precision_keep_the_blocked_path() {
        let k = t4([1, 1, 2048, 8], 2);
        assert!(attention(t4([1, 1, MAX_ROWS + 1, 8], 1), &k, &k, 8, &[0], 1).is_err());
        assert!(attention(t4([1, 1, 2, 8], 1), &k, &k, 8, &[MAX_KEYS], 1).is_err());
        let h = k.clone().cast(DType::F16);
        let qh = t4([1, 1, 2, 8], 1).cast(DType::F16);
        assert!(attention(qh, &h, &h, 8, &[10], 1).is_err());
    }
}
