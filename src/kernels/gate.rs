//! SwiGLU 的门 `silu(a) · b` 一遍完成，以及 softmax 用的快速 `exp`。
//!
//! Burn's `silu(a) * b` is four element-wise passes with libm's `expf`; measured 39 us for
//! 8 x 4 x 384 elements here, about a fifth of a verify step's FFN.

use pulp::{Simd, WithSimd};

use super::Level;

/// `exp(x)` for `x <= 0` (scores minus their running max), relative error below 2e-6 for
/// `x >= -20` (below 1e-5 down to -87, where the f32 product `x·log2(e)` limits it): `2^t`
/// with `t = x·log2(e)` split into an integer (the exponent bits) and a fraction in
/// [-0.5, 0.5] (a degree-6 polynomial). Branch-free, so the loops that call it vectorise
/// (libm's `expf` is a call per element).
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let t = (x * std::f32::consts::LOG2_E).max(-126.0);
    let n = (t + 0.5).floor();
    let f = t - n;
    // 2^f = exp(f·ln 2): Taylor coefficients (ln 2)^k / k!
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp_neg`] on a vector: the same polynomial, the integer part taken by rounding to nearest
/// with the 1.5·2^23 shift (the scalar version floors `t + 0.5`: they differ only where `t` is
/// a half-integer, both within the polynomial's range), the exponent bits from the shifted sum.
#[inline(always)]
pub(crate) fn exp_neg_simd<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let splat = |v: f32| simd.splat_f32s(v);
    let t = simd.max_f32s(
        simd.mul_f32s(x, splat(std::f32::consts::LOG2_E)),
        splat(-126.0),
    );
    // 1.5·2^23 + 127: r's low mantissa bits hold round(t) + 127
    const SHIFT: f32 = 12_583_039.0;
    let r = simd.add_f32s(t, splat(SHIFT));
    let n = simd.sub_f32s(r, splat(SHIFT));
    let f = simd.sub_f32s(t, n);
    let mut p = splat(0.000_154_035_3);
    for c in [
        0.001_333_355_8,
        0.009_618_129,
        0.055_504_11,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ] {
        p = simd.mul_add_f32s(p, f, splat(c));
    }
    let scale = simd.wrapping_dyn_shl_u32s(simd.transmute_u32s_f32s(r), simd.splat_u32s(23));
    simd.mul_f32s(p, simd.transmute_f32s_u32s(scale))
}

/// `out = a · sigmoid(a) · b` element-wise at `level` (all three the same length).
pub fn swiglu(level: Level, a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(
        a.len() == b.len() && a.len() == out.len(),
        "swiglu: lengths differ"
    );
    level.run(Gate { a, b, out });
}

struct Gate<'a> {
    a: &'a [f32],
    b: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for Gate<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        for ((o, &x), &y) in self.out.iter_mut().zip(self.a).zip(self.b) {
            // sigmoid from exp(-|x|) <= 1: no overflow on either side
            let e = exp_neg(-x.abs());
            let s = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
            *o = x * s * y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_range_softmax_uses() {
        let worst = |lo: f32, hi: f32| {
            let mut w = 0f64;
            for i in 0..=20000 {
                let x = hi + (lo - hi) * i as f32 / 20000.0;
                let want = (x as f64).exp();
                w = w.max(((exp_neg(x) as f64 - want) / want).abs());
            }
            w
        };
        assert!(worst(-20.0, 0.0) < 2e-6, "{}", worst(-20.0, 0.0));
        assert!(worst(-87.0, -20.0) < 1e-5, "{}", worst(-87.0, -20.0));
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37);
    }

    #[test]
    fn the_vector_exp_agrees_with_the_scalar_one_at_every_level() {
        struct Exp<'a>(&'a [f32], &'a mut [f32]);
        impl WithSimd for Exp<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: Simd>(self, simd: S) {
                let (xs, _) = S::as_simd_f32s(self.0);
                let (ys, _) = S::as_mut_simd_f32s(self.1);
                for (y, x) in ys.iter_mut().zip(xs) {
                    *y = exp_neg_simd(simd, *x);
                }
            }
        }
        // -1000 .. 0 with every half-integer of log2 on the way, a multiple of every width
        let xs: Vec<f32> = (0..4096)
            .map(|i| -(i as f32) * 0.0173 - (i % 7) as f32 * 20.0)
            .collect();
        for level in Level::available() {
            let mut ys = vec![0f32; xs.len()];
            level.run(Exp(&xs, &mut ys));
            for (x, y) in xs.iter().zip(&ys) {
                let want = exp_neg(*x);
                assert!(
                    (y - want).abs() <= 2e-6 * want.max(1e-30) || (*x < -87.0 && *y < 1e-37),
                    "{level} exp({x}) = {y}, scalar {want}"
                );
            }
        }
    }

    #[test]
    fn the_gate_is_silu_times_b_at_every_level() {
        let n = 3 * 5 * 37;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let b = crate::rng::uniform(n, 4);
        for level in Level::available() {
            let mut out = vec![0f32; n];
            swiglu(level, &a, &b, &mut out);
            for i in 0..n {
                let x = a[i] as f64;
                let want = x / (1.0 + (-x).exp()) * b[i] as f64;
                assert!(
                    (out[i] as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{level} {i}"
                );
            }
        }
    }
}
