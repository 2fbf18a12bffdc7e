//! 读带宽测量用的求和循环（屋顶线的读上限）。
//!
//! Independent accumulators, so the loop is bound by loads, not by the add latency; compiled per
//! level (the build's baseline is SSE2, whose narrower loads left about a fifth of the bandwidth
//! unread here: a decode step then ran "above" the limit).

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
        let mut acc = [0u64; 16];
        let mut it = self.x.chunks_exact(16);
        for c in &mut it {
            for (a, v) in acc.iter_mut().zip(c) {
                *a = a.wrapping_add(*v);
            }
        }
        let tail: u64 = it.remainder().iter().fold(0, |a, v| a.wrapping_add(*v));
        acc.iter().fold(tail, |a, v| a.wrapping_add(*v))
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
