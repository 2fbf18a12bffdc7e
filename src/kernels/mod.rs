//! CPU 内核模块：dsopt 在 CPU 后端上的全部快速路径（解码的矩阵-向量积、少行融合注意力、
//! SwiGLU 门、带宽测量的读循环、半精度的加宽与收窄），在一个可移植的 SIMD 层（`pulp`）上只写
//! 一遍，运行时按 CPU 选择指令集（AVX-512、AVX2+FMA、标量；aarch64 上为 NEON）。
//!
//! Why `pulp` (not `macerator`): both are already in the dependency tree (gemm uses pulp, burn-flex
//! macerator), and pulp is compiled here with its `x86-v4` feature already (gemm's AVX-512
//! kernels), so it adds no build time; its `Simd` trait gives vectors of the level's width
//! (8 floats under AVX2, 16 under AVX-512, 4 under NEON, 1 for the scalar level) and its
//! `Simd::vectorize` compiles the generic body once per level with that level's target features.
//! The kernels are written once against that trait, as plain loops over `S::f32s`.
//!
//! Where this module is used: the model code (`nn/`) calls it through small functions on plain
//! slices (no Burn types here); the adapters in `nn/` take the slices out of burn-flex tensors and
//! fall back to Burn's own ops on every other backend. Every `unsafe` block of the CPU fast paths
//! is in this module, with a `SAFETY:` comment.
//!
//! Levels: [`Level::detected`] is the best the CPU runs; [`Level::current`] is that, or lower where
//! the environment variable `DSOPT_SIMD` (`avx512bf16`, `avx512`, `avx2`, `neon` or `scalar`) asks for it (checked
//! once, at start-up, by [`Level::from_env`]; a level the CPU does not have is an error, not a
//! silent fallback). Every report records the level in use (`machine.simd`). Unit tests pass the
//! level explicitly and run every level the build machine has ([`Level::available`]).
//!
//! aarch64 (NEON through pulp's `aarch64::Neon`): `scripts/aarch64-check.sh` runs clippy for
//! aarch64 and the library's tests under qemu-user on an x86-64 machine, so every kernel is
//! checked against its reference at the NEON level too; its speed is measured on x86-64 only.

pub mod attend;
#[cfg(target_arch = "x86_64")]
pub mod bf16dot;
pub mod convert;
pub mod eltwise;
pub mod gate;
pub mod gemv;
pub mod moe;
pub mod norm;
pub mod panel;
pub mod reduce;

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// An instruction-set level the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Plain scalar code (one float per "vector"): every CPU.
    Scalar,
    /// aarch64 NEON (128-bit).
    Neon,
    /// x86-64-v3: AVX2 + FMA + F16C (256-bit).
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL (512-bit).
    Avx512,
    /// x86-64-v4 with AVX512_BF16: [`Level::Avx512`]'s code, and the few-row attention on bf16
    /// caches by bf16 dot products ([`bf16dot`]).
    Avx512Bf16,
}

/// The environment variable that lowers the level for a run.
pub const ENV: &str = "DSOPT_SIMD";

impl Level {
    /// Its name, as `DSOPT_SIMD` and the reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Parses a `DSOPT_SIMD` value.
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Level::Scalar),
            "neon" => Some(Level::Neon),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            "avx512bf16" => Some(Level::Avx512Bf16),
            _ => None,
        }
    }

    /// Whether this CPU runs the level.
    pub fn is_available(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                pulp::x86::V3::try_new().is_some() && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => pulp::x86::V4::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bf16 => pulp::x86::V4::try_new().is_some() && bf16dot::available(),
            #[cfg(target_arch = "aarch64")]
            Level::Neon => pulp::aarch64::Neon::try_new().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU runs, lowest first (what the unit tests iterate over).
    pub fn available() -> Vec<Level> {
        [
            Level::Scalar,
            Level::Neon,
            Level::Avx2,
            Level::Avx512,
            Level::Avx512Bf16,
        ]
        .into_iter()
        .filter(|l| l.is_available())
        .collect()
    }

    /// The best level this CPU runs.
    pub fn detected() -> Level {
        *Level::available().last().unwrap_or(&Level::Scalar)
    }

    /// The level `DSOPT_SIMD` asks for (the detected one when unset or empty), or why it cannot
    /// be used: an unknown name, or a level this CPU does not run.
    pub fn from_env() -> Result<Level, String> {
        let detected = Level::detected();
        let Ok(v) = std::env::var(ENV) else {
            return Ok(detected);
        };
        if v.trim().is_empty() {
            return Ok(detected);
        }
        let Some(l) = Level::parse(&v) else {
            return Err(format!(
                "{ENV}={v:?} is not a SIMD level; use one of avx512bf16, avx512, avx2, neon, scalar \
                 (or unset it for the best this CPU runs: {})",
                detected.name()
            ));
        };
        if !l.is_available() {
            return Err(format!(
                "{ENV}={v:?}: this CPU does not run {}; the best it runs is {} (levels it runs: {})",
                l.name(),
                detected.name(),
                Level::available()
                    .iter()
                    .map(|l| l.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(l)
    }

    /// The level in use for this process: [`Level::from_env`], or the detected level when the
    /// variable is invalid (the binary checks it at start-up and exits 2 before any kernel runs,
    /// so the fallback only concerns library users).
    pub fn current() -> Level {
        static CURRENT: OnceLock<Level> = OnceLock::new();
        *CURRENT.get_or_init(|| Level::from_env().unwrap_or_else(|_| Level::detected()))
    }

    /// Runs `op` compiled for this level (the level must be available: [`Level::is_available`];
    /// an unavailable one runs the scalar code).
    ///
    /// The only place in the crate that makes a pulp token and runs code with it: the kernels'
    /// AVX2 code uses F16C on the strength of the check here (see `avx2_f16c`), so no other
    /// code may call `pulp::x86::V3::try_new`, `Simd::vectorize` or `with_simd` on its own.
    #[inline(always)]
    pub(crate) fn run<Op: pulp::WithSimd>(self, op: Op) -> Op::Output {
        use pulp::Simd;
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 => match pulp::x86::V4::try_new() {
                Some(s) => Simd::vectorize(s, op),
                None => Simd::vectorize(pulp::Scalar::new(), op),
            },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => match pulp::x86::V3::try_new() {
                // SAFETY: the CPU has every feature of pulp's `V3` (the token exists) and F16C
                // (checked here), the features `avx2_f16c` is compiled for.
                Some(s) if std::is_x86_feature_detected!("f16c") => unsafe { avx2_f16c(s, op) },
                _ => Simd::vectorize(pulp::Scalar::new(), op),
            },
            #[cfg(target_arch = "aarch64")]
            Level::Neon => match pulp::aarch64::Neon::try_new() {
                Some(s) => Simd::vectorize(s, op),
                None => Simd::vectorize(pulp::Scalar::new(), op),
            },
            _ => Simd::vectorize(pulp::Scalar::new(), op),
        }
    }
}

/// `op` at pulp's AVX2 level (`V3`) compiled with F16C as well, which `V3` does not enable: its
/// body (every kernel's `with_simd`, inlined) may then use F16C's conversion instructions inline
/// (f16 widened by `vcvtph2ps`, [`convert`]). Every AVX2 CPU has F16C (x86-64-v3 includes it);
/// [`Level::Avx2`] requires it, and every `V3` kernel runs through here.
#[cfg(target_arch = "x86_64")]
#[target_feature(
    enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,f16c"
)]
fn avx2_f16c<Op: pulp::WithSimd>(simd: pulp::x86::V3, op: Op) -> Op::Output {
    op.with_simd(simd)
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        for l in [
            Level::Scalar,
            Level::Neon,
            Level::Avx2,
            Level::Avx512,
            Level::Avx512Bf16,
        ] {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse"), None);
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert!(Level::Avx512 < Level::Avx512Bf16);
        // AVX512_BF16 comes with AVX-512 only
        assert!(!Level::Avx512Bf16.is_available() || Level::Avx512.is_available());
        let a = Level::available();
        assert_eq!(a.first(), Some(&Level::Scalar));
        assert_eq!(*a.last().unwrap(), Level::detected());
        assert!(Level::Scalar.is_available());
    }

    /// Advanced SIMD (NEON) is part of every ARMv8-A CPU: on aarch64 the tests that run every
    /// available level run the NEON kernels (`scripts/aarch64-check.sh`, under qemu-user).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_is_detected_on_aarch64() {
        assert_eq!(Level::available(), vec![Level::Scalar, Level::Neon]);
        assert_eq!(Level::detected(), Level::Neon);
    }
}

/// Kernel timings at decode shapes, run by hand (`cargo test --release --lib -- --ignored
/// kernel_timings --nocapture`): not a test of speed (timings on shared machines are noise), a
/// measurement for the notes.
#[cfg(test)]
mod timings {
    use super::convert::Elems;
    use super::*;
    use half::bf16;
    use std::time::Instant;

    fn best<F: FnMut()>(mut f: F) -> f64 {
        f();
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Best-of-7 times of one attention call with f32 and with bf16 keys and values (`g` groups
    /// of `rows` query rows, `ctx` keys, queries from `start`, `q_len` tokens per row group).
    #[allow(clippy::too_many_arguments)]
    fn time_attention(
        level: Level,
        g: usize,
        rows: usize,
        dk: usize,
        dv: usize,
        ctx: usize,
        start: usize,
        q_len: usize,
        shared: bool,
    ) -> (f64, f64, f64) {
        let q = crate::rng::uniform(g * rows * dk, 3);
        let kv = crate::rng::uniform(g * ctx * dk, 4);
        let kvb: Vec<bf16> = kv.iter().map(|&v| bf16::from_f32(v)).collect();
        let vv = crate::rng::uniform(g * ctx * dv, 5);
        let vvb: Vec<bf16> = vv.iter().map(|&v| bf16::from_f32(v)).collect();
        let kvh: Vec<half::f16> = kv.iter().map(|&v| half::f16::from_f32(v)).collect();
        let vvh: Vec<half::f16> = vv.iter().map(|&v| half::f16::from_f32(v)).collect();
        // queries stored like the cache (as the model gives them)
        let qb: Vec<bf16> = q.iter().map(|&v| bf16::from_f32(v)).collect();
        let qh: Vec<half::f16> = q.iter().map(|&v| half::f16::from_f32(v)).collect();
        let starts = [start];
        let run = |k: Elems<'_>, v: Elems<'_>| {
            let q = match k {
                Elems::Bf16(_) => Elems::Bf16(&qb),
                Elems::F16(_) => Elems::F16(&qh),
                Elems::F32(_) => Elems::F32(&q),
            };
            let p = attend::Problem {
                q,
                b: 1,
                g,
                rows,
                dk,
                dv,
                k: attend::Cache {
                    data: k,
                    offset: 0,
                    strides: [g * ctx * dk, ctx * dk, dk],
                },
                v: (!shared).then_some(attend::Cache {
                    data: v,
                    offset: 0,
                    strides: [g * ctx * dv, ctx * dv, dv],
                }),
                q_starts: &starts,
                q_len,
            };
            std::hint::black_box(attend::attention(level, &p));
        };
        (
            best(|| run(Elems::F32(&kv), Elems::F32(&vv))),
            best(|| run(Elems::Bf16(&kvb), Elems::Bf16(&vvb))),
            best(|| run(Elems::F16(&kvh), Elems::F16(&vvh))),
        )
    }

    #[test]
    #[ignore]
    fn kernel_timings() {
        let level = Level::current();
        // gemv: 1 and 8 rows x [2048, 6144]
        let (k, n) = (2048, 6144);
        let w = crate::rng::uniform(k * n, 1);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        for rows in [1, 8] {
            let x = crate::rng::uniform(rows * k, 2);
            let t32 = best(|| {
                std::hint::black_box(gemv::gemv_rows(level, &x, Elems::F32(&w), rows, k, n));
            });
            let t16 = best(|| {
                std::hint::black_box(gemv::gemv_rows(level, &x, Elems::Bf16(&wb), rows, k, n));
            });
            let th = best(|| {
                std::hint::black_box(gemv::gemv_rows(level, &x, Elems::F16(&wh), rows, k, n));
            });
            println!(
                "gemv {rows} x [{k}, {n}] {level}: f32 {:.3} ms ({:.1} GB/s), bf16 {:.3} ms ({:.1} GB/s), f16 {:.3} ms ({:.1} GB/s)",
                t32 * 1e3,
                (k * n * 4) as f64 / t32 / 1e9,
                t16 * 1e3,
                (k * n * 2) as f64 / t16 / 1e9,
                th * 1e3,
                (k * n * 2) as f64 / th / 1e9
            );
        }
        // a prefill chunk's linear: 512 rows x [2048, 6144], weights f32 / bf16 / f16 (panels)
        let m = 512;
        let x = crate::rng::uniform(m * k, 6);
        let time = |e: Elems<'_>| {
            best(|| drop(std::hint::black_box(panel::matmul(level, &x, e, m, k, n))))
        };
        let (t32, tb, th) = (
            time(Elems::F32(&w)),
            time(Elems::Bf16(&wb)),
            time(Elems::F16(&wh)),
        );
        let gf = |t: f64| (2 * m * k * n) as f64 / t / 1e9;
        // the reference: one call of gemm's f32 product over the whole f32 weight (what an f32
        // prefill chunk's linear runs)
        let whole = best(|| {
            let mut y = vec![0f32; m * n];
            // SAFETY: y is m x n (row stride n), x m x k (stride k), w k x n (stride n), separate
            // buffers; gemm writes only y's m x n elements (read_dst false).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    y.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
            std::hint::black_box(y);
        });
        println!(
            "whole-weight f32 gemm {m} x [{k}, {n}]: {:.2} ms ({:.0} GFLOP/s)",
            whole * 1e3,
            gf(whole)
        );
        println!(
            "panel matmul {m} x [{k}, {n}] {level}: f32 {:.2} ms ({:.0} GFLOP/s), bf16 {:.2} ms ({:.0}), f16 {:.2} ms ({:.0})",
            t32 * 1e3,
            gf(t32),
            tb * 1e3,
            gf(tb),
            th * 1e3,
            gf(th)
        );
        // attention: MHA (16 pairs x 1 row x 128) and absorbed MLA (1 pair x 16 rows x 576/512)
        for (g, rows, dk, dv, shared) in [(16, 1, 128, 128, false), (1, 16, 576, 512, true)] {
            let ctx = 8192;
            let (t32, t16, th) = time_attention(level, g, rows, dk, dv, ctx, ctx - 1, 1, shared);
            let bytes = |e: usize| (g * ctx * (dk + if shared { 0 } else { dv }) * e) as f64;
            println!(
                "attention g {g} rows {rows} dk {dk} dv {dv} ctx {ctx} {level}: f32 {:.3} ms ({:.1} GB/s), bf16 {:.3} ms ({:.1} GB/s), f16 {:.3} ms ({:.1} GB/s)",
                t32 * 1e3,
                bytes(4) / t32 / 1e9,
                t16 * 1e3,
                bytes(2) / t16 / 1e9,
                th * 1e3,
                bytes(2) / th / 1e9
            );
        }
    }

    /// Absorbed MLA's decode attention alone (16 heads x 576/512 on one latent, 8192 keys or
    /// `DSOPT_PROFILE_CTX`), five times, in GFLOP/s of its multiply-adds: the shape whose f16
    /// decode is bound by arithmetic (for `perf`; a short context keeps the cache in L2).
    #[test]
    #[ignore]
    fn absorbed_attention_timings() {
        let level = Level::current();
        let ctx: usize = std::env::var("DSOPT_PROFILE_CTX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192);
        let (rows, dk, dv) = (16, 576, 512);
        let flop = (2 * rows * ctx * (dk + dv)) as f64;
        for _ in 0..5 {
            let (t32, tb, th) = time_attention(level, 1, rows, dk, dv, ctx, ctx - 1, 1, true);
            println!(
                "absorbed attention {level}: f32 {:.3} ms ({:.0} GFLOP/s), bf16 {:.3} ms ({:.0}), f16 {:.3} ms ({:.0})",
                t32 * 1e3,
                flop / t32 / 1e9,
                tb * 1e3,
                flop / tb / 1e9,
                th * 1e3,
                flop / th / 1e9
            );
        }
    }

    /// One prefill chunk's attention (512 tokens at keys 3584..4096, MHA 16 x 128 and absorbed
    /// MLA 16 heads x 576/512 on one latent), in GFLOP/s of the causal work.
    #[test]
    #[ignore]
    fn prefill_attention_timings() {
        let level = Level::current();
        let (q_len, start) = (512, 3584);
        let ctx = start + q_len;
        for (g, heads, dk, dv, shared) in [(16, 1, 128, 128, false), (1, 16, 576, 512, true)] {
            let rows = heads * q_len;
            let (t32, t16, th) = time_attention(level, g, rows, dk, dv, ctx, start, q_len, shared);
            // keys seen per row: start + 1 .. start + q_len
            let seen = (start as f64 + (q_len as f64 + 1.0) / 2.0) * (g * rows) as f64;
            let flop = 2.0 * seen * (dk + dv) as f64;
            println!(
                "prefill attention g {g} rows {rows} dk {dk} dv {dv} keys {ctx} {level}: f32 {:.1} ms ({:.1} GFLOP/s), bf16 {:.1} ms ({:.1} GFLOP/s), f16 {:.1} ms ({:.1} GFLOP/s)",
                t32 * 1e3,
                flop / t32 / 1e9,
                t16 * 1e3,
                flop / t16 / 1e9,
                th * 1e3,
                flop / th / 1e9
            );
        }
    }

    /// Burn 0.21's own attention (`burn::tensor::module::attention`, burn-flex's flash path with
    /// causal masking) against dsopt's kernel on the same MHA shapes: one prefill chunk (512
    /// queries at keys 3584..4096) and one decode step (1 query, 8192 keys), 16 heads x 128.
    #[test]
    #[ignore]
    fn burn_attention_timings() {
        use burn::backend::Flex;
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        use burn::tensor::{DType, Tensor, TensorData};
        let level = Level::current();
        let dev = Default::default();
        let (g, d) = (16, 128);
        for (q_len, ctx) in [(512, 4096), (1, 8192)] {
            let q = crate::rng::uniform(g * q_len * d, 3);
            let kv = crate::rng::uniform(g * ctx * d, 4);
            let vv = crate::rng::uniform(g * ctx * d, 5);
            let t = |v: &Vec<f32>, n: usize| {
                Tensor::<Flex, 4>::from_data(TensorData::new(v.clone(), [1, g, n, d]), &dev)
            };
            let (tq, tk, tv) = (t(&q, q_len), t(&kv, ctx), t(&vv, ctx));
            let opts = AttentionModuleOptions {
                scale: Some(1.0),
                softcap: None,
                is_causal: true,
            };
            // dsopt's kernel on the same values (the shared timer draws them with the same seeds)
            let ours = time_attention(level, g, q_len, d, d, ctx, ctx - q_len, q_len, false);
            for dt in [DType::F32, DType::BF16] {
                let (bq, bk, bv) = (
                    tq.clone().cast(dt),
                    tk.clone().cast(dt),
                    tv.clone().cast(dt),
                );
                let burn_s = best(|| {
                    let o = attention(bq.clone(), bk.clone(), bv.clone(), None, None, opts);
                    std::hint::black_box(o.into_data());
                });
                let ours = if dt == DType::F32 { ours.0 } else { ours.1 };
                println!(
                    "MHA attention {q_len} queries x {ctx} keys {dt:?}: burn::tensor::module::attention {:.2} ms, dsopt kernel {:.2} ms ({level})",
                    burn_s * 1e3,
                    ours * 1e3
                );
            }
        }
    }
}

/// A cache line, bytes (x86-64; the prefetching kernels ask for one address per line).
pub(crate) const LINE_BYTES: usize = 64;

/// Asks the CPU to bring the cache line holding `s[at]` into its caches ahead of use (into L2 and
/// below: `prefetcht1`); nothing where `at` is past the end or on other architectures. Only a
/// hint: it changes no value.
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < s.len() {
        // SAFETY: `at` is in bounds, so the pointer is inside `s`'s allocation; a prefetch reads
        // nothing architecturally visible and cannot fault (SSE, part of every x86-64 CPU).
        unsafe {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>(s.as_ptr().add(at).cast::<i8>());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, at);
}
