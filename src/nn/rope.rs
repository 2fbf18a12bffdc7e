//! Rotary position embedding, interleaved pairs (DeepSeek's `view_as_complex` convention).
//!
//! The angles are computed on the host for the positions a call needs, so no table that grows
//! with the maximum sequence length is kept on the device (it would distort memory figures).

use burn::tensor::{backend::Backend, Tensor, TensorData};

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
    let mut cos = Vec::with_capacity(n * len * half);
    let mut sin = Vec::with_capacity(n * len * half);
    // frequency of pair i: theta^(-2i/d)
    let freqs: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / d as f64))
        .collect();
    for &start in starts {
        for p in start..start + len {
            for &freq in &freqs {
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, len, half]), device),
        Tensor::from_data(TensorData::new(sin, [n, len, half]), device),
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
    let [b, h, len, d] = x.dims();
    assert_eq!(starts.len(), b, "one start position per sequence");
    let half = d / 2;
    // one table row for all when the starts agree, else one per sequence
    let rows = match uniform(starts) {
        Some(s) => vec![s],
        None => starts.to_vec(),
    };
    let (cos, sin) = tables_multi::<B>(&rows, len, d, theta, &x.device());
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
    Tensor::stack::<5>(vec![r0, r1], 4).reshape([b, h, len, d])
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
    fn per_sequence_starts_match_separate_calls() {
        let dev = Default::default();
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(
                crate::bench::calibrate::pseudo_random(2 * 3 * 2 * 4, 3),
                [2, 3, 2, 4],
            ),
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
