//! RMSNorm 的 CPU 内核：每行在 f32 中求均方根并乘以缩放参数，输入按存储精度读取。
//!
//! `out = x / sqrt(mean(x²) + eps) · gamma` row by row, in f32, the rows read as stored (f32,
//! f16, bf16) and split over the rayon pool. Burn's `RmsNorm::forward` computes the same with
//! four tensor ops; in half precision burn-flex runs them through its strided element iterator
//! (perf, bf16 prefill of 8192 tokens at `scenarios/sc001-mla.toml`'s dimensions: 10 % of the
//! CPU time). Half-precision results are rounded once (Burn rounds `x / rms` and the product).

use rayon::prelude::*;

use super::convert::{self, Elems};
use super::Level;

/// Rows per pool task (a task's rows are contiguous).
const ROWS_PER_TASK: usize = 16;

/// `out[r·d..(r+1)·d] = x_r / sqrt(mean(x_r²) + eps) · gamma` for every row `x_r` of `x`
/// (`d = gamma.len()`, `out.len() / d` rows; row `r` is `x[r·stride..r·stride + d]`).
pub fn rms_norm(
    level: Level,
    x: Elems<'_>,
    stride: usize,
    gamma: Elems<'_>,
    eps: f32,
    out: &mut [f32],
) {
    let d = gamma.len();
    let rows = out.len() / d.max(1);
    assert!(
        d > 0
            && stride >= d
            && out.len().is_multiple_of(d)
            && (rows == 0 || (rows - 1) * stride + d <= x.len()),
        "rms_norm: x does not hold the rows of {d} at stride {stride}"
    );
    let g = convert::to_f32(level, gamma);
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, o)| {
            for (i, row) in o.chunks_mut(d).enumerate() {
                let at = (t * ROWS_PER_TASK + i) * stride;
                convert::widen(level, x.sub(at, d), row);
                norm_row(row, &g, eps);
            }
        });
}

/// One row in place.
fn norm_row(row: &mut [f32], gamma: &[f32], eps: f32) {
    let mut part = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (p, v) in part.iter_mut().zip(c) {
            *p += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let ss = ((part[0] + part[4]) + (part[1] + part[5]))
        + ((part[2] + part[6]) + (part[3] + part[7]))
        + tail;
    let rms = (ss / row.len() as f32 + eps).sqrt();
    for (v, g) in row.iter_mut().zip(gamma) {
        *v = *v / rms * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use half::{bf16, f16};

    #[test]
    fn rows_match_an_f64_reference_at_every_level_and_storage_type() {
        // tails at every vector width, rows over several tasks, rows at a stride wider than d
        let (rows, d, st) = (37, 45, 50);
        let x: Vec<f32> = uniform(rows * st, 3).iter().map(|v| v * 3.0).collect();
        let g = uniform(d, 4);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        for level in Level::available() {
            for (xe, xr) in [
                (Elems::F32(&x), x.clone()),
                (Elems::F16(&xh), xh.iter().map(|v| v.to_f32()).collect()),
                (Elems::Bf16(&xb), xb.iter().map(|v| v.to_f32()).collect()),
            ] {
                let mut out = vec![0f32; rows * d];
                rms_norm(level, xe, st, Elems::F32(&g), 1e-6, &mut out);
                for r in 0..rows {
                    let row = &xr[r * st..r * st + d];
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + 1e-6).sqrt();
                    for c in 0..d {
                        let want = row[c] as f64 * inv * g[c] as f64;
                        let got = out[r * d + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{level} row {r} col {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
