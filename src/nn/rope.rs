//! Rotary position embedding, interleaved pairs (DeepSeek's `view_as_complex` convention).
//!
//! The angles are computed on the host for the positions a call needs, so no table that grows
//! with the maximum sequence length is kept on the device (it would distort memory figures).

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// cos and sin tables `[len, d/2]` for positions `start..start+len`.
pub fn tables<B: Backend>(
    start: usize,
    len: usize,
    d: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = d / 2;
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    // frequency of pair i: theta^(-2i/d)
    let freqs: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / d as f64))
        .collect();
    for p in start..start + len {
        for &freq in &freqs {
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [len, half]), device),
        Tensor::from_data(TensorData::new(sin, [len, half]), device),
    )
}

/// Rotates `x` `[n, len, d]` (n = any leading dims folded) at positions `start..start+len`.
///
/// # Shapes
/// - x: `[n, len, d]`, d even; pairs are (x[2i], x[2i+1]).
pub fn apply<B: Backend>(x: Tensor<B, 3>, start: usize, theta: f64) -> Tensor<B, 3> {
    let [n, len, d] = x.dims();
    let (cos, sin) = tables::<B>(start, len, d, theta, &x.device());
    let pairs = x.reshape([n, len, d / 2, 2]);
    let x0 = pairs
        .clone()
        .slice([0..n, 0..len, 0..d / 2, 0..1])
        .reshape([n, len, d / 2]);
    let x1 = pairs
        .slice([0..n, 0..len, 0..d / 2, 1..2])
        .reshape([n, len, d / 2]);
    // [len, d/2] -> [1, len, d/2], broadcast over n
    let cos = cos.unsqueeze::<3>().expand([n, len, d / 2]);
    let sin = sin.unsqueeze::<3>().expand([n, len, d / 2]);
    let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
    let r1 = x0 * sin + x1 * cos;
    Tensor::stack::<4>(vec![r0, r1], 3).reshape([n, len, d])
}

/// `apply` for `[b, h, len, d]`.
pub fn apply4<B: Backend>(x: Tensor<B, 4>, start: usize, theta: f64) -> Tensor<B, 4> {
    let [b, h, len, d] = x.dims();
    apply(x.reshape([b * h, len, d]), start, theta).reshape([b, h, len, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn rotates_pairs_by_position_times_frequency() {
        let dev = Default::default();
        // d = 4: pair 0 frequency 1, pair 1 frequency theta^-0.5 = 0.01 for theta = 10000
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 1.0, 0.0], [1, 1, 4]),
            &dev,
        );
        let y: Vec<f32> = apply(x, 2, 10000.0).into_data().to_vec().unwrap();
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
            (apply(q.clone(), m, 100.0) * apply(k.clone(), n, 100.0))
                .sum()
                .into_scalar()
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-5);
        assert!((dot(5, 2) - dot(2, 5)).abs() > 1e-3);
    }
}
