//! 解码的矩阵-向量积：少数几行输入乘一个大权重 `[k, n]`（f32、f16 或 bf16 存储，f32 累加），
//! 每个线程流式读取一段连续的权重行，只读一遍。
//!
//! Why: a decode step multiplies one row per sequence by every weight matrix, so it is bound by
//! how fast the weights stream from memory. burn-flex hands such a product to the `gemm` crate,
//! which reached about 31 GB/s here on cold weights (2048 x 2048, f32) against a measured 50 GB/s
//! streaming read (its blocking is built for large products), and in bf16 it widens the whole
//! weight to f32 on every call. Here each thread streams a contiguous band of weight rows once:
//! [`K_BLOCK`] weight rows at a time (8 concurrent streams, which the hardware prefetchers follow),
//! a block of two vectors of output columns for up to [`ROWS`] input rows accumulated in
//! registers, added into the thread's partial output once per block. Half-precision weights are
//! widened in registers (bf16: one load of 32-bit words gives a vector of even and a vector of odd
//! elements, by a shift and a mask; f16: the conversion instruction on AVX-512 and AVX2, integer
//! operations on the bits elsewhere), never converted
//! as a tensor; memory carries their own two bytes per element. Partial outputs of the bands are summed at the
//! end; the result equals the GEMM's up to the order of summation.
//!
//! Narrow weights with few input rows (a fine-grained MoE expert's `[512, 256]` f32 rows of
//! 1 KiB, one to three tokens) are read row after row instead ([`RowStream`]), the whole row's
//! columns in registers: interleaved streams only a row long each are too short for the
//! prefetchers. A decode step's experts at `scenarios/sc003-moe.toml` (2-core EPYC, f32, weights
//! from memory): the kernel's share of the step 6.1-6.5 → 5.3-5.4 ms. Narrow rows that stay on
//! the block path (more input rows, or rows wider than a tile: the experts' `[256, 512]` down
//! projection) have the next block's lines prefetched by the kernel itself
//! ([`PREFETCH_ROW_BYTES`]): the cold experts of a step 17-24 → 26-42 GB/s, the whole MoE step
//! 8.1-9.0 → 6.5-6.8 ms.
//!
//! Measured for the f32 design this replaces (2-core EPYC, one row, 2048 x 6144 f32 weights from
//! memory): 8 rows per pass 1.2 ms, 16 rows 1.8 ms, 32 rows 2.7 ms, one stream per weight row
//! 5.5 ms; with 8 input rows 2.4-2.5 / 3.7-3.9 / 4.0-4.4 / 10.8 ms.

// the register kernels index several rows' slices with one loop variable
#![allow(clippy::needless_range_loop)]

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use half::slice::HalfFloatSliceExt;

use super::attend::{group_queries, grouped_dots, score_groups};
use super::convert::{permute_blocks, Bf16, Elems, Format, F16, F32};
use super::Level;

/// Weight rows per pass over the columns.
pub const K_BLOCK: usize = 8;
/// Input rows accumulated together: 6 rows x 2 vectors of accumulators + 2 weight vectors + 1
/// broadcast = 15 of AVX2's 16 registers (the shape of `gemm`'s own f32 micro-kernel).
pub const ROWS: usize = 6;
/// Input rows at most for which weight rows that fit one tile of accumulators (AVX-512: 16
/// vectors for one input row, 8 for two, 4 for three or four; half that below) are read whole,
/// one after another ([`RowStream`]): the block path's interleaved streams would be only a row
/// long each (a fine-grained MoE expert's `[512, 256]` f32 rows are 1 KiB), too short for the
/// hardware prefetchers to follow. Rows wider than a tile keep the block path: split into tiles
/// they were read in strided pieces, and that was no faster (`[256, 512]`, `[2048, 1024]` bf16
/// for one input row: slower).
pub const NARROW_ROWS: usize = 4;
/// Weight rows per block of that path (a row narrower than the tile's width, read in two-vector
/// pieces, stays within a short stretch of memory).
pub const NARROW_BLOCK: usize = 16;
/// Output columns per pass over a block's weight rows at most.
pub const COL_TILE: usize = 8192;

/// Weight rows at most this long (bytes) are prefetched a block ahead in the block path: the
/// prefetchers follow longer streams well enough (`[2048, 6144]`, 24 KiB f32 and 12 KiB bf16
/// rows: within noise with and without), shorter ones not (`prefetch_timings`, 2-core EPYC:
/// `[2048, 2048]` f32, 8 KiB rows, one input row +9-25 %; 2 KiB rows 1.3-1.9x).
pub const PREFETCH_ROW_BYTES: usize = 8192;

/// The timing harness's switch: no prefetching while set (tests only).
#[cfg(test)]
static PREFETCH_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[inline(always)]
fn prefetch_off() -> bool {
    #[cfg(test)]
    return PREFETCH_OFF.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// `y[r, :] = Σ_k x[r, k] · w[k, :]` for `rows` input rows (`x`: `rows x k` row-major, `w`:
/// `k x n` row-major), accumulated in f32 at `level`: the weight rows are split into one
/// contiguous band per pool thread (at least 64 rows each), each band streamed once; partial
/// outputs summed.
pub fn gemv_rows(
    level: Level,
    x: &[f32],
    w: Elems<'_>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "gemv: w is not k x n");
    gemv_strided(level, x, w, 0, n, rows, k, n)
}

/// [`gemv_rows`] for a weight whose row `kk` is `w[off + kk·ws..][..n]` (a view: a slice of a
/// larger matrix, one head of a batched weight).
#[allow(clippy::too_many_arguments)]
pub fn gemv_strided(
    level: Level,
    x: &[f32],
    w: Elems<'_>,
    off: usize,
    ws: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "gemv: x is not rows x k");
    assert!(ws >= n || k <= 1, "gemv: rows overlap");
    if k == 0 || n == 0 {
        return vec![0.0; rows * n];
    }
    assert!(
        w.len() >= off + (k - 1) * ws + n,
        "gemv: w too short for k x n at stride ws"
    );
    in_bands(k, rows * n, |y, k0, k1| {
        level.run(Band {
            y,
            x,
            w,
            off,
            ws,
            rows,
            k,
            n,
            k0,
            k1,
        })
    })
}

/// `y += x · w` on the calling thread (one band over all `k` weight rows; no pool tasks): for
/// callers that already run one product per pool thread (the MoE experts of a decode step).
#[allow(clippy::too_many_arguments)]
pub fn gemv_band(
    level: Level,
    y: &mut [f32],
    x: &[f32],
    w: Elems<'_>,
    off: usize,
    ws: usize,
    rows: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(x.len(), rows * k, "gemv: x is not rows x k");
    assert_eq!(y.len(), rows * n, "gemv: y is not rows x n");
    if k == 0 || n == 0 {
        return;
    }
    assert!(
        w.len() >= off + (k - 1) * ws + n,
        "gemv: w too short for k x n at stride ws"
    );
    level.run(Band {
        y,
        x,
        w,
        off,
        ws,
        rows,
        k,
        n,
        k0: 0,
        k1: k,
    });
}

/// An input-major product split over the pool: the `k` input rows in one band per pool thread
/// (at least 64 rows each), `band(y, k0, k1)` adding rows `k0..k1`' contribution into a zeroed
/// `y` of `len` outputs, the bands' outputs summed.
fn in_bands(k: usize, len: usize, band: impl Fn(&mut [f32], usize, usize) + Sync) -> Vec<f32> {
    let bands = rayon::current_num_threads().min(k / 64).max(1);
    let size = k.div_ceil(bands);
    let partials: Vec<Vec<f32>> = (0..bands)
        .into_par_iter()
        .map(|b| {
            let mut y = vec![0.0f32; len];
            band(&mut y, (b * size).min(k), ((b + 1) * size).min(k));
            y
        })
        .collect();
    sum_partials(partials, len)
}

/// The bands' partial outputs summed.
fn sum_partials(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut it = partials.into_iter();
    let mut y = it.next().unwrap_or_else(|| vec![0.0; len]);
    for p in it {
        for (a, b) in y.iter_mut().zip(&p) {
            *a += *b;
        }
    }
    y
}

/// `y[r, c] = Σ_i x[r, i] · w[c, i]` for a weight stored output-major (PyTorch's `[out, in]`
/// layout: row `c` is `w[off + c·ws..][..k]`), accumulated in f32 at `level`: each output is a
/// dot product of a weight row with every input row (four input rows share each load of the
/// weight row); the output rows are split into one band per pool thread ([`gemv_heads`] with one
/// head).
#[allow(clippy::too_many_arguments)]
pub fn gemv_out_in(
    level: Level,
    x: &[f32],
    w: Elems<'_>,
    off: usize,
    ws: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    gemv_heads(level, x, w, off, 0, 1, ws, 1, rows, k, n)
}

/// `x` (`rows x k`) in the order the weight rows are widened (see `Format::pair`) and grouped
/// four rows at a time like the attention's queries (`group_queries`): the inputs of [`dots`].
#[inline(always)]
fn dot_inputs<S: Simd, F: Format>(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut g = group_queries::<S>(x, rows, k);
    if F::permuted::<S>() {
        super::attend::permute_grouped::<S>(&mut g, rows, k);
    }
    g
}

/// `put(r, xg_r · w[at..at + k])` for every input row `r` (`xg` from [`dot_inputs`]).
#[inline(always)]
fn dots<S: Simd, F: Format>(
    simd: S,
    xg: &[f32],
    rows: usize,
    k: usize,
    w: &[F::Elem],
    at: usize,
    mut put: impl FnMut(usize, f32),
) {
    for (r0, g) in score_groups(rows) {
        let xr = &xg[r0 * k..(r0 + g) * k];
        let mut out = |d: &[f32]| {
            for (i, v) in d.iter().enumerate() {
                put(r0 + i, *v);
            }
        };
        match g {
            4 => out(&grouped_dots::<S, 4, F>(simd, xr, k, w, at)),
            3 => out(&grouped_dots::<S, 3, F>(simd, xr, k, w, at)),
            2 => out(&grouped_dots::<S, 2, F>(simd, xr, k, w, at)),
            _ => out(&grouped_dots::<S, 1, F>(simd, xr, k, w, at)),
        }
    }
}

/// Per-head products over one weight whose heads lie side by side in each stored row (absorbed
/// MLA's W_UK and W_UV, views of `wkv_b`, stored `[d_c, h·(d_nope + d_v)]`): for `h` heads,
/// `y[hh, r, j] = Σ_i x[hh, r, i] · W_hh[i, j]`, `W_hh[i, j] = w[off + hh·hs + i·si + j·sj]`,
/// `si` or `sj` 1 (`x`: `[h, rows, k]`, `y`: `[h, rows, n]`), accumulated in f32 at `level`.
///
/// The stored rows are split into one band per pool thread and each band is streamed once, every
/// head's piece of a row done before the next row (a product per head, one head after another,
/// read each head's short piece of every row: 512 bytes at a 16 KiB stride at V2-Lite's
/// dimensions). Input-major (`sj == 1`, W_UV): a band of the `k` input rows, blocks of
/// [`HEAD_BLOCK`] rows through [`Band`]'s kernels head by head, partial outputs summed; else
/// output-major (`si == 1`, W_UK): a band of the `n` outputs, each a dot product per head and row.
#[allow(clippy::too_many_arguments)]
pub fn gemv_heads(
    level: Level,
    x: &[f32],
    w: Elems<'_>,
    off: usize,
    hs: usize,
    si: usize,
    sj: usize,
    h: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), h * rows * k, "gemv_heads: x is not h x rows x k");
    assert!(
        si == 1 || sj == 1,
        "gemv_heads: neither rows nor columns contiguous"
    );
    if h == 0 || rows == 0 || k == 0 || n == 0 {
        return vec![0.0; h * rows * n];
    }
    assert!(
        w.len() > off + (h - 1) * hs + (k - 1) * si + (n - 1) * sj,
        "gemv_heads: w too short for the heads at these strides"
    );
    if sj == 1 {
        return in_bands(k, h * rows * n, |y, k0, k1| {
            level.run(HeadsBand {
                band: Band {
                    y,
                    x,
                    w,
                    off,
                    ws: si,
                    rows,
                    k,
                    n,
                    k0,
                    k1,
                },
                hs,
                h,
            })
        });
    }
    let bands = rayon::current_num_threads().min(n / 16).max(1);
    let band = n.div_ceil(bands);
    let parts: Vec<(usize, Vec<f32>)> = (0..bands)
        .into_par_iter()
        .map(|b| {
            let (c0, c1) = ((b * band).min(n), ((b + 1) * band).min(n));
            let y = level.run(HeadsOutIn {
                x,
                w,
                off,
                hs,
                ws: sj,
                h,
                rows,
                k,
                c0,
                c1,
            });
            (c0, y)
        })
        .collect();
    let mut y = vec![0f32; h * rows * n];
    for (c0, part) in parts {
        let width = part.len() / (h * rows);
        for (r, pr) in part.chunks(width.max(1)).enumerate().take(h * rows) {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(pr);
        }
    }
    y
}

/// Stored rows per block of [`gemv_heads`]' input-major band: every head's piece of these rows
/// before the next block's (whose pieces are prefetched meanwhile).
pub const HEAD_BLOCK: usize = 8;

/// Stored rows ahead whose pieces [`gemv_heads`]' output-major band prefetches. Each head's piece
/// of a row is a few lines, then a gap (the other half of the head's columns), which the
/// hardware prefetchers follow poorly: `heads_timings`, W_UK from memory at V2-Lite's shape,
/// f32, 2-core EPYC: 0.62-0.68 ms without, 0.46-0.49 with (noisy: the day's read limit swung 2x).
pub const HEAD_AHEAD: usize = 2;

/// Input rows `k0..k1` of [`gemv_heads`] (input-major) for every head, added into `y`: `band`
/// is head 0's band with every head's `y` (`[h, rows, n]`) and `x` (`[h, rows, k]`); head `hh`'s
/// weight starts `hh·hs` after `band.off`.
struct HeadsBand<'a> {
    band: Band<'a>,
    hs: usize,
    h: usize,
}

impl WithSimd for HeadsBand<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match self.band.w {
            Elems::F32(w) => self.run::<S, F32>(simd, w),
            Elems::Bf16(w) => self.run::<S, Bf16>(simd, w.reinterpret_cast()),
            Elems::F16(w) => self.run::<S, F16>(simd, w.reinterpret_cast()),
        }
    }
}

impl HeadsBand<'_> {
    #[inline(always)]
    fn run<S: Simd, F: Format>(self, simd: S, w: &[F::Elem]) {
        let HeadsBand { band, hs, h } = self;
        let Band {
            y,
            x,
            w: elems,
            off,
            ws,
            rows,
            k,
            n,
            k0,
            k1,
        } = band;
        // every head's outputs into the pairs' order once (see `Band::run`)
        if F::permuted::<S>() {
            permute_blocks(y, h * rows, n, S::F32_LANES, false);
        }
        let per = super::LINE_BYTES / size_of::<F::Elem>();
        for kb in (k0..k1).step_by(HEAD_BLOCK) {
            let ke = (kb + HEAD_BLOCK).min(k1);
            // the next block's pieces (each head's few lines of a row are too short a stream
            // for the hardware prefetchers)
            for kk in ke..(ke + HEAD_BLOCK).min(k1) {
                for hh in 0..h {
                    let at = off + hh * hs + kk * ws;
                    for c in (0..n).step_by(per) {
                        super::prefetch(w, at + c);
                    }
                }
            }
            for (hh, yh) in y.chunks_mut(rows * n).enumerate() {
                Band {
                    y: yh,
                    x: &x[hh * rows * k..(hh + 1) * rows * k],
                    w: elems,
                    off: off + hh * hs,
                    ws,
                    rows,
                    k,
                    n,
                    k0: kb,
                    k1: ke,
                }
                .body::<S, F>(simd, w);
            }
        }
        if F::permuted::<S>() {
            permute_blocks(y, h * rows, n, S::F32_LANES, true);
        }
    }
}

/// Outputs `c0..c1` of [`gemv_heads`] (output-major) for every head, as `[h, rows, c1 - c0]`.
struct HeadsOutIn<'a> {
    x: &'a [f32],
    w: Elems<'a>,
    off: usize,
    hs: usize,
    ws: usize,
    h: usize,
    rows: usize,
    k: usize,
    c0: usize,
    c1: usize,
}

impl WithSimd for HeadsOutIn<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
        match self.w {
            Elems::F32(_) => self.run::<S, F32>(simd),
            Elems::Bf16(_) => self.run::<S, Bf16>(simd),
            Elems::F16(_) => self.run::<S, F16>(simd),
        }
    }
}

impl HeadsOutIn<'_> {
    #[inline(always)]
    fn run<S: Simd, F: Format>(self, simd: S) -> Vec<f32> {
        let HeadsOutIn {
            x,
            w,
            off,
            hs,
            ws,
            h,
            rows,
            k,
            c0,
            c1,
        } = self;
        let w = F::slice(w).expect("format matches storage");
        let xg: Vec<Vec<f32>> = x
            .chunks(rows * k)
            .map(|xh| dot_inputs::<S, F>(xh, rows, k))
            .collect();
        let width = c1 - c0;
        let mut y = vec![0f32; h * rows * width];
        let per = super::LINE_BYTES / size_of::<F::Elem>();
        for c in c0..c1 {
            // the pieces HEAD_AHEAD rows on (see `HeadsBand::run`)
            if c + HEAD_AHEAD < c1 {
                for hh in 0..h {
                    let at = off + hh * hs + (c + HEAD_AHEAD) * ws;
                    for i in (0..k).step_by(per) {
                        super::prefetch(w, at + i);
                    }
                }
            }
            for (hh, xh) in xg.iter().enumerate() {
                let yh = &mut y[hh * rows * width..];
                dots::<S, F>(simd, xh, rows, k, w, off + hh * hs + c * ws, |r, v| {
                    yh[r * width + c - c0] = v
                });
            }
        }
        y
    }
}

/// One band: `y += x[:, k0..k1] · w[k0..k1, :]`.
struct Band<'a> {
    y: &'a mut [f32],
    x: &'a [f32],
    w: Elems<'a>,
    off: usize,
    ws: usize,
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
}

impl WithSimd for Band<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        match self.w {
            Elems::F32(w) => self.run::<S, F32>(simd, w),
            Elems::Bf16(w) => self.run::<S, Bf16>(simd, w.reinterpret_cast()),
            Elems::F16(w) => self.run::<S, F16>(simd, w.reinterpret_cast()),
        }
    }
}

impl<'a> Band<'a> {
    #[inline(always)]
    fn run<S: Simd, F: Format>(self, simd: S, w: &[F::Elem]) {
        let (rows, n) = (self.rows, self.n);
        // a permuted format (bf16; f16 at the scalar and NEON levels) accumulates each full block of columns as
        // its even then its odd columns (see `Format::pair`): `y`'s own values into that order
        // first, back at the end
        if F::permuted::<S>() {
            permute_blocks(self.y, rows, n, S::F32_LANES, false);
        }
        let y = self.body::<S, F>(simd, w);
        if F::permuted::<S>() {
            permute_blocks(y, rows, n, S::F32_LANES, true);
        }
    }

    /// The band's products into `y` (returned), in the order a permuted format's pairs give
    /// (the caller permutes `y` before and after).
    #[inline(always)]
    fn body<S: Simd, F: Format>(self, simd: S, w: &[F::Elem]) -> &'a mut [f32] {
        let Band {
            y,
            x,
            off,
            ws,
            rows,
            k,
            n,
            k0,
            k1,
            ..
        } = self;
        let l = S::F32_LANES;
        // narrow rows (MoE experts, the narrower projections): the block path's K_BLOCK streams
        // are one row each, too short for the hardware prefetchers, so it asks for the next
        // block's lines itself (docs/benchmarks.md, 2026-12-07（六）)
        let prefetch = n * size_of::<F::Elem>() <= PREFETCH_ROW_BYTES && !prefetch_off();
        let wide = l >= 16;
        // accumulator vectors per input row in one tile: 16 of AVX-512's 32 registers (8 of 16)
        let t_max = match (rows, wide) {
            (1, true) => 16,
            (1, false) | (2, true) => 8,
            (2, false) | (_, true) => 4,
            _ => 2,
        };
        // K_BLOCK (or fewer) weight rows from row `kb`
        let block = |kb: usize| Block::<F> {
            x,
            k,
            kx: kb,
            nk: (kb + K_BLOCK).min(k1) - kb,
            w,
            at: off + kb * ws,
            ws,
            n,
            prefetch,
        };
        if (1..=NARROW_ROWS).contains(&rows) && n <= t_max * l {
            // narrow weights, few rows: every weight row read whole, one after another
            let body = n / (2 * l) * (2 * l);
            let rs = RowStream::<F> {
                x,
                w,
                off,
                ws,
                k,
                n,
                k0,
                k1,
            };
            match (rows, wide) {
                (1, true) => rs.tiles::<S, 1, 16>(simd, y, body),
                (1, false) => rs.tiles::<S, 1, 8>(simd, y, body),
                (2, true) => rs.tiles::<S, 2, 8>(simd, y, body),
                (2, false) => rs.tiles::<S, 2, 4>(simd, y, body),
                (3, true) => rs.tiles::<S, 3, 4>(simd, y, body),
                (3, false) => rs.tiles::<S, 3, 2>(simd, y, body),
                (_, true) => rs.tiles::<S, 4, 4>(simd, y, body),
                (_, false) => rs.tiles::<S, 4, 2>(simd, y, body),
            }
            // the last columns (fewer than two vectors): the block path's plain loops
            if body < n {
                for kb in (k0..k1).step_by(K_BLOCK) {
                    block(kb).columns(simd, y, rows, body, n);
                }
            }
            return y;
        }
        for kb in (k0..k1).step_by(K_BLOCK) {
            let blk = block(kb);
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + COL_TILE).min(n);
                blk.columns(simd, y, rows, c0, c1);
                c0 = c1;
            }
        }
        y
    }
}

/// A band of narrow weight rows `k0..k1` for at most [`NARROW_ROWS`] input rows, read row after
/// row: weight row `kk`, column `c` is `w[off + kk·ws + c]`.
struct RowStream<'a, F: Format> {
    x: &'a [f32],
    w: &'a [F::Elem],
    off: usize,
    ws: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
}

impl<F: Format> RowStream<'_, F> {
    /// Columns `0..body` (`body` a multiple of two vectors, at most `T` vectors) of all `R` rows:
    /// blocks of [`NARROW_BLOCK`] weight rows, each through one tile of `T` vectors or, for a
    /// narrower row, two-vector pieces (so that its pieces are read within a short stretch of
    /// memory).
    #[inline(always)]
    fn tiles<S: Simd, const R: usize, const T: usize>(&self, simd: S, y: &mut [f32], body: usize) {
        let l = S::F32_LANES;
        let mut kb = self.k0;
        while kb < self.k1 {
            let ke = (kb + NARROW_BLOCK).min(self.k1);
            let mut c = 0;
            while c + T * l <= body {
                self.tile::<S, R, T>(simd, y, c, kb, ke);
                c += T * l;
            }
            while c < body {
                self.tile::<S, R, 2>(simd, y, c, kb, ke);
                c += 2 * l;
            }
            kb = ke;
        }
    }

    /// Rows `0..R`, `T` vectors of columns from column `c` (`T` even), weight rows `kb..ke` one
    /// after another, the accumulators in registers, added into `y` once.
    #[inline(always)]
    fn tile<S: Simd, const R: usize, const T: usize>(
        &self,
        simd: S,
        y: &mut [f32],
        c: usize,
        kb: usize,
        ke: usize,
    ) {
        let l = S::F32_LANES;
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; T]; R];
        let xs: [&[f32]; R] = std::array::from_fn(|r| &self.x[r * self.k + kb..][..ke - kb]);
        for (i, kk) in (kb..ke).enumerate() {
            let at = self.off + kk * self.ws + c;
            let xv: [S::f32s; R] = std::array::from_fn(|r| simd.splat_f32s(xs[r][i]));
            for t in 0..T / 2 {
                let (w0, w1) = F::pair(simd, self.w, at + 2 * t * l);
                for r in 0..R {
                    acc[r][2 * t] = simd.mul_add_f32s(xv[r], w0, acc[r][2 * t]);
                    acc[r][2 * t + 1] = simd.mul_add_f32s(xv[r], w1, acc[r][2 * t + 1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let (yv, _) = S::as_mut_simd_f32s(&mut y[r * self.n + c..][..T * l]);
            for t in 0..T {
                yv[t] = simd.add_f32s(yv[t], a[t]);
            }
        }
    }
}

/// K_BLOCK (or fewer) weight rows: weight row `kx + kk`, column `c` is `w[at + kk·ws + c]`.
struct Block<'a, F: Format> {
    x: &'a [f32],
    k: usize,
    kx: usize,
    nk: usize,
    w: &'a [F::Elem],
    at: usize,
    ws: usize,
    n: usize,
    /// Prefetch the next block's rows while reading this one (narrow rows only).
    prefetch: bool,
}

impl<F: Format> Block<'_, F> {
    /// Adds the block's contribution to output columns `c0..c1` of every row (`c0` a multiple of
    /// two vectors).
    #[inline(always)]
    fn columns<S: Simd>(&self, simd: S, y: &mut [f32], rows: usize, c0: usize, c1: usize) {
        let cols = 2 * S::F32_LANES;
        let mut c = c0;
        while c + cols <= c1 {
            let mut r0 = 0;
            while r0 < rows {
                let g = (rows - r0).min(ROWS);
                match g {
                    6 => self.group::<S, 6>(simd, y, r0, c),
                    5 => self.group::<S, 5>(simd, y, r0, c),
                    4 => self.group::<S, 4>(simd, y, r0, c),
                    3 => self.group::<S, 3>(simd, y, r0, c),
                    2 => self.group::<S, 2>(simd, y, r0, c),
                    _ => self.group::<S, 1>(simd, y, r0, c),
                }
                r0 += g;
            }
            c += cols;
        }
        // the last columns (fewer than two vectors): plain loops, in column order
        if c < c1 {
            for kk in 0..self.nk {
                let wr = &self.w[self.at + kk * self.ws + c..self.at + kk * self.ws + c1];
                for r in 0..rows {
                    let a = self.x[r * self.k + self.kx + kk];
                    let yr = &mut y[r * self.n + c..r * self.n + c1];
                    for (o, v) in yr.iter_mut().zip(wr) {
                        *o += a * F::one(*v);
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + R`, two vectors of columns from column `c`.
    #[inline(always)]
    fn group<S: Simd, const R: usize>(&self, simd: S, y: &mut [f32], r0: usize, c: usize) {
        let l = S::F32_LANES;
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; 2]; R];
        let xs: [&[f32]; R] =
            std::array::from_fn(|r| &self.x[(r0 + r) * self.k + self.kx..][..self.nk]);
        let pair_bytes = 2 * l * size_of::<F::Elem>();
        for kk in 0..self.nk {
            // the same columns K_BLOCK weight rows on: the next block's (first group only; once
            // per line where two vectors are shorter than one)
            if self.prefetch
                && r0 == 0
                && (c * size_of::<F::Elem>()) % super::LINE_BYTES < pair_bytes
            {
                let ahead = self.at + (kk + K_BLOCK) * self.ws + c;
                for o in (0..2 * l).step_by(super::LINE_BYTES / size_of::<F::Elem>()) {
                    super::prefetch(self.w, ahead + o);
                }
            }
            let (w0, w1) = F::pair(simd, self.w, self.at + kk * self.ws + c);
            for r in 0..R {
                let xv = simd.splat_f32s(xs[r][kk]);
                acc[r][0] = simd.mul_add_f32s(xv, w0, acc[r][0]);
                acc[r][1] = simd.mul_add_f32s(xv, w1, acc[r][1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let (yv, _) = S::as_mut_simd_f32s(&mut y[(r0 + r) * self.n + c..][..2 * l]);
            yv[0] = simd.add_f32s(yv[0], a[0]);
            yv[1] = simd.add_f32s(yv[1], a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use half::{bf16, f16};

    /// The plain reference: f64 sums of the stored values.
    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[r * k + kk] as f64 * w[kk * n + c] as f64;
                }
                y[r * n + c] = s as f32;
            }
        }
        y
    }

    fn close(got: &[f32], want: &[f32], k: usize, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            // |x|, |w| <= 1: an f32 sum of k products is within k·2^-23 of the exact one
            assert!(
                (g - w).abs() <= 4e-7 * k as f32 + 1e-6,
                "{what} [{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn every_level_dtype_row_count_and_tail_matches_the_reference() {
        for level in Level::available() {
            for (rows, k, n) in [
                (1, 64, 32),
                (3, 130, 47),
                (6, 200, 64),
                (7, 65, 100),
                (16, 96, 33),
                (2, 3, 1),
                // the row-streaming path (at most NARROW_ROWS rows, a row within one tile): full
                // tiles of every width at AVX-512 and AVX2, two-vector pieces, tails, two bands
                // (k >= 128); and rows just too wide for it
                (1, 140, 256),
                (1, 70, 250),
                (1, 20, 64),
                (2, 33, 128),
                (2, 20, 32),
                (3, 17, 64),
                (4, 130, 64),
                (4, 20, 16),
                (3, 9, 90),
                (1, 30, 300),
            ] {
                let x = uniform(rows * k, 1);
                let w = uniform(k * n, 2);
                let what = format!("{level} rows {rows} k {k} n {n}");
                let y = gemv_rows(level, &x, Elems::F32(&w), rows, k, n);
                close(
                    &y,
                    &reference(&x, &w, rows, k, n),
                    k,
                    &format!("{what} f32"),
                );
                let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let wq: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
                let y = gemv_rows(level, &x, Elems::F16(&wh), rows, k, n);
                close(
                    &y,
                    &reference(&x, &wq, rows, k, n),
                    k,
                    &format!("{what} f16"),
                );
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let wq: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let y = gemv_rows(level, &x, Elems::Bf16(&wb), rows, k, n);
                close(
                    &y,
                    &reference(&x, &wq, rows, k, n),
                    k,
                    &format!("{what} bf16"),
                );
            }
        }
    }

    #[test]
    fn more_columns_than_a_tile() {
        let (rows, k, n) = (2, 70, COL_TILE + 37);
        let x = uniform(rows * k, 3);
        let w = uniform(k * n, 4);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wq: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let y = gemv_rows(Level::detected(), &x, Elems::Bf16(&wb), rows, k, n);
        close(&y, &reference(&x, &wq, rows, k, n), k, "wide bf16");
    }

    #[test]
    fn strided_and_output_major_weights_match_the_reference() {
        for level in Level::available() {
            for (rows, k, n) in [(1, 70, 33), (5, 128, 64), (8, 40, 17)] {
                let x = uniform(rows * k, 9);
                // a [k, n] view at row stride n + 5, offset 3, inside a larger buffer
                let (off, ws) = (3, n + 5);
                let buf = uniform(off + k * ws, 10);
                let dense: Vec<f32> = (0..k * n)
                    .map(|i| buf[off + (i / n) * ws + i % n])
                    .collect();
                let want = reference(&x, &dense, rows, k, n);
                let bb: Vec<bf16> = buf.iter().map(|&v| bf16::from_f32(v)).collect();
                let dq: Vec<f32> = (0..k * n)
                    .map(|i| bb[off + (i / n) * ws + i % n].to_f32())
                    .collect();
                let y = gemv_strided(level, &x, Elems::F32(&buf), off, ws, rows, k, n);
                close(&y, &want, k, &format!("{level} strided f32"));
                let y = gemv_strided(level, &x, Elems::Bf16(&bb), off, ws, rows, k, n);
                close(
                    &y,
                    &reference(&x, &dq, rows, k, n),
                    k,
                    &format!("{level} strided bf16"),
                );
                // the same matrix stored output-major: row c of [n, k] at stride k + 2
                let ws2 = k + 2;
                let mut wt = vec![0f32; off + n * ws2];
                for i in 0..k {
                    for c in 0..n {
                        wt[off + c * ws2 + i] = dense[i * n + c];
                    }
                }
                let y = gemv_out_in(level, &x, Elems::F32(&wt), off, ws2, rows, k, n);
                close(&y, &want, k, &format!("{level} out-in f32 rows {rows}"));
                let wth: Vec<f16> = wt.iter().map(|&v| f16::from_f32(v)).collect();
                let dq: Vec<f32> = (0..k * n)
                    .map(|i| wth[off + (i % n) * ws2 + i / n].to_f32())
                    .collect();
                let y = gemv_out_in(level, &x, Elems::F16(&wth), off, ws2, rows, k, n);
                close(
                    &y,
                    &reference(&x, &dq, rows, k, n),
                    k,
                    &format!("{level} out-in f16"),
                );
            }
        }
    }

    #[test]
    fn heads_side_by_side_in_each_row_match_the_reference() {
        // heads interleaved in the stored rows as in `wkv_b` (each head's row piece then a gap,
        // the other half of its columns), and heads one after another (a plain batched weight)
        for level in Level::available() {
            for (h, rows, k, n) in [
                (3, 1, 70, 33),
                (4, 2, 64, 130),
                (2, 5, 130, 20),
                (1, 8, 17, 64),
                (5, 3, 200, 9),
            ] {
                let x = uniform(h * rows * k, 11);
                for interleaved in [true, false] {
                    for input_major in [true, false] {
                        // W_hh[i, j] at off + hh·hs + i·si + j·sj
                        let off = 3;
                        let (inner, outer) = if input_major { (n, k) } else { (k, n) };
                        let (hs, so) = if interleaved {
                            (2 * inner + 1, h * (2 * inner + 1) + 2)
                        } else {
                            (outer * (inner + 2), inner + 2)
                        };
                        let (si, sj) = if input_major { (so, 1) } else { (1, so) };
                        let len = off + (h - 1) * hs + (k - 1) * si + (n - 1) * sj + 1;
                        let buf = uniform(len, 12);
                        let bh: Vec<f16> = buf.iter().map(|&v| f16::from_f32(v)).collect();
                        let bb: Vec<bf16> = buf.iter().map(|&v| bf16::from_f32(v)).collect();
                        for (name, e, q) in [
                            ("f32", Elems::F32(&buf), buf.clone()),
                            (
                                "f16",
                                Elems::F16(&bh),
                                bh.iter().map(|v| v.to_f32()).collect(),
                            ),
                            (
                                "bf16",
                                Elems::Bf16(&bb),
                                bb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                            ),
                        ] {
                            let y = gemv_heads(level, &x, e, off, hs, si, sj, h, rows, k, n);
                            assert_eq!(y.len(), h * rows * n);
                            for hh in 0..h {
                                let dense: Vec<f32> = (0..k * n)
                                    .map(|t| q[off + hh * hs + (t / n) * si + (t % n) * sj])
                                    .collect();
                                let want =
                                    reference(&x[hh * rows * k..][..rows * k], &dense, rows, k, n);
                                close(
                                    &y[hh * rows * n..][..rows * n],
                                    &want,
                                    k,
                                    &format!(
                                        "{level} {name} h {h} rows {rows} k {k} n {n} head {hh} \
                                         interleaved {interleaved} input-major {input_major}"
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        // nothing to do: zeros of the output's size
        let y = gemv_heads(
            Level::Scalar,
            &[],
            Elems::F32(&[0.0; 8]),
            0,
            4,
            1,
            2,
            2,
            0,
            2,
            2,
        );
        assert!(y.is_empty());
        let y = gemv_heads(
            Level::Scalar,
            &[],
            Elems::F32(&[0.0; 8]),
            0,
            4,
            1,
            2,
            2,
            1,
            0,
            2,
        );
        assert_eq!(y, vec![0.0; 4]);
    }

    #[test]
    fn by_hand() {
        // [1 2] · [[1 0 2], [3 1 0]] = [7 2 2]
        let y = gemv_rows(
            Level::Scalar,
            &[1.0, 2.0],
            Elems::F32(&[1.0, 0.0, 2.0, 3.0, 1.0, 0.0]),
            1,
            2,
            3,
        );
        assert_eq!(y, vec![7.0, 2.0, 2.0]);
        // no input rows: no outputs, at every level
        for level in Level::available() {
            let y = gemv_rows(level, &[], Elems::F32(&[1.0; 6]), 0, 2, 3);
            assert!(y.is_empty(), "{level}");
        }
    }

    /// [`gemv_heads`] at V2-Lite's absorbed shapes (`wkv_b` `[512, 16·256]`, one input row per
    /// head): W_UK (output-major) and W_UV (input-major) from memory (a 64 MiB buffer read
    /// between calls), against the per-head loop it replaced, two other layouts of `wkv_b` (each
    /// row's K parts before its V parts; PyTorch's `[out, in]`, where each head's parts are
    /// contiguous) and one contiguous product of the same bytes; best of 7 (`--ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn heads_timings() {
        use std::time::Instant;
        let level = Level::current();
        let (dc, h, dn, dv) = (512, 16, 128, 128);
        let row = h * (dn + dv);
        let w = uniform(dc * row, 1);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let x = uniform(h * dc, 2);
        let flush = vec![1u64; 8 << 20];
        let time = |f: &dyn Fn()| {
            (0..7)
                .map(|_| {
                    std::hint::black_box(flush.iter().sum::<u64>());
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        for (name, e) in [("f32", Elems::F32(&w)), ("f16", Elems::F16(&wh))] {
            // W_UK: [h, dn, dc], strides [dn + dv, 1, row]; W_UV: [h, dc, dv] at dn, strides
            // [dn + dv, row, 1]
            let uk = time(&|| {
                drop(gemv_heads(
                    level,
                    &x[..h * dn],
                    e,
                    0,
                    dn + dv,
                    1,
                    row,
                    h,
                    1,
                    dn,
                    dc,
                ))
            });
            let uv = time(&|| drop(gemv_heads(level, &x, e, dn, dn + dv, row, 1, h, 1, dc, dv)));
            // the same products if each row held all heads' K parts, then all V parts (a layout
            // dsopt does not use), and a contiguous matrix of one product's bytes
            let uk_s = time(&|| {
                drop(gemv_heads(
                    level,
                    &x[..h * dn],
                    e,
                    0,
                    dn,
                    1,
                    row,
                    h,
                    1,
                    dn,
                    dc,
                ))
            });
            let uv_s = time(&|| drop(gemv_heads(level, &x, e, h * dn, dv, row, 1, h, 1, dc, dv)));
            // PyTorch's [out, in] layout of wkv_b ([h·(dn + dv), dc]): W_UK input-major, W_UV
            // output-major, each head's parts contiguous
            let uk_t = time(&|| {
                drop(gemv_heads(
                    level,
                    &x[..h * dn],
                    e,
                    0,
                    (dn + dv) * dc,
                    dc,
                    1,
                    h,
                    1,
                    dn,
                    dc,
                ))
            });
            let uv_t = time(&|| {
                drop(gemv_heads(
                    level,
                    &x,
                    e,
                    dn * dc,
                    (dn + dv) * dc,
                    1,
                    dc,
                    h,
                    1,
                    dc,
                    dv,
                ))
            });
            let half = e.sub(0, dc * h * dv);
            let flat = time(&|| {
                drop(gemv_strided(
                    level,
                    &x[..dc],
                    half,
                    0,
                    h * dv,
                    1,
                    dc,
                    h * dv,
                ))
            });
            let uk_old = time(&|| {
                for hh in 0..h {
                    let xh = &x[hh * dn..(hh + 1) * dn];
                    drop(gemv_out_in(level, xh, e, hh * (dn + dv), row, 1, dn, dc));
                }
            });
            let uv_old = time(&|| {
                for hh in 0..h {
                    let xh = &x[hh * dc..(hh + 1) * dc];
                    drop(gemv_strided(
                        level,
                        xh,
                        e,
                        dn + hh * (dn + dv),
                        row,
                        1,
                        dc,
                        dv,
                    ));
                }
            });
            println!(
                "{name} {level}: W_UK heads {uk:.3} ms (per head {uk_old:.3}), W_UV heads {uv:.3} ms (per head {uv_old:.3}); \
                 K and V parts split: W_UK {uk_s:.3}, W_UV {uv_s:.3}; [out, in]: W_UK {uk_t:.3}, W_UV {uv_t:.3}; \
                 contiguous, same bytes {flat:.3} ms"
            );
        }
    }

    /// Cold single products with and without the block path's prefetching, alternated in one
    /// process (`--ignored --nocapture`): the shapes of the benchmarks' narrow weights.
    #[test]
    #[ignore]
    fn prefetch_timings() {
        use std::sync::atomic::Ordering::Relaxed;
        let level = Level::current();
        // (rows, k, n, bf16?)
        let shapes = [
            (1, 2048, 2048, false),
            (8, 2048, 2048, false),
            (1, 2048, 512, false),
            (1, 2048, 576, false),
            (1, 2048, 1024, false),
            (1, 2048, 2048, true),
            (8, 2048, 512, false),
            (2, 256, 512, false),
            (8, 28928, 512, false),
            (1, 512, 2048, true),
        ];
        for (rows, k, n, half) in shapes {
            // copies enough for 256 MiB, so that every call reads from memory
            let bytes = k * n * if half { 2 } else { 4 };
            let copies = ((256usize << 20) / bytes).max(4);
            let w: Vec<Vec<f32>> = (0..copies).map(|c| uniform(k * n, c as u64)).collect();
            let wb: Vec<Vec<bf16>> = if half {
                w.iter()
                    .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
                    .collect()
            } else {
                Vec::new()
            };
            let x = uniform(rows * k, 7);
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for rep in 0..copies {
                for (flag, out) in [(false, &mut on), (true, &mut off)] {
                    PREFETCH_OFF.store(flag, Relaxed);
                    let c = (2 * rep + flag as usize) % copies;
                    let e = if half {
                        Elems::Bf16(&wb[c])
                    } else {
                        Elems::F32(&w[c])
                    };
                    let t0 = std::time::Instant::now();
                    std::hint::black_box(gemv_rows(level, &x, e, rows, k, n));
                    out.push(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
                }
            }
            PREFETCH_OFF.store(false, Relaxed);
            let med = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "{rows} x [{k}, {n}] {}: prefetch {:.1} GB/s, none {:.1} GB/s ({copies} calls each)",
                if half { "bf16" } else { "f32" },
                med(on),
                med(off)
            );
        }
    }
}
