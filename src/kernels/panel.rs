//! 半精度权重的预填充矩阵乘：权重按列分块加宽为 f32（每块一次，不整张转换），每块交给 gemm 的
//! f32 内核；输入只加宽一次。
//!
//! `y = x · w` for many rows `x` (a prefill chunk) and a weight stored in f16 or bf16 (`[k, n]`,
//! Burn's `[d_in, d_out]` rows). burn-flex 0.21 widens the whole weight and the input to f32 on
//! every call (bf16: the `gemm` crate has no bf16 kernel) and makes the strided input contiguous
//! first: in a bf16 prefill of 8192 tokens at `scenarios/sc001-mla.toml`'s dimensions that was
//! 18 % of the main thread's time outside the product itself (perf). Here the weight is widened
//! one column panel (at most [`PANEL_BYTES`] of f32, cache-sized) at a time, in parallel rows,
//! and each panel is one call of gemm's f32 product writing its columns of `y` in place.

use rayon::prelude::*;

use super::convert::{self, Elems};
use super::Level;

/// f32 bytes of one widened weight panel at most.
pub const PANEL_BYTES: usize = 4 << 20;

/// `x · w` (`x`: `[m, k]` f32, contiguous; `w`: `[k, n]` as stored, contiguous) as `[m, n]` f32.
pub fn matmul(level: Level, x: &[f32], w: Elems<'_>, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "panel matmul: x is not [{m}, {k}]");
    assert_eq!(w.len(), k * n, "panel matmul: w is not [{k}, {n}]");
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return y;
    }
    // panel width: a multiple of 16 columns, at least 16, within PANEL_BYTES where k allows
    let cols = (PANEL_BYTES / (4 * k)).max(16) / 16 * 16;
    let cols = cols.min(n);
    let mut panel = vec![0f32; k * cols];
    let mut n0 = 0;
    while n0 < n {
        let pn = cols.min(n - n0);
        let p = &mut panel[..k * pn];
        p.par_chunks_mut(pn * 64).enumerate().for_each(|(t, rows)| {
            for (i, row) in rows.chunks_mut(pn).enumerate() {
                let j = t * 64 + i;
                convert::widen(level, w.sub(j * n + n0, pn), row);
            }
        });
        // SAFETY: `y` holds m rows of n f32 at row stride n, and columns n0..n0 + pn exist in
        // each (n0 + pn <= n); `x` holds m rows of k at stride k; `p` holds k rows of pn at
        // stride pn. gemm reads lhs/rhs and writes dst only within those extents; `read_dst`
        // is false (the panel's columns of y are written, not accumulated), and the three
        // buffers do not overlap (y and panel are separate allocations, x is borrowed).
        unsafe {
            gemm::gemm(
                m,
                pn,
                k,
                y.as_mut_ptr().add(n0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                p.as_ptr(),
                1,
                pn as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        n0 += pn;
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn panels_equal_a_plain_product_of_the_stored_weights() {
        // n spans several panels with a partial last one (k large enough for narrow panels)
        let (m, k, n) = (7, 8192 + 5, 300);
        let x = crate::rng::uniform(m * k, 1);
        let w = crate::rng::uniform(k * n, 2);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        assert!(PANEL_BYTES / (4 * k) < n, "more than one panel");
        for level in Level::available() {
            for (we, wr) in [
                (
                    Elems::F16(&wh),
                    wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                ),
                (Elems::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                (Elems::F32(&w), w.clone()),
            ] {
                let y = matmul(level, &x, we, m, k, n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * wr[c * n + j] as f64)
                            .sum();
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 5e-3,
                            "{level} [{i}, {j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
