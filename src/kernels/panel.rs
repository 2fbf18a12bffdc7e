//! 半精度权重的预填充矩阵乘：权重按列分块加宽为 f32（每块一次，不整张转换），每块交给 gemm 的
//! f32 内核；输入只加宽一次。
//!
//! `y = x · w` for many rows `x` (a prefill chunk) and a weight stored in f16 or bf16 (`[k, n]`,
//! Burn's `[d_in, d_out]` rows). burn-flex 0.21 widens the whole weight and the input to f32 on
//! every call (bf16: the `gemm` crate has no bf16 kernel) and makes the strided input contiguous
//! first: in a bf16 prefill of 8192 tokens at `scenarios/sc001-mla.toml`'s dimensions that was
//! 18 % of the main thread's time outside the product itself (perf). Here the weight is widened
//! one column panel at a time (all panels in flight at most [`PANEL_BYTES`] of f32), each pool
//! thread widening its own panel and running gemm's f32 product on it single-threaded, writing
//! its columns of `y` in place.
//!
//! Measured (2-core AMD EPYC, 512 x [2048, 6144], `kernel_timings`, alternated, 2026-12-07):
//! one gemm call over the whole f32 weight 61.6-64.3 ms; the earlier design (one panel at a
//! time, widened by all threads, then one multi-threaded gemm call per 512-column panel)
//! 66.3-79.4 ms in every dtype; this one 63.4-65.9 ms. (A 512-column call of the multi-threaded
//! gemm alone took 73 ms against 64-68 for other widths.)

use rayon::prelude::*;

use super::convert::{self, Elems};
use super::Level;

/// f32 bytes of the widened weight panels in use at once (shared among the pool's threads;
/// more only where a thread's share holds fewer than 16 columns: then 16 columns, `64·k` bytes,
/// per thread).
pub const PANEL_BYTES: usize = 4 << 20;

/// `x · w` (`x`: `[m, k]` f32, contiguous; `w`: `[k, n]` as stored, contiguous) as `[m, n]` f32.
pub fn matmul(level: Level, x: &[f32], w: Elems<'_>, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "panel matmul: x is not [{m}, {k}]");
    assert_eq!(w.len(), k * n, "panel matmul: w is not [{k}, {n}]");
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return y;
    }
    // one panel per task, each pool thread widening its own and running gemm on it alone: a
    // 1/threads share of PANEL_BYTES each (a multiple of 16 columns, at least 16), and at least
    // one panel per thread where n allows. The closure calls nothing on the pool, so a thread
    // holds one panel at a time (rayon may allocate one per split of the range; each is freed
    // when its split is done)
    let threads = rayon::current_num_threads().max(1);
    let cols = (PANEL_BYTES / threads / (4 * k)).max(16) / 16 * 16;
    let cols = cols.min(n.div_ceil(threads).next_multiple_of(16)).min(n);
    let out = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(cols)).into_par_iter().for_each_init(
        || vec![0f32; k * cols],
        |panel, t| {
            let n0 = t * cols;
            let pn = cols.min(n - n0);
            let p = &mut panel[..k * pn];
            for (j, row) in p.chunks_mut(pn).enumerate() {
                convert::widen(level, w.sub(j * n + n0, pn), row);
            }
            // SAFETY: `y` holds m rows of n f32 at row stride n (it outlives this parallel
            // loop), and columns n0..n0 + pn exist in each (n0 + pn <= n); each task writes only
            // its own columns, so no two tasks write the same element. `x` holds m rows of k at
            // stride k; `p` holds k rows of pn at stride pn. gemm reads lhs/rhs and writes dst
            // only within those extents; `read_dst` is false (the panel's columns of y are
            // written, not accumulated), and the buffers do not overlap (y and the panels are
            // separate allocations, x is borrowed).
            unsafe {
                gemm::gemm(
                    m,
                    pn,
                    k,
                    out.get().add(n0),
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
                    gemm::Parallelism::None,
                );
            }
        },
    );
    y
}

/// The output's base pointer, shared by the tasks that write disjoint columns of it.
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole wrapper).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointer is only used by `matmul`'s tasks, each writing its own columns of a
// buffer that outlives them (see the SAFETY note at the write).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the tasks share the pointer, not the elements they write.
unsafe impl Sync for SendPtr {}

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
        let threads = rayon::current_num_threads().max(1);
        assert!(PANEL_BYTES / threads / (4 * k) < n, "more than one panel");
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
