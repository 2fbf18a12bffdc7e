//! MoE 解码步的路由专家：每个被选中的专家在自己的权重行上直接算它那几行 token（SwiGLU），
//! 不做张量级的收集与拼接，按门控权重累加到输出。
//!
//! A decode step of a fine-grained MoE touches tens of small experts with one to a few token rows
//! each. Through tensor ops each expert is a `select` of its rows, three matrix products (each
//! split over the pool), a gate, and at the end a concatenation, an inverse `select`, a weighting
//! and a sum: per expert a dozen small operations whose fixed costs exceed the expert's own
//! bytes. Here the experts are spread over the pool (one expert per task, its products on that
//! thread: [`super::gemv::gemv_band`]), each expert's weight rows read once, and the weighted
//! outputs summed into the tokens' rows.

use rayon::prelude::*;

use super::convert::Elems;
use super::gemv::gemv_band;
use super::{gate, Level};

/// One routed expert's weights, Burn's `[d_in, d_out]` layout: `w1` (gate) and `w3` (up)
/// `[dim, inter]`, `w2` (down) `[inter, dim]`, all contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Expert<'a> {
    /// Gate projection.
    pub w1: Elems<'a>,
    /// Down projection.
    pub w2: Elems<'a>,
    /// Up projection.
    pub w3: Elems<'a>,
}

/// One expert's work: its index in the experts' list, and its `(token, gate weight)` rows.
pub type Group = (usize, Vec<(usize, f32)>);

/// `y[t] = Σ_(e, w) w · expert_e(x[t])` over each token's routed experts (`x`: `tokens x dim`,
/// row-major f32), at `level`, the experts spread over the rayon pool.
pub fn routed(
    level: Level,
    x: &[f32],
    tokens: usize,
    dim: usize,
    inter: usize,
    experts: &[Expert<'_>],
    groups: &[Group],
) -> Vec<f32> {
    assert_eq!(x.len(), tokens * dim, "moe: x is not tokens x dim");
    let outs: Vec<Vec<f32>> = groups
        .par_iter()
        .map(|(e, rows)| expert_rows(level, x, dim, inter, &experts[*e], rows))
        .collect();
    let mut y = vec![0f32; tokens * dim];
    for ((_, rows), o) in groups.iter().zip(&outs) {
        accumulate(&mut y, dim, rows, o);
    }
    y
}

/// One expert's SwiGLU outputs `rows.len() x dim` for the token rows `rows` of `x` (`? x dim`,
/// row-major f32), on the calling thread. [`routed`] runs it per expert on the pool; an expert
/// streamed from storage runs it alone (`nn::moe::storage`), and with [`accumulate`] in the same
/// expert order the sums are the same bits.
pub fn expert_rows(
    level: Level,
    x: &[f32],
    dim: usize,
    inter: usize,
    ex: &Expert<'_>,
    rows: &[(usize, f32)],
) -> Vec<f32> {
    let n = rows.len();
    let mut xe = vec![0f32; n * dim];
    for (i, &(t, _)) in rows.iter().enumerate() {
        xe[i * dim..(i + 1) * dim].copy_from_slice(&x[t * dim..(t + 1) * dim]);
    }
    let mut a = vec![0f32; n * inter];
    let mut b = vec![0f32; n * inter];
    gemv_band(level, &mut a, &xe, ex.w1, 0, inter, n, dim, inter);
    gemv_band(level, &mut b, &xe, ex.w3, 0, inter, n, dim, inter);
    let mut h = vec![0f32; n * inter];
    gate::swiglu(level, &a, &b, &mut h);
    let mut o = vec![0f32; n * dim];
    gemv_band(level, &mut o, &h, ex.w2, 0, dim, n, inter, dim);
    o
}

/// `y[t] += w · o[i]` for the `i`-th `(t, w)` of `rows` (`o`: one expert's [`expert_rows`]).
pub fn accumulate(y: &mut [f32], dim: usize, rows: &[(usize, f32)], o: &[f32]) {
    for (i, &(t, w)) in rows.iter().enumerate() {
        for (a, v) in y[t * dim..(t + 1) * dim]
            .iter_mut()
            .zip(&o[i * dim..(i + 1) * dim])
        {
            *a += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use half::bf16;

    /// `n` experts' random f32 weights `[w1, w2, w3]` (`w1`, `w3`: `dim x inter`; `w2`: `inter x dim`).
    fn random_experts(dim: usize, inter: usize, n: usize) -> Vec<[Vec<f32>; 3]> {
        (0..n as u64)
            .map(|e| {
                [
                    uniform(dim * inter, 3 * e + 1),
                    uniform(inter * dim, 3 * e + 2),
                    uniform(dim * inter, 3 * e + 3),
                ]
            })
            .collect()
    }

    /// The kernel's view of f32 expert weights.
    fn f32_experts(w: &[[Vec<f32>; 3]]) -> Vec<Expert<'_>> {
        w.iter()
            .map(|[a, b, c]| Expert {
                w1: Elems::F32(a),
                w2: Elems::F32(b),
                w3: Elems::F32(c),
            })
            .collect()
    }

    /// Token by token, expert by expert, in f64.
    fn reference(
        x: &[f32],
        dim: usize,
        inter: usize,
        w: &[[Vec<f32>; 3]],
        routes: &[Vec<(usize, f32)>],
    ) -> Vec<f32> {
        let mut y = vec![0f32; routes.len() * dim];
        for (t, r) in routes.iter().enumerate() {
            let xt = &x[t * dim..(t + 1) * dim];
            for &(e, g) in r {
                let [w1, w2, w3] = &w[e];
                let mut h = vec![0f64; inter];
                for (j, hj) in h.iter_mut().enumerate() {
                    let a: f64 = (0..dim)
                        .map(|i| xt[i] as f64 * w1[i * inter + j] as f64)
                        .sum();
                    let b: f64 = (0..dim)
                        .map(|i| xt[i] as f64 * w3[i * inter + j] as f64)
                        .sum();
                    *hj = a / (1.0 + (-a).exp()) * b;
                }
                for c in 0..dim {
                    let o: f64 = (0..inter).map(|j| h[j] * w2[j * dim + c] as f64).sum();
                    y[t * dim + c] += (g as f64 * o) as f32;
                }
            }
        }
        y
    }

    #[test]
    fn a_batch_of_tokens_equals_the_per_token_reference_at_every_level() {
        let (dim, inter, n_exp, tokens) = (40, 24, 6, 8);
        let w = random_experts(dim, inter, n_exp);
        let x = uniform(tokens * dim, 99);
        // each token: 2 experts (some shared between tokens, expert 5 unused)
        let routes: Vec<Vec<(usize, f32)>> = (0..tokens)
            .map(|t| vec![(t % 3, 0.7), ((t + 1) % 5, 0.3)])
            .collect();
        let mut groups: Vec<Group> = Vec::new();
        for e in 0..n_exp {
            let rows: Vec<(usize, f32)> = routes
                .iter()
                .enumerate()
                .flat_map(|(t, r)| r.iter().filter(|p| p.0 == e).map(move |p| (t, p.1)))
                .collect();
            if !rows.is_empty() {
                groups.push((e, rows));
            }
        }
        let want = reference(&x, dim, inter, &w, &routes);
        for level in Level::available() {
            let ex = f32_experts(&w);
            let y = routed(level, &x, tokens, dim, inter, &ex, &groups);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{level} f32 [{i}]: {a} vs {b}");
            }
            // bf16 weights: against the reference on the rounded weights
            let wb: Vec<[Vec<bf16>; 3]> = w
                .iter()
                .map(|ws| {
                    ws.clone()
                        .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
                })
                .collect();
            let wq: Vec<[Vec<f32>; 3]> = wb
                .iter()
                .map(|ws| ws.clone().map(|v| v.iter().map(|x| x.to_f32()).collect()))
                .collect();
            let ex: Vec<Expert<'_>> = wb
                .iter()
                .map(|[a, b, c]| Expert {
                    w1: Elems::Bf16(a),
                    w2: Elems::Bf16(b),
                    w3: Elems::Bf16(c),
                })
                .collect();
            let y = routed(level, &x, tokens, dim, inter, &ex, &groups);
            let want = reference(&x, dim, inter, &wq, &routes);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{level} bf16 [{i}]: {a} vs {b}");
            }
        }
    }

    /// The routed experts of one decode step at `scenarios/sc003-moe.toml`'s shape (512 x 256
    /// experts, 112 per layer, 8 tokens x top-6, f32), timed alone against the streaming read
    /// limit measured in the same process, by hand
    /// (`cargo test --release --lib -- --ignored moe_step_timings --nocapture`). Four layers'
    /// experts (704 MB) are cycled, a fresh routing for each repetition, so that no repetition
    /// finds its experts in the last-level cache (a decode step of the model does not either);
    /// medians of 24 repetitions.
    #[test]
    #[ignore]
    fn moe_step_timings() {
        let (dim, inter, n_exp, layers, tokens, top) = (512, 256, 112, 4, 8, 6);
        let w = random_experts(dim, inter, n_exp * layers);
        let ex = f32_experts(&w);
        let x = uniform(tokens * dim, 99);
        let level = Level::current();
        let mut state = 12345u64;
        // each token's top-6 distinct experts of layer `l`, as (expert index, rows) groups
        let mut route = |l: usize| {
            let mut groups: Vec<Group> = Vec::new();
            for t in 0..tokens {
                let mut picked: Vec<usize> = Vec::new();
                while picked.len() < top {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let e = l * n_exp + (state >> 33) as usize % n_exp;
                    if !picked.contains(&e) {
                        picked.push(e);
                    }
                }
                for e in picked {
                    match groups.iter_mut().find(|(g, _)| *g == e) {
                        Some((_, rows)) => rows.push((t, 1.0 / top as f32)),
                        None => groups.push((e, vec![(t, 1.0 / top as f32)])),
                    }
                }
            }
            groups
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for round in 0..3 {
            let (mut kernel, mut read, mut touched) = (Vec::new(), Vec::new(), 0);
            for rep in 0..24 {
                // kernel and read alternate over the layers (kernel 0, read 1, kernel 2, read 3,
                // …): neither follows a pass over its own layer's bytes
                let groups = route((2 * rep) % layers);
                touched += groups.len();
                let bytes = (groups.len() * 3 * dim * inter * 4) as f64;
                let t0 = std::time::Instant::now();
                std::hint::black_box(routed(level, &x, tokens, dim, inter, &ex, &groups));
                kernel.push(bytes / t0.elapsed().as_secs_f64() / 1e9);
                // the same kind of step's bytes (another layer's, not in cache) read by the same
                // tasks (one expert per task), summed instead of multiplied
                let groups = route((2 * rep + 1) % layers);
                let bytes = (groups.len() * 3 * dim * inter * 4) as f64;
                let t0 = std::time::Instant::now();
                let total: u64 = groups
                    .par_iter()
                    .map(|(e, _)| {
                        w[*e].iter().fold(0u64, |acc, m| {
                            let words: &[u64] = bytemuck::cast_slice(m);
                            acc.wrapping_add(super::super::reduce::sum_words(level, words))
                        })
                    })
                    .reduce(|| 0, u64::wrapping_add);
                std::hint::black_box(total);
                read.push(bytes / t0.elapsed().as_secs_f64() / 1e9);
            }
            let limit =
                crate::bench::roofline::host_read_gb_per_s(512 << 20, rayon::current_num_threads())
                    .unwrap_or(f64::NAN);
            println!(
                "moe step {level} round {round}: {:.1} experts touched per step; median kernel {:.1} GB/s, \
                 the same kind of step's bytes only summed {:.1} GB/s; streaming read limit {:.1} GB/s",
                touched as f64 / 24.0,
                median(kernel),
                median(read),
                limit
            );
        }
    }
}
