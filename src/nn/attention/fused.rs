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
//! Only for few rows ([`MAX_ROWS`]): with many rows the matmuls of the blocked path are the
//! better kernel. Beyond [`MAX_KEYS`] keys only when there are at least as many (sequence,
//! group) pairs as pool threads: this pass gives one thread to a pair and does not split its
//! keys, so a single pair at a long context (absorbed MLA at batch 1) stays on the blocked path,
//! whose matmuls use every thread. Where the pairs fill the pool the pass is the faster one at
//! long contexts too: a batch-8 decode step of 6 layers x 4 heads of 32 (one row per sequence)
//! cost best-of-120 7.2 ms on the blocked path against 2.4 ms here at 1024 keys, and 12.8 against
//! 7.9 ms at 4096 keys (2-core EPYC; the blocked path copies each key block out of the cache and
//! builds its scores with tensor ops).

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::flex::{exp_neg, from_flex, into_flex};

/// Query rows per (sequence, group) at most.
pub const MAX_ROWS: usize = 64;
/// Keys (the last position any row sees, plus one) at most, unless the (sequence, group) pairs
/// fill the pool (see the module's notes).
pub const MAX_KEYS: usize = 1024;
/// Keys scored together.
const KEY_BLOCK: usize = 64;

/// The fused pass for `blocked::attention`'s arguments (see there), or `q` back when it does
/// not apply: another backend, not f32, too many rows, more than [`MAX_KEYS`] keys with fewer
/// (sequence, group) pairs than pool threads, a view whose rows are not contiguous in the last
/// dimension.
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
    let few_pairs = b * g < rayon::current_num_threads();
    if rows > MAX_ROWS || (last > MAX_KEYS && few_pairs) || rows == 0 || q_len == 0 {
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
/// values by position; writes `rows x dv` outputs to `out`. Compiled for AVX2 + FMA when the CPU
/// has them (the build's baseline is SSE2), else the same body for the baseline.
fn one_group<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    pos: &[usize],
    dk: usize,
    dv: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY (all four calls): the CPU has AVX2 and FMA (checked just above), and the
            // register kernels get the head widths they are instantiated for.
            unsafe {
                match (dk, dv) {
                    (8, 8) => x86::one_group_regs::<1, 1>(q, key, value, pos, out),
                    (16, 16) => x86::one_group_regs::<2, 2>(q, key, value, pos, out),
                    (32, 32) => x86::one_group_regs::<4, 4>(q, key, value, pos, out),
                    (64, 64) => x86::one_group_regs::<8, 8>(q, key, value, pos, out),
                    _ => one_group_avx2(q, key, value, pos, dk, dv, out),
                }
            }
            return;
        }
    }
    one_group_body::<false>(q, key, value, pos, dk, dv, out);
}

/// [`one_group_body`] compiled with AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn one_group_avx2<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    pos: &[usize],
    dk: usize,
    dv: usize,
    out: &mut [f32],
) {
    one_group_body::<true>(q, key, value, pos, dk, dv, out);
}

/// The pass; `AVX`: called from [`one_group_avx2`] (the dot products and updates use AVX2/FMA
/// intrinsics).
#[inline(always)]
fn one_group_body<'a, const AVX: bool>(
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
    let mut s = vec![0f32; KEY_BLOCK];
    let mut k0 = 0;
    while k0 < n_keys {
        let k1 = (k0 + KEY_BLOCK).min(n_keys);
        for (r, &p) in pos.iter().enumerate() {
            // keys after the row's position are masked: simply not scored
            let end = k1.min(p + 1);
            if end <= k0 {
                continue;
            }
            let nv = end - k0;
            let qr = &q[r * dk..(r + 1) * dk];
            for (j, sj) in s[..nv].iter_mut().enumerate() {
                *sj = dot_any::<AVX>(qr, key(k0 + j));
            }
            let (m_new, corr, sum) = softmax_block(&mut s[..nv], m[r]);
            l[r] = l[r] * corr + sum;
            let o = &mut out[r * dv..(r + 1) * dv];
            if corr != 1.0 {
                o.iter_mut().for_each(|x| *x *= corr);
            }
            for (j, &pj) in s[..nv].iter().enumerate() {
                axpy_any::<AVX>(pj, value(k0 + j), o);
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

/// One block of the online softmax: with `m` the running maximum before the block, turns the
/// scores `s` into `exp(s - m_new)` and returns (`m_new`, the factor `exp(m - m_new)` for what was
/// accumulated before, the block's sum). Inlined into the AVX2 bodies, so compiled for them.
#[inline(always)]
fn softmax_block(s: &mut [f32], m: f32) -> (f32, f32, f32) {
    let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m_new = m.max(block_max);
    let corr = if m == f32::NEG_INFINITY {
        0.0
    } else {
        exp_neg(m - m_new)
    };
    // two loops: the map vectorises, the sum keeps eight partial sums
    for x in s.iter_mut() {
        *x = exp_neg(*x - m_new);
    }
    let mut part = [0f32; 8];
    for (i, x) in s.iter().enumerate() {
        part[i % 8] += *x;
    }
    let sum =
        ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    (m_new, corr, sum)
}

/// [`dot`], or its AVX2/FMA twin inside [`one_group_avx2`].
#[inline(always)]
fn dot_any<const AVX: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is true only in the body compiled for (and run on) AVX2 + FMA
        return unsafe { x86::dot(a, b) };
    }
    dot(a, b)
}

/// [`axpy`], or its AVX2/FMA twin inside [`one_group_avx2`].
#[inline(always)]
fn axpy_any<const AVX: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: as in `dot_any`
        unsafe { x86::axpy(a, x, y) };
        return;
    }
    axpy(a, x, y)
}

/// AVX2 + FMA dot product and update (eight lanes, two accumulators), and the register kernel.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KEY_BLOCK;

    /// [`super::one_group_body`] for head widths `dk = 8·NK`, `dv = 8·NV` (at most 64): one row
    /// at a time, its query and its output accumulators held in registers across all its keys.
    /// Scores are taken eight keys at a time and summed across lanes together (one horizontal
    /// add tree per eight keys instead of one per key); the value update keeps two sets of
    /// accumulators (even and odd keys) in registers instead of loading and storing the output
    /// row once per key. Perf on a batch-8 verify step (d = 128, 4 heads of 32, context ~150):
    /// the per-key version was a third of the step's CPU time.
    // the two accumulator sets and the value row are indexed together by lane group `c`
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn one_group_regs<'a, const NK: usize, const NV: usize>(
        q: &[f32],
        key: impl Fn(usize) -> &'a [f32],
        value: impl Fn(usize) -> &'a [f32],
        pos: &[usize],
        out: &mut [f32],
    ) {
        let (dk, dv) = (8 * NK, 8 * NV);
        let mut s = [0f32; KEY_BLOCK];
        for (r, &p) in pos.iter().enumerate() {
            let qr = &q[r * dk..(r + 1) * dk];
            let qv: [__m256; NK] = std::array::from_fn(|c| _mm256_loadu_ps(qr.as_ptr().add(8 * c)));
            let mut o0 = [_mm256_setzero_ps(); NV];
            let mut o1 = [_mm256_setzero_ps(); NV];
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            let n_keys = p + 1; // keys after the row's position are masked: not scored
            let mut k0 = 0;
            while k0 < n_keys {
                let nv = (k0 + KEY_BLOCK).min(n_keys) - k0;
                let mut j = 0;
                while j + 8 <= nv {
                    let acc: [__m256; 8] = std::array::from_fn(|t| {
                        let kp = key(k0 + j + t).as_ptr();
                        let mut a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kp));
                        for (c, qc) in qv.iter().enumerate().skip(1) {
                            a = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(kp.add(8 * c)), a);
                        }
                        a
                    });
                    _mm256_storeu_ps(s.as_mut_ptr().add(j), hsum8(&acc));
                    j += 8;
                }
                for (t, sj) in s[j..nv].iter_mut().enumerate() {
                    *sj = dot(qr, key(k0 + j + t));
                }
                let (m_new, corr, sum) = super::softmax_block(&mut s[..nv], m);
                l = l * corr + sum;
                if corr != 1.0 {
                    let vc = _mm256_set1_ps(corr);
                    for c in 0..NV {
                        o0[c] = _mm256_mul_ps(o0[c], vc);
                        o1[c] = _mm256_mul_ps(o1[c], vc);
                    }
                }
                let mut j = 0;
                while j + 2 <= nv {
                    let (p0, p1) = (_mm256_set1_ps(s[j]), _mm256_set1_ps(s[j + 1]));
                    let (v0, v1) = (value(k0 + j).as_ptr(), value(k0 + j + 1).as_ptr());
                    for c in 0..NV {
                        o0[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0.add(8 * c)), o0[c]);
                        o1[c] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1.add(8 * c)), o1[c]);
                    }
                    j += 2;
                }
                if j < nv {
                    let (p0, v0) = (_mm256_set1_ps(s[j]), value(k0 + j).as_ptr());
                    for c in 0..NV {
                        o0[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0.add(8 * c)), o0[c]);
                    }
                }
                m = m_new;
                k0 += nv;
            }
            let inv = _mm256_set1_ps(1.0 / l);
            let o = &mut out[r * dv..(r + 1) * dv];
            for c in 0..NV {
                let v = _mm256_mul_ps(_mm256_add_ps(o0[c], o1[c]), inv);
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), v);
            }
        }
    }

    /// The eight lane sums of `a[0..8]`, in order, as one vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // per 128-bit half: the partial sums of a0..a3 (u0) and a4..a7 (u1)
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
        let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// `a · b` over `min(len)` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let mut s = _mm_cvtss_f32(s1);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// `y += a · x` over `min(len)` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }
}

/// `a · b` with sixteen partial sums (vectorised by the compiler), summed as a tree.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    // a tree, not a chain of 16 dependent adds (the chain's latency dominated short rows)
    let mut a8 = [0f32; 8];
    for i in 0..8 {
        a8[i] = acc[i] + acc[i + 8];
    }
    let a4 = [a8[0] + a8[4], a8[1] + a8[5], a8[2] + a8[6], a8[3] + a8[7]];
    let mut s = (a4[0] + a4[2]) + (a4[1] + a4[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a · x`.
#[inline(always)]
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
            // the register kernels' widths (x86 with AVX2): 32 and 64, rows of one and of four
            (2, 1, 4, 32, 32, vec![0, 9, 150]),
            (2, 2, 1, 64, 64, vec![7, 130, 66]),
            (1, 1, 4, 16, 16, vec![1, 3, 40]),
            // past MAX_KEYS (b x g = 6 pairs fill a pool of up to 6 threads, checked below)
            (2, 1, 4, 32, 32, vec![1500, 1100, 1030]),
            (2, 2, 1, 20, 12, vec![1200, 3, 1499]),
        ] {
            let b = starts.len();
            let rows = hpg * q_len;
            let cap = 1504;
            if starts.iter().any(|&s| s >= MAX_KEYS) && b * g < rayon::current_num_threads() {
                continue; // (a pool this large keeps such a call on the blocked path)
            }
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
        // one (sequence, group) pair past MAX_KEYS: the blocked path, whose matmuls use every
        // thread (when the pool has one thread, that pair fills it)
        let long = attention(t4([1, 1, 2, 8], 1), &k, &k, 8, &[MAX_KEYS], 1);
        assert_eq!(long.is_err(), rayon::current_num_threads() > 1);
        let h = k.clone().cast(DType::F16);
        let qh = t4([1, 1, 2, 8], 1).cast(DType::F16);
        assert!(attention(qh, &h, &h, 8, &[10], 1).is_err());
    }
}
