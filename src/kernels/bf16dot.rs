//! bf16 点积（AVX512_BF16 的 `vdpbf16ps`）：注意力（解码、验证与预填充）在 bf16 缓存上的打分与加权求和。
//! 一条指令做 32 次 bf16 乘法、按对加到 16 个 f32 累加器上，是先加宽再用 f32 FMA 的两倍。
//!
//! The attention ([`super::attend`]: decode and verify steps, prefill chunks) on bf16 queries,
//! keys and values at the level
//! [`super::Level::Avx512Bf16`]: `vdpbf16ps` multiplies 32 bf16 pairs exactly and adds them, two
//! at a time, into 16 f32 accumulators — twice the multiply-adds of widening to f32 and using
//! f32 FMAs, with no widening. At absorbed MLA's decode shape (16 query rows per key) the
//! attention is bound by arithmetic, not by the cache's bytes: halving the bytes left bf16 at
//! 2.2-2.4 ms per call against 1.9-2.8 for f32; with the dot products it took 0.85-1.1 ms (2-core
//! AMD EPYC, `kernel_timings`, docs/benchmarks.md 2026-12-07 (三)).
//!
//! What it rounds: the queries and keys are bf16 already (the scores are the products summed in
//! f32 as in the widening path, except that the instructions flush subnormal inputs and results
//! to zero); the softmax weights `exp(s - m)` (unnormalised, per block) are rounded to bf16
//! (nearest, ties to even) before they multiply the values, while the softmax sums add the
//! unrounded weights: each output differs from the f32-weight result by at most 2^-8 (bf16's unit
//! roundoff) of the largest value it averages — a rounding of the same size as PyTorch's bf16
//! attention, which rounds the normalised probabilities to bf16 before they multiply the values
//! (`softmax(..., dtype=float32).type_as(v)` in DeepSeek's reference).
//!
//! Layouts: few rows (decode, verify): the query rows of a group of
//! [`super::attend::score_groups`] side by side per 32-element chunk ([`group_queries`]), dot
//! products per key summed across lanes; many rows (prefill, [`super::attend::PACKED_ROWS`]):
//! each key block packed once as column pairs, transposed ([`pack_keys`]), each query pair one
//! 32-bit broadcast ([`pairs`]), every row's scores in vector lanes ([`scores_packed`]). Values
//! (both): the values of two keys interleaved in registers
//! (`vpunpck{l,h}wd`), so each 32-bit lane holds one column of both keys and the pair of weights
//! is one 32-bit broadcast; the accumulators come out in the unpacking's order and are put back
//! in column order (`vpermt2ps`) once per block.
//!
//! x86-64 only; every function here needs AVX-512 F/BW and AVX512_BF16 ([`available`]).

// the register kernels index several rows' arrays with one loop variable
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

/// Elements per vector of bf16.
pub const CHUNK: usize = 32;

/// Whether this CPU runs the functions of this module (AVX-512 F/BW and AVX512_BF16).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// 32 bf16 values from `w[at..at + 32]`.
#[inline(always)]
fn load(w: &[u16], at: usize) -> __m512bh {
    let src = &w[at..at + CHUNK];
    // SAFETY: `src` holds 32 u16 = 64 bytes (bounds-checked slice); `read_unaligned` has no
    // alignment requirement and every bit pattern is a `__m512bh`.
    unsafe { std::ptr::read_unaligned(src.as_ptr() as *const __m512bh) }
}

/// `q` (`rows` rows of `dk` bf16 bits, `dk` a multiple of [`CHUNK`]) regrouped for [`scores`]:
/// per group of [`super::attend::score_groups`] (`r` rows from `r0`, in the same
/// `r0·dk..(r0 + r)·dk` span), the rows' first chunks side by side, then their second chunks, and
/// so on.
pub fn group_queries(q: &[u16], rows: usize, dk: usize) -> Vec<u16> {
    assert_eq!(dk % CHUNK, 0, "bf16 dot: dk must be a multiple of {CHUNK}");
    super::attend::group_chunks(q, rows, dk, CHUNK)
}

/// Stored bf16 rows: row `j` starts at `data[base + j·stride]`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    /// The storage (bf16 bits).
    pub data: &'a [u16],
    /// Where row 0 starts.
    pub base: usize,
    /// Elements from one row to the next.
    pub stride: usize,
}

/// `s[r·kb + j] = q_r · key_j` for the `rows` query rows (`qg` in the layout of
/// [`group_queries`]) and keys `0..nb`: groups of four rows take the keys four at a time (a
/// register tile of 16 accumulators, summed across lanes together), the keys left over and the
/// smaller groups one key at a time.
///
/// # Safety
/// The CPU must have AVX-512 F/BW and AVX512_BF16 ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn scores(
    qg: &[u16],
    rows: usize,
    dk: usize,
    keys: Rows<'_>,
    nb: usize,
    s: &mut [f32],
    kb: usize,
) {
    assert!(dk.is_multiple_of(CHUNK) && qg.len() >= rows * dk && nb <= kb && s.len() >= rows * kb);
    let key = |j: usize| &keys.data[keys.base + j * keys.stride..][..dk];
    // the groups of four rows take each tile of four keys in turn: the tile's keys (4.6 KB at
    // dk 576) stay in L1 for all of them, with every row's queries (18 KB at 16 rows)
    let full = rows / 4;
    let mut j = 0;
    while j + 4 <= nb {
        let tile = [key(j), key(j + 1), key(j + 2), key(j + 3)];
        for g in 0..full {
            let d = tile4(&qg[4 * g * dk..4 * (g + 1) * dk], tile, dk);
            for i in 0..4 {
                s[(4 * g + i) * kb + j..][..4].copy_from_slice(&d[4 * i..4 * i + 4]);
            }
        }
        j += 4;
    }
    for (r0, r) in super::attend::score_groups(rows) {
        let q = &qg[r0 * dk..(r0 + r) * dk];
        // the four-row groups' keys left over; the last smaller group's every key
        let from = if r == 4 { j } else { 0 };
        for j in from..nb {
            let k = key(j);
            let mut put = |d: &[f32]| {
                for (i, v) in d.iter().enumerate() {
                    s[(r0 + i) * kb + j] = *v;
                }
            };
            match r {
                4 => put(&one_key::<4>(q, k, dk)),
                3 => put(&one_key::<3>(q, k, dk)),
                2 => put(&one_key::<2>(q, k, dk)),
                _ => put(&one_key::<1>(q, k, dk)),
            }
        }
    }
}

/// Rows of `dk` bf16 values (`dk` even) as pairs: `out[r·dk/2 + c]` holds columns `2c` (low half)
/// and `2c + 1` of row `r` (the 32-bit words of the row as stored, little-endian).
pub fn pairs(q: &[u16], rows: usize, dk: usize) -> Vec<u32> {
    assert!(dk.is_multiple_of(2) && q.len() >= rows * dk);
    q[..rows * dk]
        .chunks_exact(2)
        .map(|w| w[0] as u32 | (w[1] as u32) << 16)
        .collect()
}

/// The block's keys `0..nb` packed for [`scores_packed`]: `kt[c·kb + j]` holds columns `2c` and
/// `2c + 1` of key `j` as one 32-bit pair (`c < dk/2`), keys `nb..kb` zero.
pub fn pack_keys(keys: Rows<'_>, dk: usize, nb: usize, kb: usize, kt: &mut [u32]) {
    assert!(dk.is_multiple_of(2) && nb <= kb && kt.len() >= dk / 2 * kb);
    for j in 0..kb {
        if j < nb {
            let row = &keys.data[keys.base + j * keys.stride..][..dk];
            for (c, w) in row.chunks_exact(2).enumerate() {
                kt[c * kb + j] = w[0] as u32 | (w[1] as u32) << 16;
            }
        } else {
            for c in 0..dk / 2 {
                kt[c * kb + j] = 0;
            }
        }
    }
}

/// `s[r·kb + j] = q_r · key_j` for many rows from the packed keys (`qp` from [`pairs`], `kt`
/// from [`pack_keys`], `kb` a multiple of 64): a small matrix product with six rows by 64 keys
/// in registers (24 accumulators, one 32-bit broadcast of a query pair per row and column pair),
/// the keys in vector lanes, so no lane sums. Every group of rows takes the keys up to the last
/// one it sees (`vis`), in runs of 64 (packed keys past `nb` are zero); scores past the run are
/// left as they are.
///
/// # Safety
/// The CPU must have AVX-512 F/BW and AVX512_BF16 ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn scores_packed(qp: &[u32], vis: &[usize], dk: usize, kt: &[u32], kb: usize, s: &mut [f32]) {
    let rows = vis.len();
    let half = dk / 2;
    assert!(kb.is_multiple_of(64) && qp.len() >= rows * half && kt.len() >= half * kb);
    assert!(s.len() >= rows * kb && vis.iter().all(|&v| v <= kb));
    let mut r0 = 0;
    while r0 < rows {
        let r = (rows - r0).min(PACKED_TILE_ROWS);
        let nb = vis[r0..r0 + r].iter().copied().max().unwrap_or(0);
        let mut j0 = 0;
        while j0 < nb {
            let q = &qp[r0 * half..(r0 + r) * half];
            let out = &mut s[r0 * kb..(r0 + r) * kb];
            match r {
                6 => packed_run::<6>(q, half, kt, kb, j0, out),
                5 => packed_run::<5>(q, half, kt, kb, j0, out),
                4 => packed_run::<4>(q, half, kt, kb, j0, out),
                3 => packed_run::<3>(q, half, kt, kb, j0, out),
                2 => packed_run::<2>(q, half, kt, kb, j0, out),
                _ => packed_run::<1>(q, half, kt, kb, j0, out),
            }
            j0 += 64;
        }
        r0 += r;
    }
}

/// Rows scored together by [`scores_packed`].
const PACKED_TILE_ROWS: usize = 6;

/// Scores of `R` rows (`q`: `R` rows of `half` pairs) against keys `j0..j0 + 64` of the packed
/// block, into `out` (`R` rows of `kb`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn packed_run<const R: usize>(
    q: &[u32],
    half: usize,
    kt: &[u32],
    kb: usize,
    j0: usize,
    out: &mut [f32],
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for c in 0..half {
        let kr = &kt[c * kb + j0..][..64];
        let mut kv = [cast_bh(_mm512_setzero_si512()); 4];
        for t in 0..4 {
            // SAFETY: `kr` holds 64 u32 (four `__m512bh` of 16 words at offsets 0, 16, 32, 48),
            // a bounds-checked slice; an unaligned read of plain bits.
            kv[t] = unsafe { std::ptr::read_unaligned(kr[16 * t..].as_ptr() as *const __m512bh) };
        }
        for i in 0..R {
            let qb = cast_bh(_mm512_set1_epi32(q[i * half + c] as i32));
            for t in 0..4 {
                acc[i][t] = _mm512_dpbf16_ps(acc[i][t], qb, kv[t]);
            }
        }
    }
    for i in 0..R {
        let dst = &mut out[i * kb + j0..][..64];
        for t in 0..4 {
            // SAFETY: `dst` holds 64 f32 (four `__m512` at offsets 0, 16, 32, 48), a
            // bounds-checked slice; an unaligned write of plain bits.
            unsafe {
                std::ptr::write_unaligned(dst[16 * t..].as_mut_ptr() as *mut __m512, acc[i][t])
            };
        }
    }
}

/// Four rows (`q`: `4·dk` values grouped) by four keys: the 16 dot products, row-major.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn tile4(q: &[u16], k: [&[u16]; 4], dk: usize) -> [f32; 16] {
    let zero = _mm512_setzero_ps();
    let mut acc = [zero; 16];
    for c in 0..dk / CHUNK {
        let mut kv = [cast_bh(_mm512_setzero_si512()); 4];
        for t in 0..4 {
            kv[t] = load(k[t], c * CHUNK);
        }
        for i in 0..4 {
            let qv = load(q, (c * 4 + i) * CHUNK);
            for t in 0..4 {
                acc[4 * i + t] = _mm512_dpbf16_ps(acc[4 * i + t], qv, kv[t]);
            }
        }
    }
    let mut out = [0f32; 16];
    // SAFETY: `out` is 16 f32 = 64 bytes; `write_unaligned` has no alignment requirement.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr() as *mut __m512, sums16(acc)) };
    out
}

/// `R` rows (`q`: `R·dk` values grouped) against one key.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn one_key<const R: usize>(q: &[u16], k: &[u16], dk: usize) -> [f32; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    for c in 0..dk / CHUNK {
        let kv = load(k, c * CHUNK);
        for i in 0..R {
            acc[i] = _mm512_dpbf16_ps(acc[i], load(q, (c * R + i) * CHUNK), kv);
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = _mm512_reduce_add_ps(acc[i]);
    }
    out
}

/// The lane sums of 16 vectors as one vector (lane `n` is the sum of `v[n]`'s lanes): a
/// transpose-and-add tree of 45 instructions where 16 separate lane sums take about 130.
#[inline]
#[target_feature(enable = "avx512f")]
fn sums16(v: [__m512; 16]) -> __m512 {
    // pairs: per 128-bit lane, positions 0 and 2 hold partial sums of v[2k], 1 and 3 of v[2k+1]
    let mut x = [_mm512_setzero_ps(); 8];
    for k in 0..8 {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        x[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // quads: per 128-bit lane, position p holds a partial sum of v[4k + p]
    let mut y = [_mm512_setzero_ps(); 4];
    for k in 0..4 {
        let (a, b) = (_mm512_castps_pd(x[2 * k]), _mm512_castps_pd(x[2 * k + 1]));
        // 64-bit moves, 32-bit adds
        y[k] = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    // across 128-bit lanes: lanes (0, 2) + (1, 3), then the two halves
    let (u01, u23) = (fold_lanes(y[0], y[1]), fold_lanes(y[2], y[3]));
    fold_lanes(u01, u23)
}

/// 128-bit lanes (a0 + a1, a2 + a3, b0 + b1, b2 + b3) of `a` and `b` (a function, not a closure:
/// see [`super::attend`]'s note on closures in a target-feature context).
#[inline]
#[target_feature(enable = "avx512f")]
fn fold_lanes(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xdd>(a, b),
    )
}

/// The softmax weights of `rows` rows (`s[r·kb..r·kb + kb]`, `kb` a multiple of 32, weights past
/// a row's last key zero) rounded to bf16 (nearest, ties to even) as pairs: `w[r·kb/2 + j/2]`
/// holds weight `j` in its low half and `j + 1` in its high half.
///
/// # Safety
/// The CPU must have AVX-512 F/BW and AVX512_BF16 ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn weight_pairs(s: &[f32], rows: usize, kb: usize, w: &mut [u32]) {
    assert!(kb.is_multiple_of(32) && s.len() >= rows * kb && w.len() >= rows * kb / 2);
    for r in 0..rows {
        for c in (0..kb).step_by(32) {
            let src = &s[r * kb + c..][..32];
            let dst = &mut w[(r * kb + c) / 2..][..16];
            // SAFETY: `src` holds 32 f32 (two `__m512`, offsets 0 and 16) and `dst` 16 u32 (one
            // `__m512bh`), both bounds-checked slices; unaligned reads and writes of plain bits.
            unsafe {
                let p = src.as_ptr() as *const __m512;
                let (lo, hi) = (
                    std::ptr::read_unaligned(p),
                    std::ptr::read_unaligned(p.add(1)),
                );
                // the second argument gives the low 16 elements
                let b = _mm512_cvtne2ps_pbh(hi, lo);
                std::ptr::write_unaligned(dst.as_mut_ptr() as *mut __m512bh, b);
            }
        }
    }
}

/// `o_r += Σ_j w_r(j) · value_j` for `rows` rows (`w` from [`weight_pairs`], `kb/2` pairs per
/// row; `o` `[rows, dv]` in f32, `dv` a multiple of 32) over keys `0..nbs[g]` for each group of
/// up to eight rows (`nbs[g]`: the keys the group sees; a last odd key is paired with zeros).
///
/// # Safety
/// The CPU must have AVX-512 F/BW and AVX512_BF16 ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn weighted_values(
    w: &[u32],
    kb: usize,
    values: Rows<'_>,
    vis: &[usize],
    dv: usize,
    o: &mut [f32],
) {
    let rows = vis.len();
    assert!(
        dv.is_multiple_of(CHUNK)
            && kb.is_multiple_of(2)
            && o.len() == rows * dv
            && w.len() >= rows * kb / 2
    );
    let mut r0 = 0;
    while r0 < rows {
        let r = match rows - r0 {
            8.. => 8,
            4..=7 => 4,
            n => n,
        };
        let nb = vis[r0..r0 + r].iter().copied().max().unwrap_or(0);
        assert!(nb <= kb);
        if nb > 0 {
            let (wg, og) = (&w[r0 * kb / 2..], &mut o[r0 * dv..(r0 + r) * dv]);
            match r {
                8 => values_group::<8>(wg, kb, values, nb, dv, og),
                4 => values_group::<4>(wg, kb, values, nb, dv, og),
                3 => values_group::<3>(wg, kb, values, nb, dv, og),
                2 => values_group::<2>(wg, kb, values, nb, dv, og),
                _ => values_group::<1>(wg, kb, values, nb, dv, og),
            }
        }
        r0 += r;
    }
}

/// [`weighted_values`] for one group of `R` rows over keys `0..nb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn values_group<const R: usize>(
    w: &[u32],
    kb: usize,
    values: Rows<'_>,
    nb: usize,
    dv: usize,
    o: &mut [f32],
) {
    let half = kb / 2;
    let ws = &w[..R * half];
    let row = |j: usize| &values.data[values.base + j * values.stride..][..dv];
    // from the unpacking's order (low: columns 8L..8L+4 of 128-bit lane L, high: 8L+4..8L+8)
    // back to column order: index n < 16 takes the low vector's lane n, 16 + n the high one's
    let idx = |first: usize| {
        let mut ix = [0i32; 16];
        for (t, x) in ix.iter_mut().enumerate() {
            let d = first + t;
            let (lane, k) = (d / 8, d % 8);
            *x = if k < 4 {
                (lane * 4 + k) as i32
            } else {
                (16 + lane * 4 + k - 4) as i32
            };
        }
        // SAFETY: 16 i32 = 64 bytes; every bit pattern is a `__m512i`.
        unsafe { std::ptr::read_unaligned(ix.as_ptr() as *const __m512i) }
    };
    let (idx0, idx1) = (idx(0), idx(16));
    let zero = _mm512_setzero_ps();
    for c in (0..dv).step_by(CHUNK) {
        let mut acc = [[zero; 2]; R];
        let mut j = 0;
        while j < nb {
            let v0 = cast_i(load(row(j), c));
            let v1 = if j + 1 < nb {
                cast_i(load(row(j + 1), c))
            } else {
                _mm512_setzero_si512()
            };
            let lo = cast_bh(_mm512_unpacklo_epi16(v0, v1));
            let hi = cast_bh(_mm512_unpackhi_epi16(v0, v1));
            for i in 0..R {
                let p = cast_bh(_mm512_set1_epi32(ws[i * half + j / 2] as i32));
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], p, lo);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], p, hi);
            }
            j += 2;
        }
        for i in 0..R {
            let dst = &mut o[i * dv + c..][..CHUNK];
            let a = _mm512_permutex2var_ps(acc[i][0], idx0, acc[i][1]);
            let b = _mm512_permutex2var_ps(acc[i][0], idx1, acc[i][1]);
            // SAFETY: `dst` holds 32 f32 (two `__m512` at offsets 0 and 16), a bounds-checked
            // slice; unaligned reads and writes of plain bits.
            unsafe {
                let p = dst.as_mut_ptr() as *mut __m512;
                std::ptr::write_unaligned(p, _mm512_add_ps(std::ptr::read_unaligned(p), a));
                let p1 = p.add(1);
                std::ptr::write_unaligned(p1, _mm512_add_ps(std::ptr::read_unaligned(p1), b));
            }
        }
    }
}

#[inline(always)]
fn cast_i(x: __m512bh) -> __m512i {
    // SAFETY: both are 64 bytes of plain bits.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(x) }
}

#[inline(always)]
fn cast_bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn bits(x: &[f32]) -> Vec<u16> {
        x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
    }

    fn f(b: u16) -> f64 {
        bf16::from_bits(b).to_f32() as f64
    }

    #[test]
    fn scores_are_the_dot_products_of_the_stored_values() {
        if !available() {
            eprintln!("no AVX512_BF16 on this CPU: nothing to test");
            return;
        }
        // 7 rows (a tile of four and a group of three), 11 keys (two tiles and three single keys)
        let (rows, dk, nb, kb, stride) = (7, 96, 11, 64, 100);
        let q = bits(&crate::rng::uniform(rows * dk, 1));
        let k = bits(&crate::rng::uniform(nb * stride + 5, 2));
        let qg = group_queries(&q, rows, dk);
        let mut s = vec![f32::NAN; rows * kb];
        let keys = Rows {
            data: &k,
            base: 5,
            stride,
        };
        // SAFETY: `available()` checked above.
        unsafe { scores(&qg, rows, dk, keys, nb, &mut s, kb) };
        for r in 0..rows {
            for j in 0..nb {
                let want: f64 = (0..dk)
                    .map(|c| f(q[r * dk + c]) * f(k[5 + j * stride + c]))
                    .sum();
                let got = s[r * kb + j] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} key {j}: {got} vs {want}"
                );
            }
            assert!(
                s[r * kb + nb].is_nan(),
                "row {r}: wrote past the block's keys"
            );
        }
    }

    #[test]
    fn packed_scores_are_the_dot_products_of_the_stored_values() {
        if !available() {
            return;
        }
        // 1 to 13 rows (every tile size: 6, 6 and 1 at 13), keys seen per row from 1 to 100 of
        // a 128-key block
        for rows in 1..=13 {
            packed_scores_case(rows);
        }
    }

    fn packed_scores_case(rows: usize) {
        let (dk, nb, kb, stride) = (96, 100, 128, 99);
        let q = bits(&crate::rng::uniform(rows * dk, 1));
        let k = bits(&crate::rng::uniform(nb * stride, 2));
        let vis: Vec<usize> = (0..rows).map(|r| [100, 1, 64, 65, 17][r % 5]).collect();
        let mut kt = vec![u32::MAX; dk / 2 * kb];
        let keys = Rows {
            data: &k,
            base: 0,
            stride,
        };
        pack_keys(keys, dk, nb, kb, &mut kt);
        let mut s = vec![f32::NAN; rows * kb];
        // SAFETY: `available()` checked above.
        unsafe { scores_packed(&pairs(&q, rows, dk), &vis, dk, &kt, kb, &mut s) };
        for r in 0..rows {
            // the row's tile sees up to its widest row's keys
            let t0 = r / 6 * 6;
            let seen = vis[t0..(t0 + 6).min(rows)].iter().copied().max().unwrap();
            for j in 0..vis[r] {
                let want: f64 = (0..dk)
                    .map(|c| f(q[r * dk + c]) * f(k[j * stride + c]))
                    .sum();
                let got = s[r * kb + j] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} key {j}: {got} vs {want}"
                );
            }
            // keys past `nb` in the run score 0 (zero packed keys); runs past `seen` untouched
            let run_end = seen.div_ceil(64) * 64;
            for j in nb.min(run_end)..run_end {
                assert_eq!(s[r * kb + j], 0.0, "row {r} key {j}");
            }
            assert!(s[r * kb + run_end..(r + 1) * kb].iter().all(|x| x.is_nan()));
        }
    }

    #[test]
    fn lane_sums_of_sixteen_vectors_come_in_order() {
        if !available() {
            return;
        }
        let x: Vec<f32> = (0..256).map(|i| (i * 7 % 31) as f32).collect();
        // SAFETY: `available()` checked above (AVX-512F); 16 vectors of 16 f32 read from `x`.
        let got: [f32; 16] = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|n| {
                std::ptr::read_unaligned(x[16 * n..].as_ptr() as *const __m512)
            });
            std::mem::transmute(sums16(v))
        };
        for n in 0..16 {
            assert_eq!(
                got[n],
                x[16 * n..16 * n + 16].iter().sum::<f32>(),
                "lane {n}"
            );
        }
    }

    #[test]
    fn weights_round_to_nearest_even_in_pairs_and_values_sum_in_column_order() {
        if !available() {
            return;
        }
        // 13 rows (groups of 8, 4 and 1), 64 columns, keys 0..nb per row (odd counts: a last key
        // paired with zeros)
        let (rows, kb, dv, stride) = (13, 64, 64, 70);
        let vis: Vec<usize> = (0..rows).map(|r| [64, 63, 17, 1, 0][r % 5]).collect();
        let mut s = crate::rng::uniform(rows * kb, 3);
        s.iter_mut().for_each(|x| *x = x.abs() + 1e-3);
        for r in 0..rows {
            s[r * kb + vis[r]..(r + 1) * kb].fill(0.0);
        }
        let mut w = vec![0u32; rows * kb / 2];
        // SAFETY: `available()` checked above.
        unsafe { weight_pairs(&s, rows, kb, &mut w) };
        for (n, x) in s.iter().enumerate() {
            let half = (w[n / 2] >> (16 * (n % 2))) as u16;
            assert_eq!(half, bf16::from_f32(*x).to_bits(), "weight {n}");
        }
        let v = bits(&crate::rng::uniform(kb * stride, 4));
        let vals = Rows {
            data: &v,
            base: 0,
            stride,
        };
        let mut o = crate::rng::uniform(rows * dv, 5);
        let before = o.clone();
        // SAFETY: `available()` checked above.
        unsafe { weighted_values(&w, kb, vals, &vis, dv, &mut o) };
        for r in 0..rows {
            // the group's keys (the widest row's; weights past a row's own keys are zero):
            // groups 0..8, 8..12, 12..13
            let g = match r {
                0..=7 => 0..8,
                8..=11 => 8..12,
                _ => 12..13,
            };
            let gn = vis[g].iter().copied().max().unwrap();
            for c in 0..dv {
                let want = before[r * dv + c] as f64
                    + (0..gn)
                        .map(|j| {
                            bf16::from_f32(s[r * kb + j]).to_f32() as f64 * f(v[j * stride + c])
                        })
                        .sum::<f64>();
                let got = o[r * dv + c] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "row {r} column {c}: {got} vs {want}"
                );
            }
        }
    }
}
