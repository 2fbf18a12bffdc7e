//! 读带宽测量用的求和循环（屋顶线的读上限）。
//!
//! A plain wrapping sum, which LLVM vectorises with contiguous loads into several independent
//! vector accumulators, so the loop is bound by loads, not by the add latency; compiled per
//! level (the build's baseline is SSE2, whose narrower loads left about a fifth of the bandwidth
//! unread here: a decode step then ran "above" the limit).
//!
//! Measured (2-core AMD EPYC, 2026-12-07, `read_probe`): 512 MiB on two threads 24.6-36.4 GB/s,
//! one thread 19.2-21.1; a 16 MiB buffer (in the 32 MiB L3) 170 GB/s. The loop before (sixteen
//! scalar accumulators over chunks of 16, vectorised by LLVM across the chunks with `vpgatherdq`)
//! read 7.5-8.3 GB/s there at every size, so every report on that machine set its decode speeds
//! against a limit about 3.5 times too low ("above the measured limit").

use pulp::{Simd, WithSimd};

use super::Level;

/// The wrapping sum of `x` at `level`.
pub fn sum_words(level: Level, x: &[u64]) -> u64 {
    level.run(Sum { x })
}

struct Sum<'a> {
    x: &'a [u64],
}

impl WithSimd for Sum<'_> {
    type Output = u64;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> u64 {
        // a plain reduction: LLVM vectorises it with contiguous loads into several vector
        // accumulators. (Sixteen scalar accumulators over chunks of 16 were vectorised across
        // the chunks instead, with gathers at a 128-byte stride: 4 GB/s per thread on AMD
        // EPYC, where gathers are slow, so the "read limit" measured the gathers, not memory.)
        self.x.iter().fold(0u64, |a, v| a.wrapping_add(*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_at_every_level() {
        let x: Vec<u64> = (0..1000u64).map(|i| i * 3 + u64::MAX / 7).collect();
        let want = x.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        for level in Level::available() {
            assert_eq!(sum_words(level, &x), want, "{level}");
            assert_eq!(
                sum_words(level, &x[..13]),
                x[..13].iter().fold(0u64, |a, v| a.wrapping_add(*v))
            );
        }
    }
}
