//! 逐元素运算（残差相加、SwiGLU 门、乘标量）：输入按存储精度读取，在 f32 中计算，结果只收窄一次；
//! 大的张量按块分到 rayon 池上，每块在 L1 里加宽、计算、收窄。
//!
//! Why: in half precision burn-flex 0.21 adds two tensors element by element through `half`'s
//! scalar conversions, on the calling thread (perf, f16 prefill of 8192 tokens at
//! `scenarios/sc001-mla.toml`'s dimensions, one layer: the residual adds 84-96 ms against 7 ms
//! in f32), and the gate used to widen both inputs whole, compute, and narrow the whole result,
//! all on one thread while the pool waited. Results are what Burn's ops give: f32 sums, rounded
//! once to the output's type (nearest, ties to even).

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::convert::{self, Elems, Stored, PAR_ELEMS};
use super::{gate, Level};

/// Elements per block (three f32 blocks of 16 KiB stay in L1).
const CHUNK: usize = 4096;

/// An element-wise operation of two inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `a + b`.
    Add,
    /// `silu(a) · b` ([`gate::swiglu`]).
    SwiGlu,
}

/// `out = op(a, b)` element by element at `level` (all three the same length; any storage type
/// each), computed in f32 and rounded once into `out`'s type; split over the rayon pool from
/// [`PAR_ELEMS`] elements.
pub fn binary(level: Level, op: Op, a: Elems<'_>, b: Elems<'_>, out: Stored<'_>) {
    let n = out.len();
    assert!(
        a.len() == n && b.len() == n,
        "eltwise: lengths differ ({}, {}, {n})",
        a.len(),
        b.len()
    );
    blocks(level, out, |bufs, at, m, y| {
        let Bufs { a: ba, b: bb, .. } = bufs;
        let xa = widened(level, a.sub(at, m), ba);
        let xb = widened(level, b.sub(at, m), bb);
        match op {
            Op::Add => level.run(AddBody {
                a: xa,
                b: xb,
                out: y,
            }),
            Op::SwiGlu => gate::swiglu(level, xa, xb, y),
        }
    });
}

/// `out = x · s` element by element at `level` (the product in f32, rounded once into `out`'s
/// type; callers that must match a half-precision scalar product round `s` to that type first);
/// split over the rayon pool from [`PAR_ELEMS`] elements.
pub fn scale(level: Level, x: Elems<'_>, s: f32, out: Stored<'_>) {
    let n = out.len();
    assert!(x.len() == n, "eltwise: lengths differ ({}, {n})", x.len());
    blocks(level, out, |bufs, at, m, y| {
        let xa = widened(level, x.sub(at, m), &mut bufs.a);
        level.run(ScaleBody { x: xa, s, out: y });
    });
}

/// Runs `f(bufs, at, m, y)` for every block of `out` (`at..at + m`), `y` the block's f32 result:
/// `out` itself where it is f32, else scratch narrowed into `out` afterwards; on the pool from
/// [`PAR_ELEMS`] elements.
fn blocks<F>(level: Level, mut out: Stored<'_>, f: F)
where
    F: Fn(&mut Bufs, usize, usize, &mut [f32]) + Sync,
{
    let n = out.len();
    let parts = out.chunks(CHUNK);
    let block = |bufs: &mut Bufs, (i, o): (usize, Stored<'_>)| {
        let (at, m) = (i * CHUNK, o.len());
        match o {
            Stored::F32(d) => f(bufs, at, m, d),
            o => {
                let mut y = std::mem::take(&mut bufs.out);
                f(bufs, at, m, &mut y[..m]);
                convert::narrow(level, &y[..m], o);
                bufs.out = y;
            }
        }
    };
    if n < PAR_ELEMS {
        let mut bufs = Bufs::new();
        parts
            .into_iter()
            .enumerate()
            .for_each(|p| block(&mut bufs, p));
    } else {
        parts
            .into_par_iter()
            .enumerate()
            .for_each_init(Bufs::new, block);
    }
}

/// One block's f32 scratch: both inputs widened and the result before narrowing.
struct Bufs {
    a: Vec<f32>,
    b: Vec<f32>,
    out: Vec<f32>,
}

impl Bufs {
    fn new() -> Self {
        Bufs {
            a: vec![0.0; CHUNK],
            b: vec![0.0; CHUNK],
            out: vec![0.0; CHUNK],
        }
    }
}

/// `src` as f32: the slice itself where it is f32, else widened into `buf`.
fn widened<'a>(level: Level, src: Elems<'a>, buf: &'a mut [f32]) -> &'a [f32] {
    match src {
        Elems::F32(s) => s,
        e => {
            let d = &mut buf[..e.len()];
            convert::widen(level, e, d);
            d
        }
    }
}

struct AddBody<'a> {
    a: &'a [f32],
    b: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for AddBody<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        // a plain loop, inlined into the level's compiled body, where it vectorises
        for ((o, x), y) in self.out.iter_mut().zip(self.a).zip(self.b) {
            *o = x + y;
        }
    }
}

struct ScaleBody<'a> {
    x: &'a [f32],
    s: f32,
    out: &'a mut [f32],
}

impl WithSimd for ScaleBody<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        for (o, x) in self.out.iter_mut().zip(self.x) {
            *o = x * self.s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Every storage type of inputs and output, lengths with tails, below and above the split:
    /// the f32 result of the widened inputs rounded once, bit for bit (the sum in f32 is exact to
    /// the bit; the gate is the f32 kernel's).
    #[test]
    fn every_storage_type_gives_the_f32_result_rounded_once() {
        for level in Level::available() {
            for n in [0, 1, 17, CHUNK + 3, PAR_ELEMS + CHUNK / 2 + 5] {
                let xa: Vec<f32> = crate::rng::uniform(n, 3).iter().map(|v| v * 9.0).collect();
                let xb: Vec<f32> = crate::rng::uniform(n, 4).iter().map(|v| v * 9.0).collect();
                let ha: Vec<f16> = xa.iter().map(|&v| f16::from_f32(v)).collect();
                let hb: Vec<f16> = xb.iter().map(|&v| f16::from_f32(v)).collect();
                let ba: Vec<bf16> = xa.iter().map(|&v| bf16::from_f32(v)).collect();
                let bb: Vec<bf16> = xb.iter().map(|&v| bf16::from_f32(v)).collect();
                let inputs = [
                    (Elems::F32(&xa), Elems::F32(&xb)),
                    (Elems::F16(&ha), Elems::F16(&hb)),
                    (Elems::Bf16(&ba), Elems::Bf16(&bb)),
                    (Elems::F32(&xa), Elems::Bf16(&bb)),
                ];
                for op in [Op::Add, Op::SwiGlu] {
                    for (a, b) in inputs {
                        let (wa, wb) = (convert::to_f32(level, a), convert::to_f32(level, b));
                        let mut want = vec![0f32; n];
                        match op {
                            Op::Add => want
                                .iter_mut()
                                .zip(wa.iter().zip(&wb))
                                .for_each(|(o, (x, y))| *o = x + y),
                            Op::SwiGlu => gate::swiglu(level, &wa, &wb, &mut want),
                        }
                        let mut f = vec![0f32; n];
                        let mut h = vec![f16::ZERO; n];
                        let mut g = vec![bf16::ZERO; n];
                        binary(level, op, a, b, Stored::F32(&mut f));
                        binary(level, op, a, b, Stored::F16(&mut h));
                        binary(level, op, a, b, Stored::Bf16(&mut g));
                        for i in 0..n {
                            let ctx = || format!("{level} {op:?} n={n} [{i}]");
                            assert_eq!(f[i].to_bits(), want[i].to_bits(), "{}", ctx());
                            let (wh, wg) = (f16::from_f32(want[i]), bf16::from_f32(want[i]));
                            assert_eq!(h[i].to_bits(), wh.to_bits(), "{}", ctx());
                            assert_eq!(g[i].to_bits(), wg.to_bits(), "{}", ctx());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scaling_gives_the_f32_product_rounded_once() {
        for level in Level::available() {
            for n in [0, 5, CHUNK + 1, PAR_ELEMS + 77] {
                let x: Vec<f32> = crate::rng::uniform(n, 6).iter().map(|v| v * 90.0).collect();
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                let s = 0.0884f32;
                let (mut f, mut g) = (vec![0f32; n], vec![f16::ZERO; n]);
                scale(level, Elems::F32(&x), s, Stored::F32(&mut f));
                scale(level, Elems::F16(&h), s, Stored::F16(&mut g));
                for i in 0..n {
                    assert_eq!(f[i].to_bits(), (x[i] * s).to_bits(), "{level} n={n} [{i}]");
                    let w = f16::from_f32(h[i].to_f32() * s);
                    assert_eq!(g[i].to_bits(), w.to_bits(), "{level} n={n} [{i}]");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn inputs_of_other_lengths_are_refused() {
        let (a, b) = ([1f32; 3], [1f32; 4]);
        let mut o = [0f32; 3];
        binary(
            Level::Scalar,
            Op::Add,
            Elems::F32(&a),
            Elems::F32(&b),
            Stored::F32(&mut o),
        );
    }
}
