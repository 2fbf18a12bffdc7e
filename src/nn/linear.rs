//! 线性层的前向：解码时只有几行输入乘一个大权重（矩阵-向量积），在 CPU 后端上交给内核模块的
//! 流式矩阵-向量积（[`crate::kernels::gemv`]，f32、f16、bf16 权重按存储读取，f32 累加）；半精度的
//! 预填充交给分块加宽的矩阵乘（[`crate::kernels::panel`]）；其余情况（f32 预填充、GPU 后端、
//! 有偏置）仍用 Burn 的 `Linear::forward`。
//!
//! Why: a decode step is bound by how fast the weights stream from memory; burn-flex's GEMM is
//! built for large products and, in bf16, widens the whole weight to f32 on every call (see the
//! kernel's notes). This file only takes the slices out of the flex tensors and puts the result
//! back.

use burn::backend::flex::{FlexTensor, Layout};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor};

use super::flex::{self, from_flex, into_flex};
use rayon::prelude::*;

use crate::kernels::{convert, gemv, panel, Level};

/// Inputs with at most this many rows (batch x tokens) take the streaming path: decode steps and
/// speculative verify steps. Prefill chunks are GEMMs: in f32 burn-flex's, in half precision the
/// kernel module's panel product (weights widened panel by panel, [`crate::kernels::panel`]).
pub const MAX_STREAM_ROWS: usize = 16;

/// `lin.forward(x)`, with the streaming path where it applies.
///
/// # Shapes
/// `x: [..., d_in] -> [..., d_out]`
pub fn forward<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let dtype = x.dtype();
    // f32 prefill chunks keep burn-flex's GEMM; half-precision ones take the panel product
    let many = rows > MAX_STREAM_ROWS;
    if rows == 0
        || (many && dtype == DType::F32)
        || lin.bias.is_some()
        || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    {
        return lin.forward(x);
    }
    match stream::<B, D>(&lin.weight.val(), x) {
        Ok(y) => y,
        Err(x) => lin.forward(x),
    }
}

/// The streaming product (few rows) or the panel product (many, half precision) on flex; `x` back
/// when it does not apply (another backend, a weight that is not a plain contiguous matrix of
/// the input's dtype).
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
    let level = Level::current();
    let xs = convert::to_f32(level, flex::elems(&xf, off, rows * k));
    let ws = match dtype {
        DType::F32 | DType::F16 | DType::BF16 => flex::elems(&w, 0, k * n),
        _ => return Err(from_flex(xf)),
    };
    let y = if rows > MAX_STREAM_ROWS {
        panel::matmul(level, &xs, ws, rows, k, n)
    } else {
        gemv::gemv_rows(level, &xs, ws, rows, k, n)
    };
    Ok(from_flex(flex::from_f32(y, Shape::from(out), dtype)))
}

/// `x.matmul(w)` for few rows per batch entry (`x: [h, rows, k]`, `w: [h, k, n]`: absorbed MLA's
/// per-head products with W_UK and W_UV), through the kernel module's products on flex where `w`'s
/// rows or columns are contiguous (W_UK is a permuted view of `wkv_b`, output-major per head;
/// W_UV a strided one, input-major): no copy of the weight, half precision read as stored.
/// Many rows in half precision (a prefill chunk): one panel product per head, each head widened
/// on its own. Burn's matmul elsewhere (many rows in f32, another backend, other layouts).
///
/// # Shapes
/// `x: [h, rows, k], w: [h, k, n] -> [h, rows, n]`
pub fn matmul_few<B: Backend>(x: Tensor<B, 3>, w: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [h, rows, k] = x.dims();
    let n = w.dims()[2];
    let many = rows > MAX_STREAM_ROWS;
    if rows == 0 || (many && x.dtype() == DType::F32) || w.dims()[..2] != [h, k] {
        return x.matmul(w.clone());
    }
    let wf = match into_flex(w.clone()) {
        Ok(f) => f,
        Err(_) => return x.matmul(w.clone()),
    };
    let xf = match into_flex(x) {
        Ok(f) => f,
        Err(x) => return x.matmul(w.clone()),
    };
    let dtype = xf.dtype();
    let st = wf.layout().strides().to_vec();
    let fits = wf.dtype() == dtype
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && st.iter().all(|&s| s >= 0)
        && (st[2] == 1 || st[1] == 1);
    if !fits {
        return from_flex::<B, 3>(xf).matmul(w.clone());
    }
    let level = Level::current();
    let xf = xf.to_contiguous();
    let xo = xf.layout().start_offset();
    let all = flex::elems(&wf, 0, wf.bytes().len() / dtype.size());
    let (sh, sk, sn) = (st[0] as usize, st[1] as usize, st[2] as usize);
    if many {
        let x = flex::elems(&xf, xo, h * rows * k);
        let w0 = wf.layout().start_offset();
        let head = |hh: usize| {
            let base = w0 + hh * sh;
            per_head_panel(
                level,
                x.sub(hh * rows * k, rows * k),
                rows,
                all,
                base,
                sk,
                sn,
                k,
                n,
            )
        };
        // heads on the pool (each also splits its own product), each rounded into its place
        let per = rows * n;
        let bytes = if dtype == DType::F16 {
            let mut out = vec![burn::tensor::f16::ZERO; h * per];
            by_heads(&mut out, per, head, |y, o| {
                convert::narrow(level, y, convert::Stored::F16(o))
            });
            Bytes::from_elems(out)
        } else {
            let mut out = vec![burn::tensor::bf16::ZERO; h * per];
            by_heads(&mut out, per, head, |y, o| {
                convert::narrow(level, y, convert::Stored::Bf16(o))
            });
            Bytes::from_elems(out)
        };
        let layout = Layout::contiguous(Shape::from([h, rows, n]));
        return from_flex(FlexTensor::new(bytes, layout, dtype));
    }
    // every head in one pass over the stored rows (W_UK and W_UV keep the heads side by side in
    // each row of `wkv_b`)
    let x32 = convert::to_f32(level, flex::elems(&xf, xo, h * rows * k));
    let off = wf.layout().start_offset();
    let y = gemv::gemv_heads(level, &x32, all, off, sh, sk, sn, h, rows, k, n);
    from_flex(flex::from_f32(y, Shape::from([h, rows, n]), dtype))
}

/// `out` in heads of `per` elements, head `i` from `narrow(&head(i), ..)`, on the pool; at most as
/// many heads in flight as the pool has threads (a thread waiting inside one head's product
/// would otherwise start another, and every started head's f32 copies would be live at once).
fn by_heads<T: Send>(
    out: &mut [T],
    per: usize,
    head: impl Fn(usize) -> Vec<f32> + Sync,
    narrow: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let group = rayon::current_num_threads().max(1);
    for (g, og) in out.chunks_mut((per * group).max(1)).enumerate() {
        og.par_chunks_mut(per.max(1))
            .enumerate()
            .for_each(|(i, o)| narrow(&head(g * group + i), o));
    }
}

/// One head of [`matmul_few`] with many rows in half precision: its `rows` rows and its weight
/// (`k x n` at `base`, row stride `sk`, column stride `sn`; one of them 1) widened on their own,
/// one panel product: no f32 copy of the whole input, weight or output (Burn's bf16 matmul
/// widens all three: in absorbed MLA's bf16 prefill that was the chunk's memory peak).
#[allow(clippy::too_many_arguments)]
fn per_head_panel(
    level: Level,
    x: convert::Elems<'_>,
    rows: usize,
    w: convert::Elems<'_>,
    base: usize,
    sk: usize,
    sn: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let x32 = convert::to_f32(level, x);
    let mut w32 = vec![0f32; k * n];
    if sn == 1 {
        for (i, row) in w32.chunks_mut(n).enumerate() {
            convert::widen(level, w.sub(base + i * sk, n), row);
        }
    } else {
        let mut col = vec![0f32; k];
        for j in 0..n {
            convert::widen(level, w.sub(base + j * sn, k), &mut col);
            for (i, v) in col.iter().enumerate() {
                w32[i * n + j] = *v;
            }
        }
    }
    panel::matmul(level, &x32, convert::Elems::F32(&w32), rows, k, n)
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
    fn biases_and_f32_prefill_rows_keep_burns_path() {
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
    fn per_head_products_on_weight_views_equal_burns_matmul() {
        let dev = Default::default();
        let (h, k, n) = (3, 40, 24);
        // W_UK-like: a permuted view ([n, h, k] -> [h, k, n], output-major per head) and
        // W_UV-like: a swapped view ([k, h, n] -> [h, k, n], input-major at a stride)
        let a = Tensor::<B, 3>::from_data(TensorData::new(uniform(n * h * k, 11), [n, h, k]), &dev)
            .permute([1, 2, 0]);
        let c = Tensor::<B, 3>::from_data(TensorData::new(uniform(k * h * n, 12), [k, h, n]), &dev)
            .swap_dims(0, 1);
        // 5 rows: the streaming products; 40: one panel product per head (half precision)
        for (w, rows) in [(a.clone(), 5), (c.clone(), 5), (a, 40), (c, 40)] {
            let x = Tensor::<B, 3>::from_data(
                TensorData::new(uniform(h * rows * k, 13), [h, rows, k]),
                &dev,
            );
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let (xd, wd) = (x.clone().cast(dt), w.clone().cast(dt));
                let got = matmul_few(xd.clone(), &wd);
                assert_eq!(got.dtype(), dt);
                // Burn's product in f32 of the stored values (Burn's own f16 product accumulates
                // in f16 on aarch64: gemm's NEON f16 kernels)
                let want = xd.cast(DType::F32).matmul(wd.cast(DType::F32));
                let scale: f32 = want.clone().abs().max().into_scalar();
                let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
                let tol = match dt {
                    DType::F32 => 1e-5,
                    DType::F16 => 4.0 * 2f32.powi(-10),
                    _ => 2.0 * 2f32.powi(-7),
                };
                assert!(d <= tol * scale, "{dt:?} rows {rows}: {d} vs scale {scale}");
            }
        }
    }

    #[test]
    fn half_precision_weights_agree_with_the_gemm_for_decode_and_prefill_rows() {
        let dev = Default::default();
        let (k, n) = (300, 517);
        let w = Tensor::<B, 2>::from_data(TensorData::new(uniform(k * n, 7), [k, n]), &dev);
        // dsopt accumulates in f32 and rounds the result to the dtype: a few ulps of the largest
        // from Burn's f32 product of the stored values (not Burn's own half-precision product:
        // on aarch64 gemm's NEON f16 kernels accumulate in f16, ~20x further from the exact sums)
        for (dt, tol) in [
            (DType::F16, 4.0 * 2f32.powi(-10)),
            (DType::BF16, 2.0 * 2f32.powi(-7)),
        ] {
            let lin = Linear {
                weight: burn::module::Param::from_tensor(w.clone().cast(dt)),
                bias: None,
            };
            let lin32 = Linear {
                weight: burn::module::Param::from_tensor(w.clone().cast(dt).cast(DType::F32)),
                bias: None,
            };
            // 3 rows: the streaming product; 40: the panel product
            for rows in [3, 40] {
                let x = Tensor::<B, 3>::from_data(
                    TensorData::new(uniform(rows * k, 8), [1, rows, k]),
                    &dev,
                )
                .cast(dt);
                let got = forward(&lin, x.clone());
                assert_eq!(got.dtype(), dt);
                let want = lin32.forward(x.cast(DType::F32));
                let scale: f32 = want.clone().abs().max().into_scalar();
                let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
                assert!(d <= tol * scale, "{dt:?} rows {rows}: {d} vs scale {scale}");
            }
        }
    }
}
