//! Rotary position embedding, interleaved pairs (DeepSeek's `view_as_complex` convention).
//!
//! The angles are computed on the host for the positions a call needs, so no table that grows
//! with the maximum sequence length is kept on the device (it would distort memory figures).
//! The last table computed is kept (host, one entry): every layer of one forward rotates the
//! same positions, so the angles are computed once per forward, not once per layer and tensor.
//! On burn-flex (f32) the rotation is one pass over the input's strided view into a contiguous
//! output; the portable tensor-op path (six strided element-wise ops, a stack) measured 26 % of
//! the CPU time of `dsopt bench mtp` (perf, flex) before this pass existed.

use std::cell::RefCell;
use std::rc::Rc;

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor, TensorData};

use super::flex::{from_flex, into_flex};

/// cos and sin of every (row, position, pair): row `r` covers `rows[r]..rows[r]+len`.
struct Table {
    rows: Vec<usize>,
    len: usize,
    d: usize,
    theta: u64,
    cos: Rc<Vec<f32>>,
    sin: Rc<Vec<f32>>,
}

thread_local! {
    static LAST: RefCell<Option<Table>> = const { RefCell::new(None) };
}

/// The cos and sin tables (`[rows.len(), len, d/2]`, row-major) for `rows`, reused when the
/// previous call asked for the same positions.
fn host_tables(rows: &[usize], len: usize, d: usize, theta: f64) -> (Rc<Vec<f32>>, Rc<Vec<f32>>) {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(t) = last.as_ref() {
            if t.rows == rows && t.len == len && t.d == d && t.theta == theta.to_bits() {
                return (t.cos.clone(), t.sin.clone());
            }
        }
        let half = d / 2;
        let mut cos = Vec::with_capacity(rows.len() * len * half);
        let mut sin = Vec::with_capacity(rows.len() * len * half);
        // frequency of pair i: theta^(-2i/d)
        let freqs: Vec<f64> = (0..half)
            .map(|i| theta.powf(-(2.0 * i as f64) / d as f64))
            .collect();
        for &start in rows {
            for p in start..start + len {
                for &freq in &freqs {
                    let a = p as f64 * freq;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let (cos, sin) = (Rc::new(cos), Rc::new(sin));
        *last = Some(Table {
            rows: rows.to_vec(),
            len,
            d,
            theta: theta.to_bits(),
            cos: cos.clone(),
            sin: sin.clone(),
        });
        (cos, sin)
    })
}

/// cos and sin tables `[n, len, d/2]`: row `i` holds positions `starts[i]..starts[i]+len`.
fn tables_multi<B: Backend>(
    starts: &[usize],
    len: usize,
    d: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let half = d / 2;
    let n = starts.len();
    let (cos, sin) = host_tables(starts, len, d, theta);
    (
        Tensor::from_data(TensorData::new(cos.to_vec(), [n, len, half]), device),
        Tensor::from_data(TensorData::new(sin.to_vec(), [n, len, half]), device),
    )
}

/// The one start shared by every sequence, if they all start at the same position.
pub fn uniform(starts: &[usize]) -> Option<usize> {
    let first = *starts.first()?;
    starts.iter().all(|&s| s == first).then_some(first)
}

/// Rotates `x` `[b, h, len, d]`; sequence `i` of the batch sits at positions
/// `starts[i]..starts[i]+len` (one entry per sequence; all equal in plain prefill/decode,
/// different in batched speculative decoding where each sequence keeps its own length).
///
/// # Shapes
/// - x: `[b, h, len, d]`, d even; pairs are (x[2i], x[2i+1]).
pub fn apply4<B: Backend>(x: Tensor<B, 4>, starts: &[usize], theta: f64) -> Tensor<B, 4> {
    apply4_scaled(x, starts, theta, 1.0)
}

/// [`apply4`] times `scale` (the softmax scale folded into the query rotation).
pub fn apply4_scaled<B: Backend>(
    x: Tensor<B, 4>,
    starts: &[usize],
    theta: f64,
    scale: f32,
) -> Tensor<B, 4> {
    let [b, _, _, d] = x.dims();
    assert_eq!(starts.len(), b, "one start position per sequence");
    assert!(d % 2 == 0, "RoPE needs an even head dimension");
    // one table row for all when the starts agree, else one per sequence
    let rows = match uniform(starts) {
        Some(s) => vec![s],
        None => starts.to_vec(),
    };
    match flex_rotate(x, &rows, theta, scale) {
        Ok(done) => done,
        Err(x) => portable(x, &rows, theta, scale),
    }
}

/// The tensor-op rotation (every backend; the reference the flex pass is tested against).
fn portable<B: Backend>(x: Tensor<B, 4>, rows: &[usize], theta: f64, scale: f32) -> Tensor<B, 4> {
    let [b, h, len, d] = x.dims();
    let half = d / 2;
    let (cos, sin) = tables_multi::<B>(rows, len, d, theta, &x.device());
    let nb = rows.len();
    let cos = cos.reshape([nb, 1, len, half]).expand([b, h, len, half]);
    let sin = sin.reshape([nb, 1, len, half]).expand([b, h, len, half]);
    let pairs = x.reshape([b, h, len, half, 2]);
    let x0 = pairs
        .clone()
        .slice([0..b, 0..h, 0..len, 0..half, 0..1])
        .reshape([b, h, len, half]);
    let x1 = pairs
        .slice([0..b, 0..h, 0..len, 0..half, 1..2])
        .reshape([b, h, len, half]);
    let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
    let r1 = x0 * sin + x1 * cos;
    let out = Tensor::stack::<5>(vec![r0, r1], 4).reshape([b, h, len, d]);
    if scale == 1.0 {
        out
    } else {
        out * scale
    }
}

/// The flex pass: reads `x` through its strides (any view whose pairs are adjacent) and writes
/// a contiguous `[b, h, len, d]`; computes `(x0·cos − x1·sin)·scale` and `(x0·sin + x1·cos)·scale`
/// in the same order as the tensor-op path. Gives `x` back when it does not apply (another
/// backend, not f32, pairs not adjacent).
fn flex_rotate<B: Backend>(
    x: Tensor<B, 4>,
    rows: &[usize],
    theta: f64,
    scale: f32,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, len, d] = x.dims();
    let xf = into_flex(x)?;
    let st = xf.layout().strides().to_vec();
    if xf.dtype() != DType::F32 || st[3] != 1 || st.iter().any(|&s| s < 0) {
        return Err(from_flex(xf));
    }
    let st: Vec<usize> = st.iter().map(|&s| s as usize).collect();
    let half = d / 2;
    let (cos, sin) = host_tables(rows, len, d, theta);
    let src: &[f32] = xf.storage();
    let off = xf.layout().start_offset();
    let mut out = vec![0f32; b * h * len * d];
    for (o, chunk) in out.chunks_exact_mut(d).enumerate() {
        let (bh, li) = (o / len, o % len);
        let (bi, hi) = (bh / h, bh % h);
        let r = if rows.len() == 1 { 0 } else { bi };
        let t = (r * len + li) * half;
        let (c, s) = (&cos[t..t + half], &sin[t..t + half]);
        let i0 = off + bi * st[0] + hi * st[1] + li * st[2];
        let xin = &src[i0..i0 + d];
        for i in 0..half {
            let (x0, x1) = (xin[2 * i], xin[2 * i + 1]);
            chunk[2 * i] = (x0 * c[i] - x1 * s[i]) * scale;
            chunk[2 * i + 1] = (x0 * s[i] + x1 * c[i]) * scale;
        }
    }
    let layout = Layout::contiguous(Shape::from([b, h, len, d]));
    Ok(from_flex(FlexTensor::new(
        Bytes::from_elems(out),
        layout,
        DType::F32,
    )))
}

/// `apply4` for `[b, len, d]` (one head, e.g. MLA's shared RoPE key).
pub fn apply<B: Backend>(x: Tensor<B, 3>, starts: &[usize], theta: f64) -> Tensor<B, 3> {
    let [b, len, d] = x.dims();
    apply4(x.reshape([b, 1, len, d]), starts, theta).reshape([b, len, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    #[test]
    fn rotates_pairs_by_position_times_frequency() {
        let dev = Default::default();
        // d = 4: pair 0 frequency 1, pair 1 frequency theta^-0.5 = 0.01 for theta = 10000
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 1.0, 0.0], [1, 1, 4]),
            &dev,
        );
        let y: Vec<f32> = apply(x, &[2], 10000.0).into_data().to_vec().unwrap();
        let expect = [2f32.cos(), 2f32.sin(), 0.02f32.cos(), 0.02f32.sin()];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn relative_position_property() {
        // <rope(q, m), rope(k, n)> depends only on m - n
        let dev = Default::default();
        let q = Tensor::<B, 3>::from_data(
            TensorData::new(vec![0.3f32, -1.2, 0.7, 0.5], [1, 1, 4]),
            &dev,
        );
        let k = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.1f32, 0.4, -0.2, 0.9], [1, 1, 4]),
            &dev,
        );
        let dot = |m, n| -> f32 {
            (apply(q.clone(), &[m], 100.0) * apply(k.clone(), &[n], 100.0))
                .sum()
                .into_scalar()
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-5);
        assert!((dot(5, 2) - dot(2, 5)).abs() > 1e-3);
    }

    #[test]
    fn flex_pass_equals_the_tensor_ops_on_strided_views() {
        let dev = Default::default();
        // [b, s, h, d] as the projections give it, viewed as [b, h, s, d] (strided), and a
        // column slice of it (MLA's RoPE part)
        let raw = Tensor::<B, 4>::from_data(
            TensorData::new(crate::rng::uniform(3 * 4 * 2 * 10, 5), [3, 4, 2, 10]),
            &dev,
        );
        let views = [
            raw.clone().slice([0..3, 0..4, 0..2, 0..8]).swap_dims(1, 2),
            raw.clone().slice([0..3, 0..4, 0..2, 4..10]).swap_dims(1, 2),
            raw.clone().slice([0..3, 0..4, 0..2, 0..8]),
        ];
        for (v, x) in views.into_iter().enumerate() {
            for (starts, rows) in [(vec![5, 5, 5], vec![5]), (vec![0, 9, 3], vec![0, 9, 3])] {
                for scale in [1.0f32, 0.125] {
                    let fast = apply4_scaled(x.clone(), &starts, 10000.0, scale);
                    let reference = portable(x.clone(), &rows, 10000.0, scale);
                    assert_eq!(fast.dims(), reference.dims());
                    let d: f32 = (fast - reference).abs().max().into_scalar();
                    assert!(d <= 1e-6, "view {v}, starts {starts:?}, scale {scale}: {d}");
                }
            }
        }
    }

    #[test]
    fn per_sequence_starts_match_separate_calls() {
        let dev = Default::default();
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(crate::rng::uniform(2 * 3 * 2 * 4, 3), [2, 3, 2, 4]),
            &dev,
        );
        let both = apply4(x.clone(), &[1, 7], 10000.0);
        for (i, start) in [1usize, 7].into_iter().enumerate() {
            let one = apply4(
                x.clone().slice([i..i + 1, 0..3, 0..2, 0..4]),
                &[start],
                10000.0,
            );
            let got = both.clone().slice([i..i + 1, 0..3, 0..2, 0..4]);
            let d: f32 = (one - got).abs().max().into_scalar();
            assert!(d < 1e-7, "sequence {i}: {d}");
        }
    }
}
