//! 线性层的前向：解码时只有几行输入乘一个大权重（矩阵-向量积），在 CPU 后端上走一条流式读取
//! 权重的快速路径（f32 与 f16 权重，f32 累加）；其余情况（预填充、GPU 后端、bf16、有偏置）仍用
//! Burn 的 `Linear::forward`。
//!
//! Why: a decode step multiplies one row per sequence by every weight matrix, so it is bound by
//! how fast the weights stream from memory. burn-flex hands such a product to the `gemm` crate,
//! which reached about 31 GB/s here on cold weights (2048 x 2048, f32) against a measured 50 GB/s
//! streaming read: its GEMM blocking is built for large products. Here each thread streams a
//! contiguous band of weight rows once and accumulates `y += x[k] · W[k, :]` into a partial
//! output that stays in L1/L2 (a column tile at a time); the partial outputs are summed at the end.
//! The result equals the GEMM's up to the order of summation (tests compare with a tolerance).

use burn::backend::flex::{FlexTensor, Layout};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, f16, Bytes, DType, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::flex::{from_flex, into_flex};

/// Inputs with at most this many rows (batch x tokens) take the streaming path: decode steps and
/// speculative verify steps; prefill chunks are GEMMs and keep the GEMM.
pub const MAX_STREAM_ROWS: usize = 16;

/// Output columns accumulated at a time (8 KiB of f32 per input row: stays in L1).
const COL_TILE: usize = 2048;

/// `lin.forward(x)`, with the streaming path where it applies.
///
/// # Shapes
/// `x: [..., d_in] -> [..., d_out]`
pub fn forward<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let dtype = x.dtype();
    if rows == 0
        || rows > MAX_STREAM_ROWS
        || lin.bias.is_some()
        || !matches!(dtype, DType::F32 | DType::F16)
    {
        return lin.forward(x);
    }
    match stream::<B, D>(&lin.weight.val(), x) {
        Ok(y) => y,
        Err(x) => lin.forward(x),
    }
}

/// A weight matrix as the streaming product reads it.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// f32, row-major `[k, n]`.
    F32(&'a [f32]),
    /// f16, row-major `[k, n]`: each row tile is widened to f32 in L1 (F16C where the CPU has
    /// it), so memory carries half the bytes.
    F16(&'a [f16]),
}

/// The streaming product on flex; `x` back when it does not apply (another backend, a weight
/// that is not a plain contiguous matrix of the input's dtype).
fn stream<B: Backend, const D: usize>(
    weight: &Tensor<B, 2>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let dims = x.dims();
    let [k, n] = weight.dims();
    let w = match into_flex(weight.clone()) {
        Ok(w) => w,
        Err(_) => return Err(x),
    };
    let xf = into_flex(x)?;
    let dtype = xf.dtype();
    let plain = w.dtype() == dtype
        && w.layout().is_contiguous()
        && w.layout().start_offset() == 0
        && dims[D - 1] == k;
    if !plain {
        return Err(from_flex(xf));
    }
    let xf = xf.to_contiguous();
    let rows = dims[..D - 1].iter().product::<usize>();
    let off = xf.layout().start_offset();
    let mut out = dims.to_vec();
    out[D - 1] = n;
    let layout = Layout::contiguous(Shape::from(out));
    let t = match dtype {
        DType::F32 => {
            let xs = &xf.storage::<f32>()[off..off + rows * k];
            let y = gemv_rows(xs, Weights::F32(&w.storage::<f32>()[..k * n]), rows, k, n);
            FlexTensor::new(Bytes::from_elems(y), layout, DType::F32)
        }
        DType::F16 => {
            let mut xs = vec![0.0f32; rows * k];
            xf.storage::<f16>()[off..off + rows * k].convert_to_f32_slice(&mut xs);
            let y = gemv_rows(&xs, Weights::F16(&w.storage::<f16>()[..k * n]), rows, k, n);
            let mut yh = vec![f16::ZERO; y.len()];
            yh.convert_from_f32_slice(&y);
            FlexTensor::new(Bytes::from_elems(yh), layout, DType::F16)
        }
        _ => return Err(from_flex(xf)),
    };
    Ok(from_flex(t))
}

/// `y[r, :] = Σ_k x[r, k] · w[k, :]` for `rows` input rows, accumulated in f32: the weight rows
/// are split into one contiguous band per thread, each band streamed once; partial outputs
/// summed.
pub fn gemv_rows(x: &[f32], w: Weights<'_>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k);
    let wlen = match w {
        Weights::F32(w) => w.len(),
        Weights::F16(w) => w.len(),
    };
    assert_eq!(wlen, k * n);
    // at least 64 weight rows per band; no more bands than threads
    let bands = rayon::current_num_threads().min(k / 64).max(1);
    let band = k.div_ceil(bands);
    let partials: Vec<Vec<f32>> = (0..bands)
        .into_par_iter()
        .map(|b| {
            let (k0, k1) = (b * band, ((b + 1) * band).min(k));
            let mut y = vec![0.0f32; rows * n];
            accumulate(&mut y, x, w, rows, k, n, k0, k1);
            y
        })
        .collect();
    let mut it = partials.into_iter();
    let mut y = it.next().unwrap_or_else(|| vec![0.0; rows * n]);
    for p in it {
        for (a, b) in y.iter_mut().zip(&p) {
            *a += *b;
        }
    }
    y
}

/// `y += x[:, k0..k1] · w[k0..k1, :]`: f32 weights on a CPU with AVX2 + FMA go through the
/// register kernel ([`x86::accumulate_regs`]) for all but the last `n % 16` columns; everything
/// else (f16 weights, other CPUs, those last columns) through [`accumulate_body`], a column tile
/// at a time.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    y: &mut [f32],
    x: &[f32],
    w: Weights<'_>,
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let mut first = 0;
            if let Weights::F32(wf) = w {
                first = n - n % x86::COLS;
                // SAFETY: the CPU has AVX2 and FMA (checked just above); the slices have the
                // lengths `gemv_rows` asserts (x: rows·k, w: k·n, y: rows·n)
                unsafe { x86::accumulate_regs(y, x, wf, rows, k, n, k0, k1) };
            }
            if first < n {
                // SAFETY: as above
                unsafe { accumulate_avx2(y, x, w, rows, k, n, k0, k1, first) };
            }
            return;
        }
    }
    accumulate_body(y, x, w, rows, k, n, k0, k1, 0);
}

/// [`accumulate_body`] (columns `first..n`) compiled with AVX2 + FMA (the build's baseline is
/// SSE2 only).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_avx2(
    y: &mut [f32],
    x: &[f32],
    w: Weights<'_>,
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    first: usize,
) {
    accumulate_body(y, x, w, rows, k, n, k0, k1, first);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_body(
    y: &mut [f32],
    x: &[f32],
    w: Weights<'_>,
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    first: usize,
) {
    let mut wide = [0.0f32; COL_TILE];
    let mut c0 = first;
    while c0 < n {
        let c1 = (c0 + COL_TILE).min(n);
        for kk in k0..k1 {
            let wrow: &[f32] = match w {
                Weights::F32(w) => &w[kk * n + c0..kk * n + c1],
                Weights::F16(w) => {
                    let dst = &mut wide[..c1 - c0];
                    w[kk * n + c0..kk * n + c1].convert_to_f32_slice(dst);
                    dst
                }
            };
            for r in 0..rows {
                let a = x[r * k + kk];
                let yr = &mut y[r * n + c0..r * n + c1];
                // multiply then add (not mul_add: without FMA hardware that is a libm call)
                for (o, v) in yr.iter_mut().zip(wrow) {
                    *o += a * *v;
                }
            }
        }
        c0 = c1;
    }
}

/// The register kernel for f32 weights (x86 with AVX2 + FMA).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86 {
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Output columns per block: two 8-float registers.
    pub const COLS: usize = 16;
    /// Input rows per group: 6 rows x 2 registers of accumulators + 2 weight registers + 1
    /// broadcast = 15 of the 16 AVX2 registers (the shape of `gemm`'s own f32 micro-kernel).
    const ROWS: usize = 6;
    /// Weight rows per pass over the columns: 8 concurrent streams of consecutive 64-byte pieces
    /// (one per weight row), which the hardware prefetchers follow. Measured (2-core EPYC, one
    /// row, 2048 x 6144 f32 weights from memory): 8 rows 1.2 ms, 16 rows 1.8 ms, 32 rows 2.7 ms,
    /// the whole band at once 5.5 ms (one stream per weight row: no prefetch at all) against the
    /// streaming loop's 1.5-1.9 ms; with 8 input rows 2.4-2.5 / 3.7-3.9 / 4.0-4.4 / 10.8 ms
    /// against 6.1-6.7 ms. The output block is added into `y` once per pass (1/8 of a load and
    /// a store per multiply-add).
    const K_BLOCK: usize = 8;

    /// `y[:, c] += x[:, k0..k1] · w[k0..k1, c]` for the columns `c < n - n % 16`.
    ///
    /// The streaming loop ([`super::accumulate_body`]) adds each weight row into `rows` output
    /// tiles of 2048 floats: a load and a store of `y` per multiply-add, out of L2 once the tiles
    /// of 8 rows outgrow L1. Here, for [`K_BLOCK`] weight rows at a time, a block of 16 columns
    /// of up to 6 input rows is accumulated in registers (weights read as 64-byte pieces,
    /// inputs broadcast one at a time) and added into `y`; the row groups of one column block
    /// run back to back, so the block's weights are re-read from L1.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x.len() >= rows·k`, `w.len() >= k·n`, `y.len() >= rows·n`,
    /// `k1 <= k`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_regs(
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        k0: usize,
        k1: usize,
    ) {
        assert!(x.len() >= rows * k && w.len() >= k * n && y.len() >= rows * n && k1 <= k);
        let mut kb = k0;
        while kb < k1 {
            let ke = (kb + K_BLOCK).min(k1);
            let mut c = 0;
            while c + COLS <= n {
                let mut r0 = 0;
                while r0 < rows {
                    let g = (rows - r0).min(ROWS);
                    // SAFETY (all six): the caller's guarantees; every index is below the
                    // asserted lengths (r0 + g <= rows, c + 16 <= n, kk < ke <= k1 <= k)
                    unsafe {
                        match g {
                            6 => group::<6>(y, x, w, r0, k, n, kb, ke, c),
                            5 => group::<5>(y, x, w, r0, k, n, kb, ke, c),
                            4 => group::<4>(y, x, w, r0, k, n, kb, ke, c),
                            3 => group::<3>(y, x, w, r0, k, n, kb, ke, c),
                            2 => group::<2>(y, x, w, r0, k, n, kb, ke, c),
                            _ => group::<1>(y, x, w, r0, k, n, kb, ke, c),
                        }
                    }
                    r0 += g;
                }
                c += COLS;
            }
            kb = ke;
        }
    }

    /// Rows `r0..r0+R`, columns `c..c+16`, weight rows `k0..k1`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<const R: usize>(
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        r0: usize,
        k: usize,
        n: usize,
        k0: usize,
        k1: usize,
        c: usize,
    ) {
        // SAFETY: see `accumulate_regs` (indices in bounds; unaligned loads and stores)
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let xp = x.as_ptr().add(r0 * k);
            let mut wp = w.as_ptr().add(k0 * n + c);
            for kk in k0..k1 {
                let w0 = _mm256_loadu_ps(wp);
                let w1 = _mm256_loadu_ps(wp.add(8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(r * k + kk));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
                wp = wp.add(n);
            }
            for (r, a) in acc.iter().enumerate() {
                let yp = y.as_mut_ptr().add((r0 + r) * n + c);
                _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), a[0]));
                _mm256_storeu_ps(yp.add(8), _mm256_add_ps(_mm256_loadu_ps(yp.add(8)), a[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use burn::backend::Flex;
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn streaming_equals_the_gemm_for_every_row_count_and_odd_sizes() {
        let dev = Default::default();
        // n = 48: whole 16-column blocks; 2100 and 3000: a tail for the streaming loop; 7: only
        // the tail
        for (k, n) in [(64, 48), (300, 2100), (2048, 3000), (33, 7)] {
            let lin = LinearConfig::new(k, n).with_bias(false).init::<B>(&dev);
            // every row-group size of the register kernel (6, 5, .., 1) and several groups
            for rows in [1, 2, 3, 4, 5, 6, 7, 8, 13, 16] {
                let x = Tensor::<B, 3>::from_data(
                    TensorData::new(uniform(rows * k, rows as u64), [1, rows, k]),
                    &dev,
                );
                let want = lin.forward(x.clone());
                let got = forward(&lin, x);
                assert_eq!(got.dims(), want.dims());
                let scale: f32 = want.clone().abs().max().into_scalar();
                let d: f32 = (got - want).abs().max().into_scalar();
                assert!(d <= 1e-5 * scale.max(1.0), "k {k} n {n} rows {rows}: {d}");
            }
        }
    }

    #[test]
    fn f16_weights_stream_and_agree_with_the_gemm() {
        let dev = Default::default();
        let (k, n) = (512, 300);
        let w = Tensor::<B, 2>::from_data(TensorData::new(uniform(k * n, 5), [k, n]), &dev);
        let lin = Linear {
            weight: burn::module::Param::from_tensor(w.cast(DType::F16)),
            bias: None,
        };
        let x = Tensor::<B, 3>::from_data(TensorData::new(uniform(2 * k, 6), [1, 2, k]), &dev)
            .cast(DType::F16);
        let got = forward(&lin, x.clone());
        assert_eq!(got.dtype(), DType::F16);
        let want = lin.forward(x).cast(DType::F32);
        let scale: f32 = want.clone().abs().max().into_scalar();
        let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
        // both accumulate in f32 and round the result to f16: a few f16 ulps of the largest value
        assert!(d <= 4.0 * 2f32.powi(-10) * scale, "{d} vs scale {scale}");
    }

    #[test]
    fn many_rows_half_precision_and_biases_keep_burns_path() {
        let dev = Default::default();
        let lin = LinearConfig::new(8, 4).with_bias(true).init::<B>(&dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(8, 1), [1, 8]), &dev);
        let d: f32 = (forward(&lin, x.clone()) - lin.forward(x))
            .abs()
            .max()
            .into_scalar();
        assert_eq!(d, 0.0, "bias: Burn's own path, bit for bit");
        let lin = LinearConfig::new(8, 4).with_bias(false).init::<B>(&dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(8 * 17, 2), [17, 8]), &dev);
        let d: f32 = (forward(&lin, x.clone()) - lin.forward(x))
            .abs()
            .max()
            .into_scalar();
        assert_eq!(d, 0.0, "17 rows: a GEMM, Burn's own path");
    }

    #[test]
    fn gemv_rows_by_hand() {
        // x = [[1, 2]], w = [[1, 0, 2], [3, 1, 0]] -> [7, 2, 2]
        let w = [1.0, 0.0, 2.0, 3.0, 1.0, 0.0];
        let y = gemv_rows(&[1.0, 2.0], Weights::F32(&w), 1, 2, 3);
        assert_eq!(y, [7.0, 2.0, 2.0]);
        let wh: Vec<f16> = w.iter().map(|x| f16::from_f32(*x)).collect();
        let y = gemv_rows(&[1.0, 2.0], Weights::F16(&wh), 1, 2, 3);
        assert_eq!(y, [7.0, 2.0, 2.0]);
    }
}
