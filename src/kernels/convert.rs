//! 半精度与 f32 之间的转换：按块加宽到 f32（留在 L1/L2 中供其它内核读取）与收窄输出。
//!
//! bf16 -> f32 is a 16-bit shift; f16 -> f32 is the conversion instruction on AVX-512
//! (`vcvtph2ps`, through pulp's `V4` token) and elsewhere integer operations on the bits (the
//! exponent re-biased by one multiplication by 2^112, which also normalises subnormals; infinities
//! and NaNs get their exponent restored), a loop that vectorises at every level; on AVX2 F16C's
//! 256-bit `vcvtph2ps` (pulp's AVX2 level does not enable `f16c`: [`Level::run`] compiles that
//! level's bodies with it).
//!
//! [`Level::run`]: super::Level
//! Narrowing rounds to nearest, ties to even (what `half` and PyTorch do).

use half::{bf16, f16};
use pulp::{Simd, WithSimd};

use super::Level;

/// A row of elements as they are stored.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    /// f32.
    F32(&'a [f32]),
    /// IEEE half precision.
    F16(&'a [f16]),
    /// bfloat16.
    Bf16(&'a [bf16]),
}

impl<'a> Elems<'a> {
    /// Elements `at..at + n`.
    pub fn sub(&self, at: usize, n: usize) -> Elems<'a> {
        match *self {
            Elems::F32(s) => Elems::F32(&s[at..at + n]),
            Elems::F16(s) => Elems::F16(&s[at..at + n]),
            Elems::Bf16(s) => Elems::Bf16(&s[at..at + n]),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::Bf16(s) => s.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// f16 bits to f32, branch-free (see the module's notes).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // 2^112 re-biases the exponent (15 -> 127) and normalises subnormals exactly
    let v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let inf_nan = if em >= 0x7c00 { 0x7f80_0000 } else { 0 };
    f32::from_bits(v.to_bits() | inf_nan | sign)
}

/// bf16 bits to f32.
#[inline(always)]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Widens `src` into `dst` (same length) at `level`.
pub fn widen(level: Level, src: Elems<'_>, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    level.run(Widen { src, dst });
}

struct Widen<'a, 'b> {
    src: Elems<'a>,
    dst: &'b mut [f32],
}

impl WithSimd for Widen<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        widen_simd(simd, self.src, self.dst);
    }
}

/// [`widen_body`] at level `S`, with f16 on AVX-512 and AVX2 through the conversion instructions (two
/// vectors at a time, [`Format::pair`]; the tail by the portable loop).
#[inline(always)]
pub(crate) fn widen_simd<S: Simd>(simd: S, src: Elems<'_>, dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    match src {
        Elems::F16(s) if !F16::permuted::<S>() => {
            use half::slice::HalfFloatSliceExt;
            let bits: &[u16] = s.reinterpret_cast();
            let width = 2 * S::F32_LANES;
            let full = s.len() - s.len() % width;
            for (c, d) in dst[..full].chunks_exact_mut(width).enumerate() {
                let (a, b) = F16::pair(simd, bits, c * width);
                let (dv, _) = S::as_mut_simd_f32s(d);
                dv[0] = a;
                dv[1] = b;
            }
            widen_body(Elems::F16(&s[full..]), &mut dst[full..]);
        }
        _ => widen_body(src, dst),
    }
}

/// The loops (inlined into each level's compiled body, where they vectorise).
#[inline(always)]
pub(crate) fn widen_body(src: Elems<'_>, dst: &mut [f32]) {
    match src {
        Elems::F32(s) => dst.copy_from_slice(s),
        Elems::F16(s) => {
            for (d, v) in dst.iter_mut().zip(s) {
                *d = f16_bits_to_f32(v.to_bits());
            }
        }
        Elems::Bf16(s) => {
            for (d, v) in dst.iter_mut().zip(s) {
                *d = bf16_bits_to_f32(v.to_bits());
            }
        }
    }
}

/// Elements from which a conversion is split over the rayon pool (a prefill chunk's activations:
/// narrowing or widening them on one thread left the pool idle; below this, one call is cheaper
/// than the split).
pub const PAR_ELEMS: usize = 1 << 16;

/// Elements per pool task of a split conversion (64 KiB of f32).
const PAR_CHUNK: usize = 1 << 14;

/// f32 values narrowed to f16 at `level` (nearest, ties to even, as `half` does): the conversion
/// instruction on AVX-512 and AVX2 (`vcvtps2ph`, 16 or 8 values at a time), `half`'s conversion
/// elsewhere and for the tail. Split over the rayon pool from [`PAR_ELEMS`] values.
pub fn to_f16(level: Level, x: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; x.len()];
    narrow(level, x, Stored::F16(&mut out));
    out
}

/// f32 values narrowed to bf16 at `level` (nearest, ties to even; a NaN stays a NaN, quietened:
/// bit for bit what `half` gives), by integer operations that vectorise at every level. Split
/// over the rayon pool from [`PAR_ELEMS`] values.
pub fn to_bf16(level: Level, x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    narrow(level, x, Stored::Bf16(&mut out));
    out
}

/// A destination of elements in one storage type.
#[derive(Debug)]
pub enum Stored<'a> {
    /// f32.
    F32(&'a mut [f32]),
    /// IEEE half precision.
    F16(&'a mut [f16]),
    /// bfloat16.
    Bf16(&'a mut [bf16]),
}

impl Stored<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Stored::F32(s) => s.len(),
            Stored::F16(s) => s.len(),
            Stored::Bf16(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The destination cut into pieces of `n` elements (the last may be shorter).
    pub fn chunks(&mut self, n: usize) -> Vec<Stored<'_>> {
        match self {
            Stored::F32(s) => s.chunks_mut(n).map(Stored::F32).collect(),
            Stored::F16(s) => s.chunks_mut(n).map(Stored::F16).collect(),
            Stored::Bf16(s) => s.chunks_mut(n).map(Stored::Bf16).collect(),
        }
    }
}

/// `src` narrowed (or copied, for f32) into `dst` (same length) at `level`: nearest, ties to even,
/// as [`to_f16`] and [`to_bf16`]; split over the rayon pool from [`PAR_ELEMS`] values.
pub fn narrow(level: Level, src: &[f32], mut dst: Stored<'_>) {
    use rayon::prelude::*;
    assert_eq!(src.len(), dst.len(), "narrow: lengths differ");
    if src.len() < PAR_ELEMS {
        return narrow_one(level, src, dst);
    }
    dst.chunks(PAR_CHUNK)
        .into_par_iter()
        .enumerate()
        .for_each(|(i, d)| narrow_one(level, &src[i * PAR_CHUNK..][..d.len()], d));
}

/// [`narrow`] on the calling thread.
fn narrow_one(level: Level, src: &[f32], dst: Stored<'_>) {
    match dst {
        Stored::F32(d) => d.copy_from_slice(src),
        Stored::F16(dst) => level.run(NarrowF16 { src, dst }),
        Stored::Bf16(dst) => level.run(NarrowBf16 { src, dst }),
    }
}

/// f32 bits rounded to bf16 bits: nearest, ties to even (adding `0x7fff` plus the kept part's
/// lowest bit carries exactly when the dropped half is above a half, or a half with an odd kept
/// part); a NaN keeps its top bits, quietened. `half::bf16::from_f32`'s rule, branch-free.
#[inline(always)]
pub fn bf16_round_bits(x: u32) -> u16 {
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        ((x >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

struct NarrowBf16<'a, 'b> {
    src: &'a [f32],
    dst: &'b mut [bf16],
}

impl WithSimd for NarrowBf16<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        // a plain loop, inlined into the level's compiled body, where it vectorises
        for (d, v) in self.dst.iter_mut().zip(self.src) {
            *d = bf16::from_bits(bf16_round_bits(v.to_bits()));
        }
    }
}

struct NarrowF16<'a, 'b> {
    src: &'a [f32],
    dst: &'b mut [f16],
}

impl WithSimd for NarrowF16<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let NarrowF16 { src, dst } = self;
        #[allow(unused_mut)] // assigned on x86-64 only
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        {
            use half::slice::HalfFloatSliceExt;
            let bits: &mut [u16] = dst.reinterpret_cast_mut();
            if is_v4::<S>() {
                done = src.len() / 16 * 16;
                for (s, d) in src[..done].chunks_exact(16).zip(bits.chunks_exact_mut(16)) {
                    // SAFETY: `S` is pulp's `V4` (checked), whose token exists only on a CPU with
                    // AVX-512F, the feature `f16x16_v4` needs.
                    unsafe { f16x16_v4(s, d) };
                }
            } else if is_v3::<S>() {
                done = src.len() / 8 * 8;
                for (s, d) in src[..done].chunks_exact(8).zip(bits.chunks_exact_mut(8)) {
                    // SAFETY: `V3` code runs only through `Level::run`, which requires F16C (and
                    // `V3`'s AVX) on this CPU.
                    unsafe { f16x8_v3(s, d) };
                }
            }
        }
        for (d, v) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = f16::from_f32(*v);
        }
    }
}

/// 16 f32 to f16 bits by AVX-512F's `vcvtps2ph` (nearest, ties to even).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn f16x16_v4(src: &[f32], dst: &mut [u16]) {
    use core::arch::x86_64::*;
    assert!(src.len() >= 16 && dst.len() >= 16);
    // SAFETY: 16 f32 (64 bytes) read from and 16 u16 (32 bytes) written to bounds-checked
    // slices of at least that length; unaligned accesses of plain bits.
    unsafe {
        let v = std::ptr::read_unaligned(src.as_ptr() as *const __m512);
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        std::ptr::write_unaligned(dst.as_mut_ptr() as *mut __m256i, h);
    }
}

/// 8 f32 to f16 bits by F16C's `vcvtps2ph` (nearest, ties to even).
///
/// # Safety
/// The CPU must have AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx,f16c")]
fn f16x8_v3(src: &[f32], dst: &mut [u16]) {
    use core::arch::x86_64::*;
    assert!(src.len() >= 8 && dst.len() >= 8);
    // SAFETY: 8 f32 (32 bytes) read from and 8 u16 (16 bytes) written to bounds-checked slices
    // of at least that length; unaligned accesses of plain bits.
    unsafe {
        let v = std::ptr::read_unaligned(src.as_ptr() as *const __m256);
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        std::ptr::write_unaligned(dst.as_mut_ptr() as *mut __m128i, h);
    }
}

/// `src` widened to a new f32 vector (split over the rayon pool from [`PAR_ELEMS`] values).
pub fn to_f32(level: Level, src: Elems<'_>) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    if src.len() < PAR_ELEMS {
        widen(level, src, &mut out);
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(i, d)| widen(level, src.sub(i * PAR_CHUNK, d.len()), d));
    }
    out
}

/// How weights are stored and read two vectors at a time.
pub(crate) trait Format {
    /// The stored element.
    type Elem: Copy;
    /// Whether [`Format::pair`] at level `S` returns the even and the odd elements (else
    /// consecutive ones).
    fn permuted<S: Simd>() -> bool;
    /// Whether a block of values read by many rows is better widened once into f32 than in
    /// registers at every use: true for f16 (the prefill attention's values: f16 1.18-1.29x
    /// slower than bf16 when widened at every use through `vpmovdw` + `vcvtph2ps`, equal when
    /// widened once; with one `vcvtph2ps` per vector, 2026-12-07, widening once still gave
    /// 87.7-88.8 ms against 95.3-95.5 for MHA's 512-row chunk, and the same for absorbed MLA);
    /// false for bf16 (a shift: widening once was 4-10 % slower, the f32 copy's loads cost more
    /// than the shift).
    const WIDEN_BLOCKS: bool = false;
    /// The `2 · F32_LANES` elements from `w[at..]` as two f32 vectors: elements `0..L` and
    /// `L..2L` (f32; f16 on AVX-512 and AVX2, by the conversion instructions), or the even and the
    /// odd elements (bf16, and f16 at the scalar and NEON levels: one load of `L` 32-bit words,
    /// widened in registers); [`Format::permuted`] says which.
    fn pair<S: Simd>(simd: S, w: &[Self::Elem], at: usize) -> (S::f32s, S::f32s);
    /// One element as f32.
    fn one(v: Self::Elem) -> f32;
    /// The storage of `e` when it is of this format.
    fn slice(e: Elems<'_>) -> Option<&[Self::Elem]>;
}

/// f32 storage.
pub(crate) struct F32;
/// bfloat16 storage (as bits).
pub(crate) struct Bf16;
/// IEEE half storage (as bits).
pub(crate) struct F16;

impl Format for F32 {
    type Elem = f32;
    #[inline(always)]
    fn permuted<S: Simd>() -> bool {
        false
    }
    #[inline(always)]
    fn pair<S: Simd>(_simd: S, w: &[f32], at: usize) -> (S::f32s, S::f32s) {
        let (v, _) = S::as_simd_f32s(&w[at..at + 2 * S::F32_LANES]);
        (v[0], v[1])
    }
    #[inline(always)]
    fn one(v: f32) -> f32 {
        v
    }
    fn slice(e: Elems<'_>) -> Option<&[f32]> {
        match e {
            Elems::F32(s) => Some(s),
            _ => None,
        }
    }
}

/// `2 · U32_LANES` 16-bit values from `w[at..]` as `U32_LANES` 32-bit words (little-endian: the
/// even element in the low half).
#[inline(always)]
fn words<S: Simd>(w: &[u16], at: usize) -> S::u32s {
    let src = &w[at..at + 2 * S::U32_LANES];
    // SAFETY: `src` holds 2·U32_LANES u16 = size_of::<S::u32s>() bytes (the slice above is
    // bounds-checked); `read_unaligned` has no alignment requirement, and `S::u32s` is `Pod`
    // (every bit pattern is a value).
    unsafe { std::ptr::read_unaligned(src.as_ptr() as *const S::u32s) }
}

impl Format for Bf16 {
    type Elem = u16;
    #[inline(always)]
    fn permuted<S: Simd>() -> bool {
        true
    }
    #[inline(always)]
    fn pair<S: Simd>(simd: S, w: &[u16], at: usize) -> (S::f32s, S::f32s) {
        let x = words::<S>(w, at);
        let even = simd.wrapping_dyn_shl_u32s(x, simd.splat_u32s(16));
        let odd = simd.and_u32s(x, simd.splat_u32s(0xffff_0000));
        (
            simd.transmute_f32s_u32s(even),
            simd.transmute_f32s_u32s(odd),
        )
    }
    #[inline(always)]
    fn one(v: u16) -> f32 {
        bf16_bits_to_f32(v)
    }
    fn slice(e: Elems<'_>) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        match e {
            Elems::Bf16(s) => Some(s.reinterpret_cast()),
            _ => None,
        }
    }
}

/// f16 bits in the low half of each word to f32 ([`f16_bits_to_f32`], lane-wise).
#[inline(always)]
fn f16s<S: Simd>(simd: S, h: S::u32s) -> S::f32s {
    let splat = |v: u32| simd.splat_u32s(v);
    let em = simd.and_u32s(h, splat(0x7fff));
    let v = simd.mul_f32s(
        simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(em, splat(13))),
        simd.splat_f32s(f32::from_bits(0x7780_0000)),
    );
    let inf_nan = simd.select_u32s(
        simd.greater_than_or_equal_u32s(em, splat(0x7c00)),
        splat(0x7f80_0000),
        splat(0),
    );
    let sign = simd.wrapping_dyn_shl_u32s(simd.and_u32s(h, splat(0x8000)), splat(16));
    let bits = simd.or_u32s(simd.or_u32s(simd.transmute_u32s_f32s(v), inf_nan), sign);
    simd.transmute_f32s_u32s(bits)
}

/// The f16 values `w[at..at + 16]` and `w[at + 16..at + 32]` widened by the conversion
/// instruction of AVX-512F (`vcvtph2ps` from memory): two instructions for 32 values, in their
/// own order (the even/odd split through `vpmovdw` took five, the portable integer path about
/// twenty).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn f16_pair_v4(
    v4: pulp::x86::V4,
    w: &[u16],
    at: usize,
) -> (core::arch::x86_64::__m512, core::arch::x86_64::__m512) {
    use core::arch::x86_64::__m256i;
    let src = &w[at..at + 32];
    // SAFETY: `src` holds 32 u16 = 64 bytes (bounds-checked slice), two `__m256i` of 32 bytes
    // each at offsets 0 and 16 elements; `read_unaligned` has no alignment requirement and every
    // bit pattern is an `__m256i`.
    let (lo, hi): (__m256i, __m256i) = unsafe {
        let p = src.as_ptr() as *const __m256i;
        (
            std::ptr::read_unaligned(p),
            std::ptr::read_unaligned(p.add(1)),
        )
    };
    let f = v4.avx512f;
    (f._mm512_cvtph_ps(lo), f._mm512_cvtph_ps(hi))
}

/// The f16 values `w[at..at + 8]` and `w[at + 8..at + 16]` widened by F16C's `vcvtph2ps`
/// (256-bit), for pulp's AVX2 level: reached only through [`Level::run`], whose AVX2 body is
/// compiled with F16C (`avx2_f16c`), so the call is inlined there.
///
/// # Safety
/// The CPU must have AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx,f16c")]
fn f16_pair_v3(w: &[u16], at: usize) -> (core::arch::x86_64::__m256, core::arch::x86_64::__m256) {
    use core::arch::x86_64::{__m128i, _mm256_cvtph_ps};
    let src = &w[at..at + 16];
    // SAFETY: `src` holds 16 u16 = 32 bytes (bounds-checked slice), two `__m128i` of 16 bytes
    // each at offsets 0 and 8 elements; `read_unaligned` has no alignment requirement and every
    // bit pattern is an `__m128i`.
    let (lo, hi): (__m128i, __m128i) = unsafe {
        let p = src.as_ptr() as *const __m128i;
        (
            std::ptr::read_unaligned(p),
            std::ptr::read_unaligned(p.add(1)),
        )
    };
    (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
}

/// Whether `S` is AVX2 (pulp's `V3`), known when monomorphised.
#[inline(always)]
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(clippy::extra_unused_type_parameters)
)]
fn is_v3<S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V3>()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `S` is AVX-512 (pulp's `V4`), known when monomorphised.
#[inline(always)]
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(clippy::extra_unused_type_parameters)
)]
fn is_v4<S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Format for F16 {
    type Elem = u16;
    const WIDEN_BLOCKS: bool = true;
    /// Consecutive on AVX-512 and AVX2 (the conversion instructions), even/odd elsewhere (the
    /// integer path widens the low and the high halves of 32-bit words).
    #[inline(always)]
    fn permuted<S: Simd>() -> bool {
        !(is_v4::<S>() || is_v3::<S>())
    }
    #[inline(always)]
    fn pair<S: Simd>(simd: S, w: &[u16], at: usize) -> (S::f32s, S::f32s) {
        // AVX-512: the conversion instruction (the level's type is known when monomorphised,
        // so the check folds away)
        // (the same test as `permuted`, so the order it reports is the order given here)
        #[cfg(target_arch = "x86_64")]
        if is_v4::<S>() {
            let v4 = (&simd as &dyn std::any::Any)
                .downcast_ref::<pulp::x86::V4>()
                .expect("is_v4");
            let (first, second) = f16_pair_v4(*v4, w, at);
            const { assert!(size_of::<pulp::f32x16>() == size_of::<core::arch::x86_64::__m512>()) };
            // SAFETY: `S` is `V4` (checked above), whose `f32s` is `pulp::f32x16`: sixteen f32,
            // 64 bytes, the size of `__m512` (asserted at compile time); both are plain f32 lanes
            // with every bit pattern valid.
            return unsafe {
                (
                    std::mem::transmute_copy::<_, S::f32s>(&first),
                    std::mem::transmute_copy::<_, S::f32s>(&second),
                )
            };
        }
        // AVX2: F16C's conversion instruction (`Level::run` compiles the AVX2 body with F16C)
        #[cfg(target_arch = "x86_64")]
        if is_v3::<S>() {
            // SAFETY: `V3` code runs only through `Level::run`, which requires F16C (and
            // `V3`'s own features, AVX among them) on this CPU.
            let (first, second) = unsafe { f16_pair_v3(w, at) };
            const { assert!(size_of::<pulp::f32x8>() == size_of::<core::arch::x86_64::__m256>()) };
            // SAFETY: `S` is `V3` (checked above), whose `f32s` is `pulp::f32x8`: eight f32,
            // 32 bytes, the size of `__m256` (asserted at compile time); both are plain f32 lanes
            // with every bit pattern valid.
            return unsafe {
                (
                    std::mem::transmute_copy::<_, S::f32s>(&first),
                    std::mem::transmute_copy::<_, S::f32s>(&second),
                )
            };
        }
        let x = words::<S>(w, at);
        let lo = simd.and_u32s(x, simd.splat_u32s(0xffff));
        let hi = simd.wrapping_dyn_shr_u32s(x, simd.splat_u32s(16));
        (f16s(simd, lo), f16s(simd, hi))
    }
    #[inline(always)]
    fn one(v: u16) -> f32 {
        f16_bits_to_f32(v)
    }
    fn slice(e: Elems<'_>) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        match e {
            Elems::F16(s) => Some(s.reinterpret_cast()),
            _ => None,
        }
    }
}

/// Within each full block of `2·l` columns of each row of `y` (`rows x n`): column order to
/// "even columns, then odd ones" (`back`: the reverse).
pub(crate) fn permute_blocks(y: &mut [f32], rows: usize, n: usize, l: usize, back: bool) {
    let cols = 2 * l;
    let full = n - n % cols;
    let mut tmp = vec![0f32; cols];
    for r in 0..rows {
        for c in (0..full).step_by(cols) {
            let blk = &mut y[r * n + c..r * n + c + cols];
            tmp.copy_from_slice(blk);
            for i in 0..l {
                if back {
                    blk[2 * i] = tmp[i];
                    blk[2 * i + 1] = tmp[l + i];
                } else {
                    blk[i] = tmp[2 * i];
                    blk[l + i] = tmp[2 * i + 1];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Format::pair` at every level gives the stored values widened, in natural order or in the
    /// even/odd order of `permute_blocks`, exactly as `Format::permuted` says.
    #[test]
    fn pairs_come_in_the_order_permuted_reports_at_every_level() {
        struct Pairs<'a>(&'a [u16], bool);
        impl WithSimd for Pairs<'_> {
            type Output = (Vec<f32>, bool);
            #[inline(always)]
            fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
                let width = 2 * S::F32_LANES;
                let n = self.0.len() / width * width;
                let mut out = vec![0f32; n];
                for (c, d) in out.chunks_exact_mut(width).enumerate() {
                    let (a, b) = if self.1 {
                        F16::pair(simd, self.0, c * width)
                    } else {
                        Bf16::pair(simd, self.0, c * width)
                    };
                    let (dv, _) = S::as_mut_simd_f32s(d);
                    dv[0] = a;
                    dv[1] = b;
                }
                let permuted = if self.1 {
                    F16::permuted::<S>()
                } else {
                    Bf16::permuted::<S>()
                };
                (out, permuted)
            }
        }
        let xs: Vec<f32> = (0..96).map(|i| i as f32 * 0.25 - 7.0).collect();
        let h: Vec<u16> = xs.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        let b: Vec<u16> = xs.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        for level in Level::available() {
            for (bits, is_f16) in [(&h, true), (&b, false)] {
                let (got, permuted) = level.run(Pairs(bits, is_f16));
                let mut want = xs[..got.len()].to_vec();
                if permuted {
                    let l = level_lanes(level);
                    let n = want.len();
                    permute_blocks(&mut want, 1, n, l, false);
                }
                assert_eq!(got, want, "{level} f16 {is_f16} permuted {permuted}");
            }
        }
    }

    /// f32 lanes of `level`'s vectors.
    fn level_lanes(level: Level) -> usize {
        struct Lanes;
        impl WithSimd for Lanes {
            type Output = usize;
            fn with_simd<S: Simd>(self, _simd: S) -> usize {
                S::F32_LANES
            }
        }
        level.run(Lanes)
    }

    /// Narrowing at every level gives `half`'s bits (for an f16 NaN: a NaN), on special values, the
    /// rounding boundaries and random values, with lengths that leave tails.
    #[test]
    fn narrowing_matches_half_at_every_level() {
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-8,                        // an f16 subnormal
            1e-10,                       // below f16's range
            65504.0,                     // f16's largest
            65520.0,                     // rounds to f16 infinity
            f32::from_bits(0x3f80_8000), // a bf16 tie, even kept part
            f32::from_bits(0x3f81_8000), // a bf16 tie, odd kept part
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x3f80_7fff),
            f32::from_bits(0x7f7f_ffff), // rounds to bf16 infinity
            f32::from_bits(0x3f80_1000), // an f16 tie (1 + 2^-11)
            f32::from_bits(0x3f80_3000), // an f16 tie, odd kept part
        ];
        x.extend(crate::rng::uniform(1000, 7).iter().map(|v| v * 70000.0));
        x.extend(crate::rng::uniform(100, 8).iter().map(|v| v * 1e-6));
        for level in Level::available() {
            for len in [0, 1, 7, 8, 15, 16, 17, 33, x.len()] {
                let src = &x[..len];
                let h = to_f16(level, src);
                let b = to_bf16(level, src);
                for (i, v) in src.iter().enumerate() {
                    // half's software conversions (`from_f32` itself uses F16C where the CPU
                    // has it: the instruction under test)
                    let (wh, wb) = (f16::from_f32_const(*v), bf16::from_f32_const(*v));
                    if v.is_nan() {
                        assert!(h[i].is_nan() && b[i].is_nan(), "{level} NaN [{i}]");
                        assert_eq!(b[i].to_bits(), wb.to_bits(), "{level} bf16 NaN [{i}]");
                    } else {
                        assert_eq!(h[i].to_bits(), wh.to_bits(), "{level} f16 of {v:e} [{i}]");
                        assert_eq!(b[i].to_bits(), wb.to_bits(), "{level} bf16 of {v:e} [{i}]");
                    }
                }
            }
        }
    }

    /// Lengths from [`PAR_ELEMS`] are split over the pool: the same bits as one call per
    /// element, the last piece a short one.
    #[test]
    fn split_conversions_equal_the_elementwise_ones() {
        let n = PAR_ELEMS + PAR_CHUNK + 13;
        let x: Vec<f32> = crate::rng::uniform(n, 9).iter().map(|v| v * 3e4).collect();
        for level in Level::available() {
            let (h, b) = (to_f16(level, &x), to_bf16(level, &x));
            let mut f = vec![0f32; n];
            narrow(level, &x, Stored::F32(&mut f));
            assert_eq!(f, x, "{level}");
            for i in 0..n {
                assert_eq!(
                    h[i].to_bits(),
                    f16::from_f32_const(x[i]).to_bits(),
                    "{level} [{i}]"
                );
                assert_eq!(
                    b[i].to_bits(),
                    bf16::from_f32_const(x[i]).to_bits(),
                    "{level} [{i}]"
                );
            }
            let (wh, wb) = (
                to_f32(level, Elems::F16(&h)),
                to_f32(level, Elems::Bf16(&b)),
            );
            for i in 0..n {
                assert_eq!(wh[i], h[i].to_f32(), "{level} [{i}]");
                assert_eq!(wb[i], b[i].to_f32(), "{level} [{i}]");
            }
        }
    }

    #[test]
    fn every_f16_and_bf16_bit_pattern_widens_as_half_does() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "f16 {bits:#06x}: {got} vs {want}"
            );
            let want = bf16::from_bits(bits).to_f32();
            let got = bf16_bits_to_f32(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "bf16 {bits:#06x}"
            );
        }
    }

    /// Every f16 bit pattern (NaN payloads aside) widens at every level as `half` does:
    /// subnormals, infinities and signed zeros included.
    #[test]
    fn every_f16_bit_pattern_widens_alike_at_every_level() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for level in Level::available() {
            let got = to_f32(level, Elems::F16(&all));
            for (h, g) in all.iter().zip(&got) {
                let want = h.to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{level} f16 {:#06x}: {g} vs {want}",
                    h.to_bits()
                );
            }
        }
    }

    #[test]
    fn widening_agrees_at_every_level_with_tails() {
        for level in Level::available() {
            for n in [0usize, 1, 7, 8, 15, 16, 17, 33, 100] {
                let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.77).sin() * 1e3).collect();
                let h: Vec<f16> = xs.iter().map(|&v| f16::from_f32(v)).collect();
                let b: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
                let wh = to_f32(level, Elems::F16(&h));
                let wb = to_f32(level, Elems::Bf16(&b));
                for i in 0..n {
                    assert_eq!(wh[i], h[i].to_f32(), "{level} f16 n={n} i={i}");
                    assert_eq!(wb[i], b[i].to_f32(), "{level} bf16 n={n} i={i}");
                }
                assert_eq!(to_f32(level, Elems::F32(&xs)), xs);
            }
        }
    }
}
