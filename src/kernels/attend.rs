//! 少行注意力（解码步、推测解码的验证步）：每个（序列，K/V 组）一遍读完缓存的键和值，在线
//! softmax（f32 统计量），键值以存储的精度（f32、f16、bf16）读取，按块加宽。
//!
//! Each (sequence, group) pair is one pass over its cached keys and values: scores of all its
//! query rows against a block of [`KEY_BLOCK`] keys (a register tile of four rows by four keys,
//! two below AVX-512, shares each query and key load), the running
//! maximum, the rescaled running sum and numerator (four rows, eight on AVX-512, share each
//! value load). Masking is
//! by position (row `r` of sequence `i` sees keys `0..=q_starts[i] + r % q_len`), so there is no
//! mask tensor. Half-precision keys and values are read as stored and widened in registers (the
//! queries and outputs are kept in the order that widening gives, see
//! [`super::convert::Format::pair`]), never converted as a tensor.
//!
//! Where the pairs do not fill the pool (absorbed MLA at batch 1 is one pair), each pair's keys
//! are split into ranges done in parallel, each giving a partial (max, sum, numerator) per row,
//! combined at the end (the split-K of "flash decoding"); so one long context uses every thread.

// the register kernels index several rows' slices with one loop variable
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use std::borrow::Cow;

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::convert::{permute_blocks, Bf16, Elems, Format, F16, F32};
use super::gate::{exp_neg, exp_neg_simd};
use super::Level;

/// Keys scored together.
pub const KEY_BLOCK: usize = 64;
/// Query rows sharing one value load (twice as many on levels with 32 registers, see
/// [`group_rows`]).
const RG: usize = 4;
/// Keys per split at least (a split shorter than this costs more to combine than it saves).
const MIN_SPLIT_KEYS: usize = 256;
/// Rows per task at most (prefill: a task copies its rows' queries and outputs).
const MAX_TILE_ROWS: usize = 512;
/// Rows per task aimed at when rows are split for parallelism (each task packs every key block
/// it reads, see [`PACKED_ROWS`]); tiles are of equal size, so a tile may hold fewer rows (and
/// take the unpacked path below [`PACKED_ROWS`]: slower, not wrong).
const MIN_TILE_ROWS: usize = 64;
/// From this many rows on, a task scores each key block as a small matrix product against the
/// block's keys packed transposed (widened once per block, or as bf16 column pairs for the bf16
/// dot products; every row's scores in vector lanes);
/// below it, dot products per key ([`tile_dots`], [`grouped_dots`]: no packing, a horizontal sum
/// per row and key).
pub const PACKED_ROWS: usize = 32;
/// Query rows per task at most (a task: one (sequence, group) pair's rows, or a tile of them in
/// a long prefill) for which the few-row pass over separate keys and values prefetches them
/// (MHA decode: one row per head; GQA: a group's heads). Measured
/// (`kernel_timings`, MHA decode 16 heads x 8192 keys, 2-core EPYC, five alternations): f32
/// 6.1-6.6 ms against 7.0-8.2 without, f16 2.7-3.6 against 3.2-4.2; absorbed MLA's shape was
/// slower with it. `decode_profile`, MHA, one layer at 8192 (four alternations): f32 12.3-13.3 ms
/// per step against 13.0-15.7, f16 6.8-8.3 against 7.7-9.4, bf16 (dot products) 6.5-6.7 against
/// 7.6-8.1.
const PREFETCH_ROWS: usize = 4;

/// Keys or values in storage: element `(i, j, t, c)` (sequence, group, position, column) is at
/// `offset + i·strides[0] + j·strides[1] + t·strides[2] + c`.
#[derive(Clone, Copy, Debug)]
pub struct Cache<'a> {
    /// The storage.
    pub data: Elems<'a>,
    /// Offset of element (0, 0, 0, 0).
    pub offset: usize,
    /// Sequence, group and position strides (columns are contiguous).
    pub strides: [usize; 3],
}

/// One attention call: `rows` query rows per (sequence, group), already scaled.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    /// Queries `[b, g, rows, dk]`, contiguous, as stored (each task widens its own rows).
    pub q: Elems<'a>,
    /// Sequences.
    pub b: usize,
    /// K/V groups.
    pub g: usize,
    /// Query rows per (sequence, group).
    pub rows: usize,
    /// Key width.
    pub dk: usize,
    /// Value width.
    pub dv: usize,
    /// Keys.
    pub k: Cache<'a>,
    /// Values; `None`: the first `dv` columns of the keys (absorbed MLA's latent cache).
    pub v: Option<Cache<'a>>,
    /// Position of each sequence's first query token.
    pub q_starts: &'a [usize],
    /// Query tokens per sequence (row `r` is token `r % q_len`).
    pub q_len: usize,
}

/// The outputs `[b, g, rows, dv]` in f32, at `level`, on the rayon pool.
pub fn attention(level: Level, p: &Problem<'_>) -> Vec<f32> {
    let mut out = vec![0f32; p.b * p.g * p.rows * p.dv];
    attention_into(level, p, &mut out, |src, dst| dst.copy_from_slice(src));
    out
}

/// [`attention`] written into `out` (`[b, g, rows, dv]` of any element type): `put` stores
/// each task's finished f32 rows into its part of `out` (a copy, or a rounding to the cache's
/// dtype), so no f32 copy of the whole output exists at once.
pub fn attention_into<T: Send>(
    level: Level,
    p: &Problem<'_>,
    out: &mut [T],
    put: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let (b, g, rows, dk, dv) = (p.b, p.g, p.rows, p.dk, p.dv);
    assert_eq!(
        p.q.len(),
        b * g * rows * dk,
        "attention: q is not [b, g, rows, dk]"
    );
    assert_eq!(p.q_starts.len(), b, "attention: one start per sequence");
    assert!(p.q_len > 0 && rows > 0, "attention: no query rows");
    assert!(
        p.v.is_some() || dv <= dk,
        "attention: values inside keys need dv <= dk"
    );
    let pairs = b * g;
    let dot = uses_bf16_dot(level, p);
    let threads = rayon::current_num_threads();
    let n_keys = |bi: usize| p.q_starts[bi] + p.q_len.min(rows);
    let longest = (0..b).map(n_keys).max().unwrap_or(0);
    // row tiles per pair: at most MAX_TILE_ROWS rows each (bounds a task's copies), and more
    // where the pairs alone do not give every thread two tasks (prefill of one latent pair)
    let tiles = rows.div_ceil(MAX_TILE_ROWS).max(if pairs < 2 * threads {
        (2 * threads)
            .div_ceil(pairs)
            .min(rows.div_ceil(MIN_TILE_ROWS))
    } else {
        1
    });
    let per_tile = rows.div_ceil(tiles);
    let tiles = rows.div_ceil(per_tile);
    // key splits per tile: enough tasks for every thread (twice, for balance), none shorter
    // than MIN_SPLIT_KEYS
    let units = pairs * tiles;
    let splits = if units >= threads {
        1
    } else {
        (2 * threads)
            .div_ceil(units)
            .min(longest.div_ceil(MIN_SPLIT_KEYS))
            .max(1)
    };
    let key_range = |pair: usize, s: usize| {
        let n = n_keys(pair / g);
        let per = n.div_ceil(splits);
        ((s * per).min(n), ((s + 1) * per).min(n))
    };
    let row_range = |tile: usize| (tile * per_tile, ((tile + 1) * per_tile).min(rows));
    assert_eq!(
        out.len(),
        pairs * rows * dv,
        "attention: out is not [b, g, rows, dv]"
    );
    if splits == 1 {
        // each task owns its rows' outputs: accumulated, normalised and stored, no partials
        out.par_chunks_mut(rows * dv)
            .enumerate()
            .for_each(|(pair, po)| {
                po.par_chunks_mut(per_tile * dv)
                    .enumerate()
                    .for_each(|(tile, dst)| {
                        let mut o = vec![0f32; dst.len()];
                        let task = Task {
                            p,
                            dot,
                            prepared: Prepared::Own,
                            pair,
                            rows: row_range(tile),
                            range: key_range(pair, 0),
                            o: &mut o,
                        };
                        let (_, l) = level.run(task);
                        normalise(&mut o, &l, dv);
                        put(&o, dst);
                    })
            });
        return;
    }
    // each row tile's queries prepared once for its key splits (widened and grouped; for the
    // bf16 dot products grouped as stored, where the rows are few)
    #[cfg(target_arch = "x86_64")]
    let prepared_bf16: Vec<Vec<u16>> = match Bf16::slice(p.q) {
        Some(qd) if dot => (0..units)
            .into_par_iter()
            .map(|unit| {
                let (r0, r1) = row_range(unit % tiles);
                let first = (unit / tiles) * rows + r0;
                if r1 - r0 < PACKED_ROWS {
                    super::bf16dot::group_queries(
                        &qd[first * dk..(first + r1 - r0) * dk],
                        r1 - r0,
                        dk,
                    )
                } else {
                    Vec::new()
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let prepared_bf16: Vec<Vec<u16>> = Vec::new();
    let prepared: Vec<Vec<f32>> = if dot {
        Vec::new()
    } else {
        (0..units)
            .into_par_iter()
            .map(|unit| {
                level.run(Prepare {
                    p,
                    pair: unit / tiles,
                    rows: row_range(unit % tiles),
                })
            })
            .collect()
    };
    let mut parts: Vec<Partial> = (0..units * splits)
        .into_par_iter()
        .map(|t| {
            let (unit, s) = (t / splits, t % splits);
            let (pair, tile) = (unit / tiles, unit % tiles);
            let rows = row_range(tile);
            let mut o = vec![0f32; (rows.1 - rows.0) * dv];
            let (m, l) = level.run(Task {
                p,
                dot,
                prepared: match (prepared.get(unit), prepared_bf16.get(unit)) {
                    (Some(q), _) => Prepared::F32(q),
                    #[cfg(target_arch = "x86_64")]
                    (_, Some(q)) if !q.is_empty() => Prepared::Bf16(q),
                    _ => Prepared::Own,
                },
                pair,
                rows,
                range: key_range(pair, s),
                o: &mut o,
            });
            Partial { m, l, o }
        })
        .collect();
    for (unit, parts) in parts.chunks_mut(splits).enumerate() {
        let (pair, tile) = (unit / tiles, unit % tiles);
        let r0 = pair * rows + tile * per_tile;
        let n = parts[0].m.len();
        put(combine(parts, n, dv), &mut out[r0 * dv..(r0 + n) * dv]);
    }
}

/// Whether the tasks of `p` at `level` take the bf16 dot products
/// ([`super::bf16dot`]): level [`Level::Avx512Bf16`] on a CPU that has it, queries, keys and
/// values all bf16, key and value widths multiples of 32 (every DeepSeek shape: 576/512, 192,
/// 128).
pub fn uses_bf16_dot(level: Level, p: &Problem<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = |e: Elems<'_>| matches!(e, Elems::Bf16(_));
        level == Level::Avx512Bf16
            && super::bf16dot::available()
            && bf16(p.q)
            && bf16(p.k.data)
            && p.v.is_none_or(|v| bf16(v.data))
            && p.dk.is_multiple_of(super::bf16dot::CHUNK)
            && p.dv.is_multiple_of(super::bf16dot::CHUNK)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, p);
        false
    }
}

/// Rows of unnormalised outputs divided by their softmax sums.
fn normalise(o: &mut [f32], l: &[f32], dv: usize) {
    for (row, &sum) in o.chunks_mut(dv).zip(l) {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// One key range's running statistics per row: max, sum, unnormalised numerator.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
}

/// The splits of one pair merged into normalised outputs, in the first split's buffer.
fn combine(parts: &mut [Partial], rows: usize, dv: usize) -> &[f32] {
    let (first, rest) = parts.split_first_mut().expect("at least one split");
    for r in 0..rows {
        let m = rest.iter().map(|p| p.m[r]).fold(first.m[r], f32::max);
        let o = &mut first.o[r * dv..(r + 1) * dv];
        // the first split's share (nothing where it saw no key: its numerator is 0)
        let w0 = if first.m[r] == f32::NEG_INFINITY {
            0.0
        } else {
            exp_neg(first.m[r] - m)
        };
        let mut l = w0 * first.l[r];
        o.iter_mut().for_each(|x| *x *= w0);
        for p in rest.iter() {
            if p.m[r] == f32::NEG_INFINITY {
                continue;
            }
            let w = exp_neg(p.m[r] - m);
            l += w * p.l[r];
            for (a, x) in o.iter_mut().zip(&p.o[r * dv..(r + 1) * dv]) {
                *a += w * x;
            }
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|x| *x *= inv);
    }
    &first.o
}

/// One (sequence, group) pair's rows `rows.0..rows.1` over keys `range.0..range.1`, adding the
/// unnormalised outputs into `o` (`[rows, dv]`, zeroed); gives each row's (max, sum).
struct Task<'a, 'b, 'c> {
    p: &'b Problem<'a>,
    /// The task takes the bf16 dot products ([`uses_bf16_dot`]; read on x86-64 only, where
    /// those exist).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    dot: bool,
    /// Its rows' queries, where several tasks share them (the key splits of one row tile).
    prepared: Prepared<'c>,
    pair: usize,
    rows: (usize, usize),
    range: (usize, usize),
    o: &'c mut [f32],
}

/// A row tile's queries prepared once for the tasks that share them.
#[derive(Clone, Copy)]
enum Prepared<'c> {
    /// None shared: the task prepares its own.
    Own,
    /// As [`prepare_queries`] gives them.
    F32(&'c [f32]),
    /// The bf16 dot products' few rows ([`super::bf16dot::group_queries`]; x86-64 only, where
    /// those exist).
    #[cfg(target_arch = "x86_64")]
    Bf16(&'c [u16]),
}

impl WithSimd for Task<'_, '_, '_> {
    type Output = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        match self.p.k.data {
            #[cfg(target_arch = "x86_64")]
            Elems::Bf16(_) if self.dot => self.run_bf16_dot(simd),
            Elems::F32(_) => self.run::<S, F32>(simd),
            Elems::Bf16(_) => self.run::<S, Bf16>(simd),
            Elems::F16(_) => self.run::<S, F16>(simd),
        }
    }
}

/// What a task's pass derives from the problem: each row's position, the values' storage, where
/// the pair's keys and values start and their position strides, and the end of its key range.
struct Frame<'a> {
    pos: Vec<usize>,
    vsrc: Cache<'a>,
    kbase: usize,
    vbase: usize,
    kst: usize,
    vst: usize,
    end: usize,
}

impl<'a> Task<'a, '_, '_> {
    fn frame(&self) -> Frame<'a> {
        let p = self.p;
        let (bi, gi) = (self.pair / p.g, self.pair % p.g);
        let pos: Vec<usize> = (self.rows.0..self.rows.1)
            .map(|r| p.q_starts[bi] + r % p.q_len)
            .collect();
        let vsrc = p.v.unwrap_or(p.k);
        // no key after the tile's last position is seen by any of its rows (the first chunks of a
        // prefill: later tiles' keys)
        let end = self
            .range
            .1
            .min(pos.iter().max().map_or(0, |&last| last + 1));
        Frame {
            kbase: p.k.offset + bi * p.k.strides[0] + gi * p.k.strides[1],
            vbase: vsrc.offset + bi * vsrc.strides[0] + gi * vsrc.strides[1],
            kst: p.k.strides[2],
            vst: vsrc.strides[2],
            pos,
            vsrc,
            end,
        }
    }
}

/// Rows `rows.0..rows.1` of `pair`'s queries as [`Task::run`] reads them for keys stored in
/// format `F`: widened to f32, in the order the format's pairs load the keys (even, then odd
/// elements of each block of two vectors where they are permuted) and, for few rows
/// (< [`PACKED_ROWS`]), each row group's vectors side by side ([`group_queries`]).
#[inline(always)]
fn prepare_queries<S: Simd, F: Format>(
    simd: S,
    p: &Problem<'_>,
    pair: usize,
    rows: (usize, usize),
) -> Vec<f32> {
    let (dk, n) = (p.dk, rows.1 - rows.0);
    let first = pair * p.rows + rows.0;
    let src = p.q.sub(first * dk, n * dk);
    if n < PACKED_ROWS {
        // widened straight into the grouped layout (one buffer, not two)
        let mut out = vec![0f32; n * dk];
        fill_grouped(&mut out, n, dk, 2 * S::F32_LANES, |at, d| {
            super::convert::widen_simd(simd, src.sub(at, d.len()), d)
        });
        if F::permuted::<S>() {
            permute_grouped::<S>(&mut out, n, dk);
        }
        return out;
    }
    let mut q = vec![0f32; n * dk];
    super::convert::widen_simd(simd, src, &mut q);
    if F::permuted::<S>() {
        permute_blocks(&mut q, n, dk, S::F32_LANES, false);
    }
    q
}

/// [`permute_blocks`] (to the pairs' order) on rows already in [`group_queries`]' layout: every
/// full chunk of two vectors is one row's block; the tails stay in natural order.
pub(crate) fn permute_grouped<S: Simd>(g: &mut [f32], rows: usize, dk: usize) {
    let width = 2 * S::F32_LANES;
    let full = dk / width;
    for (r0, r) in score_groups(rows) {
        let chunks = &mut g[r0 * dk..r0 * dk + full * r * width];
        permute_blocks(chunks, full * r, width, S::F32_LANES, false);
    }
}

/// [`prepare_queries`] for the format the keys are stored in.
struct Prepare<'a, 'b> {
    p: &'b Problem<'a>,
    pair: usize,
    rows: (usize, usize),
}

impl WithSimd for Prepare<'_, '_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
        match self.p.k.data {
            Elems::F32(_) => prepare_queries::<S, F32>(simd, self.p, self.pair, self.rows),
            Elems::Bf16(_) => prepare_queries::<S, Bf16>(simd, self.p, self.pair, self.rows),
            Elems::F16(_) => prepare_queries::<S, F16>(simd, self.p, self.pair, self.rows),
        }
    }
}

impl Task<'_, '_, '_> {
    /// The pass for keys and values stored in format `F` (read two vectors at a time, widened in
    /// registers: [`Format::pair`]).
    #[inline(always)]
    fn run<S: Simd, F: Format>(self, simd: S) -> (Vec<f32>, Vec<f32>) {
        let p = self.p;
        let (dk, dv) = (p.dk, p.dv);
        let rows = self.rows.1 - self.rows.0;
        let l = S::F32_LANES;
        let Frame {
            pos,
            vsrc,
            kbase,
            vbase,
            kst,
            vst,
            end,
        } = self.frame();
        let (Some(kd), Some(vd)) = (F::slice(p.k.data), F::slice(vsrc.data)) else {
            panic!("attention: keys and values must have one storage type");
        };
        let own;
        let q = match self.prepared {
            Prepared::F32(q) => q,
            _ => {
                own = prepare_queries::<S, F>(simd, p, self.pair, self.rows);
                own.as_slice()
            }
        };
        let packed = rows >= PACKED_ROWS;
        let (mut row, mut kt) = if packed {
            (vec![0f32; dk], vec![0f32; dk * KEY_BLOCK])
        } else {
            (Vec::new(), Vec::new())
        };
        // many rows over f16 values: each block's values widened once into `vw` (in the order
        // the pair loads give) rather than once per group of rows ([`Format::WIDEN_BLOCKS`])
        let widen_values = packed && F::WIDEN_BLOCKS;
        let mut vw = if widen_values {
            vec![0f32; dv * KEY_BLOCK]
        } else {
            Vec::new()
        };
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut sums = vec![0f32; rows];
        let o = self.o;
        assert_eq!(
            o.len(),
            rows * dv,
            "attention: one output row per query row"
        );
        let mut s = vec![0f32; rows * KEY_BLOCK];
        let mut vis = vec![0usize; rows];
        // few rows over separate keys and values (MHA, GQA decode): bound by the cache's bytes,
        // and the prefetchers alone leave it well below the read rate, so the block's values are
        // asked for before its scores, the next block's keys before its values (absorbed MLA's
        // 16 rows over one latent cache are bound by arithmetic: there it was slower)
        let prefetch = !packed && p.v.is_some() && rows <= PREFETCH_ROWS;
        let mut k0 = self.range.0;
        while k0 < end {
            let k1 = (k0 + KEY_BLOCK).min(end);
            let nb = k1 - k0;
            // keys of the block each row sees (by position)
            for (v, &ps) in vis.iter_mut().zip(&pos) {
                *v = (ps + 1).saturating_sub(k0).min(nb);
            }
            let keys = Rows::<F> {
                data: kd,
                base: kbase + k0 * kst,
                stride: kst,
            };
            if prefetch {
                prefetch_rows(vd, vbase + k0 * vst, vst, nb, dv);
            }
            if packed {
                pack_keys(simd, &keys, dk, nb, &mut row, &mut kt);
                scores_packed(simd, q, &kt, &vis, dk, &mut s);
            } else {
                scores(simd, q, &keys, rows, dk, nb, &mut s);
            }
            online_softmax(simd, &mut s, &vis, nb, &mut m, &mut sums, o, dv);
            if prefetch && k1 < end {
                let next = (k1 + KEY_BLOCK).min(end) - k1;
                prefetch_rows(kd, kbase + k1 * kst, kst, next, dk);
            }
            let values = Rows::<F> {
                data: vd,
                base: vbase + k0 * vst,
                stride: vst,
            };
            if widen_values {
                for j in 0..nb {
                    widen_row(simd, &values, j, &mut vw[j * dv..(j + 1) * dv]);
                }
                let widened = Rows::<F32> {
                    data: &vw,
                    base: 0,
                    stride: dv,
                };
                weighted_values(simd, &s, &widened, &vis, dv, o);
            } else {
                weighted_values(simd, &s, &values, &vis, dv, o);
            }
            k0 = k1;
        }
        if F::permuted::<S>() {
            permute_blocks(o, rows, dv, l, true);
        }
        (m, sums)
    }
}

impl Task<'_, '_, '_> {
    /// The pass for bf16 queries, keys and values by bf16 dot products ([`super::bf16dot`]; only
    /// where [`uses_bf16_dot`] said so): scores, the online softmax in f32, the weights rounded to
    /// bf16, the weighted values; outputs in column order.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn run_bf16_dot<S: Simd>(self, simd: S) -> (Vec<f32>, Vec<f32>) {
        use super::bf16dot::{self, Rows as Bf16Rows};
        let p = self.p;
        let (dk, dv) = (p.dk, p.dv);
        let (row0, rows) = (self.rows.0, self.rows.1 - self.rows.0);
        let Frame {
            pos,
            vsrc,
            kbase,
            vbase,
            kst,
            vst,
            end,
        } = self.frame();
        let (Some(qd), Some(kd), Some(vd)) = (
            Bf16::slice(p.q),
            Bf16::slice(p.k.data),
            Bf16::slice(vsrc.data),
        ) else {
            panic!("attention: the bf16 dot products need bf16 queries, keys and values");
        };
        let first = self.pair * p.rows + row0;
        let qrows = &qd[first * dk..(first + rows) * dk];
        // many rows: the keys of each block packed once as column pairs, every row's scores in
        // vector lanes (`bf16dot::scores_packed`); few rows: dot products per key
        let packed = rows >= PACKED_ROWS;
        let (qg, qp, mut kt) = if packed {
            (
                Cow::Owned(Vec::new()),
                bf16dot::pairs(qrows, rows, dk),
                vec![0u32; dk / 2 * KEY_BLOCK],
            )
        } else {
            (
                match self.prepared {
                    Prepared::Bf16(q) => Cow::Borrowed(q),
                    _ => Cow::Owned(bf16dot::group_queries(qrows, rows, dk)),
                },
                Vec::new(),
                Vec::new(),
            )
        };
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut sums = vec![0f32; rows];
        let o = self.o;
        assert_eq!(
            o.len(),
            rows * dv,
            "attention: one output row per query row"
        );
        let mut s = vec![0f32; rows * KEY_BLOCK];
        let mut w = vec![0u32; rows * KEY_BLOCK / 2];
        let mut vis = vec![0usize; rows];
        // as in [`Task::run`]
        let prefetch = !packed && p.v.is_some() && rows <= PREFETCH_ROWS;
        let mut k0 = self.range.0;
        while k0 < end {
            let k1 = (k0 + KEY_BLOCK).min(end);
            let nb = k1 - k0;
            for (v, &ps) in vis.iter_mut().zip(&pos) {
                *v = (ps + 1).saturating_sub(k0).min(nb);
            }
            let keys = Bf16Rows {
                data: kd,
                base: kbase + k0 * kst,
                stride: kst,
            };
            if prefetch {
                prefetch_rows(vd, vbase + k0 * vst, vst, nb, dv);
            }
            if packed {
                bf16dot::pack_keys(keys, dk, nb, KEY_BLOCK, &mut kt);
                // SAFETY: `self.dot` is set only where `uses_bf16_dot` found
                // `bf16dot::available()` (AVX-512 F/BW and AVX512_BF16 on this CPU).
                unsafe { bf16dot::scores_packed(&qp, &vis, dk, &kt, KEY_BLOCK, &mut s) };
            } else {
                // SAFETY: as above.
                unsafe { bf16dot::scores(&qg, rows, dk, keys, nb, &mut s, KEY_BLOCK) };
            }
            online_softmax(simd, &mut s, &vis, nb, &mut m, &mut sums, o, dv);
            if prefetch && k1 < end {
                let next = (k1 + KEY_BLOCK).min(end) - k1;
                prefetch_rows(kd, kbase + k1 * kst, kst, next, dk);
            }
            // weights past the block's keys (left from an earlier block) are zero
            if nb < KEY_BLOCK {
                for r in 0..rows {
                    s[r * KEY_BLOCK + nb..(r + 1) * KEY_BLOCK].fill(0.0);
                }
            }
            let values = Bf16Rows {
                data: vd,
                base: vbase + k0 * vst,
                stride: vst,
            };
            // SAFETY: as for the scores above.
            unsafe {
                bf16dot::weight_pairs(&s, rows, KEY_BLOCK, &mut w);
                bf16dot::weighted_values(&w, KEY_BLOCK, values, &vis, dv, o);
            }
            k0 = k1;
        }
        (m, sums)
    }
}

/// The online softmax of one block of `nb` keys for every row (scores `s[r·KEY_BLOCK..][..nb]`,
/// row `r` seeing the first `vis[r]`): the scores become the block's weights (masked ones 0), the
/// running maxima `m` and sums `sums` are updated and the rows' outputs `o` (`dv` wide) rescaled.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn online_softmax<S: Simd>(
    simd: S,
    s: &mut [f32],
    vis: &[usize],
    nb: usize,
    m: &mut [f32],
    sums: &mut [f32],
    o: &mut [f32],
    dv: usize,
) {
    for r in 0..vis.len() {
        let sr = &mut s[r * KEY_BLOCK..r * KEY_BLOCK + nb];
        let (m_new, corr, sum) = softmax_block(simd, sr, vis[r], m[r]);
        sums[r] = sums[r] * corr + sum;
        if corr != 1.0 {
            o[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= corr);
        }
        m[r] = m_new;
    }
}

/// Asks for the cache lines of `n` stored rows of `width` elements, row `j` at
/// `data[base + j·stride..]` (a hint: see [`super::prefetch`]). One address per line from each
/// row's start: a row that starts inside a line may end in one line more, which for the
/// contiguous rows of a key block is the next row's first (so only the block's last row leaves
/// a line out).
#[inline(always)]
fn prefetch_rows<T>(data: &[T], base: usize, stride: usize, n: usize, width: usize) {
    let per = (super::LINE_BYTES / size_of::<T>()).max(1);
    for j in 0..n {
        for c in (0..width).step_by(per) {
            super::prefetch(data, base + j * stride + c);
        }
    }
}

/// Stored rows: row `j` starts at `data[base + j·stride]`.
struct Rows<'a, F: Format> {
    data: &'a [F::Elem],
    base: usize,
    stride: usize,
}

impl<F: Format> Rows<'_, F> {
    #[inline(always)]
    fn at(&self, j: usize) -> usize {
        self.base + j * self.stride
    }
}

/// `s[r·KEY_BLOCK + j] = q_r · key_j` for every row and the block's `nb` keys; `q` in the layout
/// of [`group_queries`]. Groups of [`SCORE_ROWS`] rows take the block's keys [`key_tile`] at a
/// time ([`tile_dots`]); the keys left over, and smaller groups, one at a time.
#[inline(always)]
fn scores<S: Simd, F: Format>(
    simd: S,
    q: &[f32],
    keys: &Rows<'_, F>,
    rows: usize,
    dk: usize,
    nb: usize,
    s: &mut [f32],
) {
    let kt = key_tile::<S>();
    for (r0, r) in score_groups(rows) {
        let qg = &q[r0 * dk..(r0 + r) * dk];
        let mut j = 0;
        if r == SCORE_ROWS {
            while j + kt <= nb {
                let mut put = |d: &[[f32; 4]; SCORE_ROWS], n: usize| {
                    for (i, dr) in d.iter().enumerate() {
                        s[(r0 + i) * KEY_BLOCK + j..][..n].copy_from_slice(&dr[..n]);
                    }
                };
                if kt == 4 {
                    let ats = [keys.at(j), keys.at(j + 1), keys.at(j + 2), keys.at(j + 3)];
                    put(&tile_dots::<S, 4, F>(simd, qg, dk, keys.data, ats), 4);
                } else {
                    let ats = [keys.at(j), keys.at(j + 1)];
                    put(&tile_dots::<S, 2, F>(simd, qg, dk, keys.data, ats), 2);
                }
                j += kt;
            }
        }
        for j in j..nb {
            let at = keys.at(j);
            let mut put = |d: &[f32]| {
                for (i, v) in d.iter().enumerate() {
                    s[(r0 + i) * KEY_BLOCK + j] = *v;
                }
            };
            match r {
                4 => put(&grouped_dots::<S, 4, F>(simd, qg, dk, keys.data, at)),
                3 => put(&grouped_dots::<S, 3, F>(simd, qg, dk, keys.data, at)),
                2 => put(&grouped_dots::<S, 2, F>(simd, qg, dk, keys.data, at)),
                _ => put(&grouped_dots::<S, 1, F>(simd, qg, dk, keys.data, at)),
            }
        }
    }
}

/// Query rows scored together against a tile of keys ([`tile_dots`]).
const SCORE_ROWS: usize = 4;

/// Keys scored together by [`tile_dots`]: 4 on 16-lane levels (AVX-512, 32 vector registers: 16
/// accumulators, 8 key vectors), else 2.
#[inline(always)]
fn key_tile<S: Simd>() -> usize {
    if S::F32_LANES >= 16 {
        4
    } else {
        2
    }
}

/// The groups of rows [`scores`] takes, as (first row, rows): [`SCORE_ROWS`] at a time, then
/// what is left.
pub(crate) fn score_groups(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(SCORE_ROWS)
        .map(move |r0| (r0, (rows - r0).min(SCORE_ROWS)))
}

/// The groups of rows that share each key or value load in [`weighted_values`], as (first row,
/// rows): as many of [`group_rows`] as fit, then 4, then what is left (3, 2 or 1).
#[inline(always)]
fn row_groups<S: Simd>(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut r0 = 0;
    std::iter::from_fn(move || {
        if r0 >= rows {
            return None;
        }
        let g = (rows - r0).min(group_rows::<S>());
        let r = if (4..8).contains(&g) { 4 } else { g };
        r0 += r;
        Some((r0 - r, r))
    })
}

/// `q` (`rows` rows of `dk` values) regrouped for [`tile_dots`] and [`grouped_dots`]: per group
/// of [`score_groups`] (`r` rows from `r0`, in the same `r0·dk..(r0 + r)·dk` span), the rows'
/// first pairs of vectors side by side, then their second pairs, and so on; then each row's tail
/// (`dk` mod the pair's width) in turn. The loop over a key then reads every row's vectors at
/// constant offsets from one address (the rows' own addresses were spilled to the stack).
pub(crate) fn group_queries<S: Simd>(q: &[f32], rows: usize, dk: usize) -> Vec<f32> {
    group_chunks(q, rows, dk, 2 * S::F32_LANES)
}

/// [`group_queries`]' layout for chunks of `width` elements of any type (also the bf16 dot
/// products' queries, `width` 32).
pub(crate) fn group_chunks<T: Copy + Default>(
    q: &[T],
    rows: usize,
    dk: usize,
    width: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); q.len()];
    fill_grouped(&mut out, rows, dk, width, |at, dst| {
        dst.copy_from_slice(&q[at..at + dst.len()])
    });
    out
}

/// Fills `out` (`rows x dk`) in [`group_queries`]' layout for chunks of `width`: `put(at, dst)`
/// writes the `dst.len()` source elements from row-major offset `at` (a row's full chunk or its
/// tail) into their place.
#[inline(always)]
fn fill_grouped<T>(
    out: &mut [T],
    rows: usize,
    dk: usize,
    width: usize,
    mut put: impl FnMut(usize, &mut [T]),
) {
    let (full, tail) = (dk / width, dk % width);
    for (r0, r) in score_groups(rows) {
        let dst = &mut out[r0 * dk..(r0 + r) * dk];
        for i in 0..r {
            let row = (r0 + i) * dk;
            for c in 0..full {
                put(row + c * width, &mut dst[(c * r + i) * width..][..width]);
            }
            put(
                row + full * width,
                &mut dst[full * r * width + i * tail..][..tail],
            );
        }
    }
}

/// `q_i · key_t` for the [`SCORE_ROWS`] rows of one group (`qg` in the layout of
/// [`group_queries`]) and `K` keys (the `dk` stored values from `w[ats[t]..]`): each pair of
/// query vectors loaded once for the K keys, each pair of key vectors once for the rows (a
/// register tile of `SCORE_ROWS x K` accumulators): at AVX-512, 8 + 8 loads per 32
/// multiply-adds, where one key at a time for 8 rows took 18 loads per 16.
#[inline(always)]
fn tile_dots<S: Simd, const K: usize, F: Format>(
    simd: S,
    qg: &[f32],
    dk: usize,
    w: &[F::Elem],
    ats: [usize; K],
) -> [[f32; 4]; SCORE_ROWS] {
    const R: usize = SCORE_ROWS;
    let width = 2 * S::F32_LANES;
    let (full, tail) = (dk / width, dk % width);
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; K]; R];
    for c in 0..full {
        // a loop, not `array::from_fn`: a closure is not inlined into the level's
        // target-feature context, and the widening intrinsics became calls
        let mut kv = [(zero, zero); K];
        for t in 0..K {
            kv[t] = F::pair(simd, w, ats[t] + c * width);
        }
        let (qv, _) = S::as_simd_f32s(&qg[c * R * width..(c + 1) * R * width]);
        let qv = &qv[..2 * R];
        for i in 0..R {
            for t in 0..K {
                acc[i][t] = simd.mul_add_f32s(qv[2 * i], kv[t].0, acc[i][t]);
                acc[i][t] = simd.mul_add_f32s(qv[2 * i + 1], kv[t].1, acc[i][t]);
            }
        }
    }
    let qt = &qg[full * R * width..];
    let mut out = [[0f32; 4]; R];
    for i in 0..R {
        for t in 0..K {
            let mut x = simd.reduce_sum_f32s(acc[i][t]);
            let kt = &w[ats[t] + full * width..ats[t] + dk];
            for (a, b) in qt[i * tail..(i + 1) * tail].iter().zip(kt) {
                x += a * F::one(*b);
            }
            out[i][t] = x;
        }
    }
    out
}

/// `q_i · key` for the `R` rows of one group (`qg`: `R·dk` values in the layout of
/// [`group_queries`]), `key` the `dk` stored values from `w[at..]`: one load of each pair of key
/// vectors for the R rows. Also the product of [`super::gemv::gemv_out_in`].
#[inline(always)]
pub(crate) fn grouped_dots<S: Simd, const R: usize, F: Format>(
    simd: S,
    qg: &[f32],
    dk: usize,
    w: &[F::Elem],
    at: usize,
) -> [f32; R] {
    let width = 2 * S::F32_LANES;
    let (full, tail) = (dk / width, dk % width);
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; R];
    for c in 0..full {
        let (k0, k1) = F::pair(simd, w, at + c * width);
        let (qv, _) = S::as_simd_f32s(&qg[c * R * width..(c + 1) * R * width]);
        let qv = &qv[..2 * R];
        for i in 0..R {
            acc[i][0] = simd.mul_add_f32s(qv[2 * i], k0, acc[i][0]);
            acc[i][1] = simd.mul_add_f32s(qv[2 * i + 1], k1, acc[i][1]);
        }
    }
    let kt = &w[at + full * width..at + dk];
    let qt = &qg[full * R * width..];
    let mut out = [0f32; R];
    for i in 0..R {
        let mut t = simd.reduce_sum_f32s(simd.add_f32s(acc[i][0], acc[i][1]));
        for (a, b) in qt[i * tail..(i + 1) * tail].iter().zip(kt) {
            t += a * F::one(*b);
        }
        out[i] = t;
    }
    out
}

/// Query rows sharing each value load: 8 on 16-lane levels (AVX-512, 32 vector registers)
/// (AVX-512: 16 accumulators, two loaded vectors and a broadcast), else 4 ([`RG`]).
#[inline(always)]
fn group_rows<S: Simd>() -> usize {
    if S::F32_LANES >= 16 {
        2 * RG
    } else {
        RG
    }
}

/// One block of the online softmax over the first `visible` scores of `s` (the rest are masked
/// and set to 0): with `m` the running maximum before the block, turns the visible scores into
/// `exp(s - m_new)` and returns (`m_new`, the factor `exp(m - m_new)` for what was accumulated
/// before, the block's sum). A row that sees none of the block keeps its statistics.
#[inline(always)]
fn softmax_block<S: Simd>(simd: S, s: &mut [f32], visible: usize, m: f32) -> (f32, f32, f32) {
    let (vis, masked) = s.split_at_mut(visible);
    masked.iter_mut().for_each(|x| *x = 0.0);
    if vis.is_empty() {
        return (m, 1.0, 0.0);
    }
    let block_max = vis.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m_new = m.max(block_max);
    let corr = if m == f32::NEG_INFINITY {
        0.0
    } else {
        exp_neg(m - m_new)
    };
    let (head, tail) = S::as_mut_simd_f32s(vis);
    let mv = simd.splat_f32s(m_new);
    for x in head.iter_mut() {
        *x = exp_neg_simd(simd, simd.sub_f32s(*x, mv));
    }
    for x in tail.iter_mut() {
        *x = exp_neg(*x - m_new);
    }
    let mut part = [0f32; 8];
    for (i, x) in vis.iter().enumerate() {
        part[i % 8] += *x;
    }
    let sum =
        ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    (m_new, corr, sum)
}

/// `o_r += Σ_j s[r·KEY_BLOCK + j] · value_j` for every row (one load of each pair of value
/// vectors for [`RG`] rows; the rows' outputs accumulate in registers over the block's keys, in
/// the order [`Format::pair`] gives).
#[inline(always)]
fn weighted_values<S: Simd, F: Format>(
    simd: S,
    s: &[f32],
    values: &Rows<'_, F>,
    vis: &[usize],
    dv: usize,
    o: &mut [f32],
) {
    for (r0, r) in row_groups::<S>(vis.len()) {
        // keys any row of the group sees (the scores past a row's own are 0)
        let nb = vis[r0..r0 + r].iter().copied().max().unwrap_or(0);
        if nb > 0 {
            match r {
                8 => accumulate::<S, 8, F>(simd, s, values, r0, dv, nb, o),
                4 => accumulate::<S, 4, F>(simd, s, values, r0, dv, nb, o),
                3 => accumulate::<S, 3, F>(simd, s, values, r0, dv, nb, o),
                2 => accumulate::<S, 2, F>(simd, s, values, r0, dv, nb, o),
                _ => accumulate::<S, 1, F>(simd, s, values, r0, dv, nb, o),
            };
        }
    }
}

/// Stored row `j` widened into `out` (its length is the row's): whole pairs of vectors in the
/// order [`Format::pair`] gives, the tail in natural order (as [`accumulate`] reads it).
#[inline(always)]
fn widen_row<S: Simd, F: Format>(simd: S, rows: &Rows<'_, F>, j: usize, out: &mut [f32]) {
    let width = 2 * S::F32_LANES;
    let (at, n) = (rows.at(j), out.len());
    let mut c = 0;
    while c + width <= n {
        let (a, b) = F::pair(simd, rows.data, at + c);
        let (rv, _) = S::as_mut_simd_f32s(&mut out[c..c + width]);
        rv[0] = a;
        rv[1] = b;
        c += width;
    }
    for (x, w) in out[c..].iter_mut().zip(&rows.data[at + c..at + n]) {
        *x = F::one(*w);
    }
}

/// The block's `nb` keys widened and packed transposed: `kt[c·KEY_BLOCK + j]` is column `c` of
/// key `j` (columns in the order [`Format::pair`] gives, as the queries are), keys `nb..` zero.
/// `row` is scratch of `dk` values.
#[inline(always)]
fn pack_keys<S: Simd, F: Format>(
    simd: S,
    keys: &Rows<'_, F>,
    dk: usize,
    nb: usize,
    row: &mut [f32],
    kt: &mut [f32],
) {
    for j in 0..KEY_BLOCK {
        if j < nb {
            widen_row(simd, keys, j, &mut row[..dk]);
        } else {
            row.fill(0.0);
        }
        for (c, x) in row.iter().enumerate() {
            kt[c * KEY_BLOCK + j] = *x;
        }
    }
}

/// `s[r·KEY_BLOCK + j] = q_r · key_j` from the packed keys, for the keys each group of rows
/// sees (`vis`): a small matrix product with the scores of [`TILE_ROWS`] rows and a run of keys
/// in registers (four vectors of keys on levels with 16 lanes, two elsewhere; every query value
/// broadcast once per run). Scores past
/// a group's last visible key are left as they are (the softmax zeroes them).
#[inline(always)]
fn scores_packed<S: Simd>(simd: S, q: &[f32], kt: &[f32], vis: &[usize], dk: usize, s: &mut [f32]) {
    let rows = vis.len();
    let l = S::F32_LANES;
    // key vectors per run: four on levels with 32 registers (R x 4 accumulators), else two
    let tv = if l >= 16 { 4 } else { 2 };
    let run = (tv * l).min(KEY_BLOCK);
    let mut r0 = 0;
    while r0 < rows {
        let r = match rows - r0 {
            left if left >= TILE_ROWS => TILE_ROWS,
            4.. => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let nb = vis[r0..r0 + r].iter().copied().max().unwrap_or(0);
        let mut j0 = 0;
        while j0 < nb {
            match (r, tv == 4) {
                (TILE_ROWS, true) => score_run::<S, TILE_ROWS, 4>(simd, q, r0, dk, kt, j0, s),
                (TILE_ROWS, false) => score_run::<S, TILE_ROWS, 2>(simd, q, r0, dk, kt, j0, s),
                (4, true) => score_run::<S, 4, 4>(simd, q, r0, dk, kt, j0, s),
                (4, false) => score_run::<S, 4, 2>(simd, q, r0, dk, kt, j0, s),
                (2, true) => score_run::<S, 2, 4>(simd, q, r0, dk, kt, j0, s),
                (2, false) => score_run::<S, 2, 2>(simd, q, r0, dk, kt, j0, s),
                (_, true) => score_run::<S, 1, 4>(simd, q, r0, dk, kt, j0, s),
                (_, false) => score_run::<S, 1, 2>(simd, q, r0, dk, kt, j0, s),
            }
            j0 += run;
        }
        r0 += r;
    }
}

/// Rows scored together by [`scores_packed`] (6 x 4 accumulators on AVX-512, 6 x 2 on AVX2).
const TILE_ROWS: usize = 6;

/// Scores of rows `r0..r0 + R` against keys `j0..j0 + TV·lanes` of the packed block.
#[inline(always)]
fn score_run<S: Simd, const R: usize, const TV: usize>(
    simd: S,
    q: &[f32],
    r0: usize,
    dk: usize,
    kt: &[f32],
    j0: usize,
    s: &mut [f32],
) {
    let l = S::F32_LANES;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; TV]; R];
    let qs: [&[f32]; R] = std::array::from_fn(|i| &q[(r0 + i) * dk..(r0 + i + 1) * dk]);
    for c in 0..dk {
        let (kv, _) = S::as_simd_f32s(&kt[c * KEY_BLOCK + j0..c * KEY_BLOCK + j0 + TV * l]);
        let kv: [S::f32s; TV] = std::array::from_fn(|t| kv[t]);
        for i in 0..R {
            let qb = simd.splat_f32s(qs[i][c]);
            for t in 0..TV {
                acc[i][t] = simd.mul_add_f32s(qb, kv[t], acc[i][t]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let (out, _) = S::as_mut_simd_f32s(&mut s[(r0 + i) * KEY_BLOCK + j0..][..TV * l]);
        out[..TV].copy_from_slice(a);
    }
}

#[inline(always)]
fn accumulate<S: Simd, const R: usize, F: Format>(
    simd: S,
    s: &[f32],
    values: &Rows<'_, F>,
    r0: usize,
    dv: usize,
    nb: usize,
    o: &mut [f32],
) -> usize {
    let width = 2 * S::F32_LANES;
    assert!(nb <= KEY_BLOCK);
    // the rows' scores from one address at constant offsets (row i's at i·KEY_BLOCK)
    let ps = &s[r0 * KEY_BLOCK..(r0 + R) * KEY_BLOCK];
    let mut c = 0;
    while c + width <= dv {
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; 2]; R];
        for j in 0..nb {
            let (v0, v1) = F::pair(simd, values.data, values.at(j) + c);
            for i in 0..R {
                let pj = simd.splat_f32s(ps[i * KEY_BLOCK + j]);
                acc[i][0] = simd.mul_add_f32s(pj, v0, acc[i][0]);
                acc[i][1] = simd.mul_add_f32s(pj, v1, acc[i][1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let (ov, _) = S::as_mut_simd_f32s(&mut o[(r0 + i) * dv + c..][..width]);
            ov[0] = simd.add_f32s(ov[0], a[0]);
            ov[1] = simd.add_f32s(ov[1], a[1]);
        }
        c += width;
    }
    if c < dv {
        for j in 0..nb {
            let at = values.at(j);
            let vr = &values.data[at + c..at + dv];
            for i in 0..R {
                let pj = ps[i * KEY_BLOCK + j];
                for (a, v) in o[(r0 + i) * dv + c..(r0 + i + 1) * dv].iter_mut().zip(vr) {
                    *a += pj * F::one(*v);
                }
            }
        }
    }
    R
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use half::{bf16, f16};

    /// Plain softmax attention in f64 over the stored (rounded) values.
    fn reference(p: &Problem<'_>, qall: &[f32], kf: &[f32], vf: Option<&[f32]>) -> Vec<f32> {
        let (b, g, rows, dk, dv) = (p.b, p.g, p.rows, p.dk, p.dv);
        let mut out = vec![0f32; b * g * rows * dv];
        for bi in 0..b {
            for gi in 0..g {
                for r in 0..rows {
                    let pos = p.q_starts[bi] + r % p.q_len;
                    let qr = &qall[((bi * g + gi) * rows + r) * dk..][..dk];
                    let key = |t: usize| {
                        let at = p.k.offset
                            + bi * p.k.strides[0]
                            + gi * p.k.strides[1]
                            + t * p.k.strides[2];
                        &kf[at..at + dk]
                    };
                    let val = |t: usize| match (vf, p.v) {
                        (Some(vf), Some(v)) => {
                            let at =
                                v.offset + bi * v.strides[0] + gi * v.strides[1] + t * v.strides[2];
                            &vf[at..at + dv]
                        }
                        _ => &key(t)[..dv],
                    };
                    let sc: Vec<f64> = (0..=pos)
                        .map(|t| {
                            qr.iter()
                                .zip(key(t))
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum()
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dv {
                        let v: f64 = (0..=pos).map(|t| e[t] * val(t)[c] as f64).sum();
                        out[((bi * g + gi) * rows + r) * dv + c] = (v / z) as f32;
                    }
                }
            }
        }
        out
    }

    fn round(x: &[f32], dtype: u8) -> Vec<f32> {
        match dtype {
            1 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            2 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            _ => x.to_vec(),
        }
    }

    /// Runs one shape at every level and storage type against the reference.
    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        g: usize,
        rows: usize,
        dk: usize,
        dv: usize,
        cap: usize,
        starts: &[usize],
        q_len: usize,
        shared: bool,
    ) {
        let q = uniform(b * g * rows * dk, 5);
        // queries stored like the cache (as the model gives them)
        let qh: Vec<f16> = q.iter().map(|&v| f16::from_f32(v)).collect();
        let qb: Vec<bf16> = q.iter().map(|&v| bf16::from_f32(v)).collect();
        // keys padded to a row stride larger than dk (a view of a wider cache)
        let kst = dk + 3;
        let kraw = uniform(b * g * cap * kst, 6);
        let vraw = uniform(b * g * cap * dv, 7);
        let (kh, vh): (Vec<f16>, Vec<f16>) = (
            kraw.iter().map(|&v| f16::from_f32(v)).collect(),
            vraw.iter().map(|&v| f16::from_f32(v)).collect(),
        );
        let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
            kraw.iter().map(|&v| bf16::from_f32(v)).collect(),
            vraw.iter().map(|&v| bf16::from_f32(v)).collect(),
        );
        for level in Level::available() {
            for dtype in 0..3u8 {
                let kc = |data| Cache {
                    data,
                    offset: 0,
                    strides: [g * cap * kst, cap * kst, kst],
                };
                let vc = |data| Cache {
                    data,
                    offset: 0,
                    strides: [g * cap * dv, cap * dv, dv],
                };
                let (kf, vf) = (round(&kraw, dtype), round(&vraw, dtype));
                let (qe, ke, ve) = match dtype {
                    1 => (Elems::F16(&qh), Elems::F16(&kh), Elems::F16(&vh)),
                    2 => (Elems::Bf16(&qb), Elems::Bf16(&kb), Elems::Bf16(&vb)),
                    _ => (Elems::F32(&q), Elems::F32(&kraw), Elems::F32(&vraw)),
                };
                let p = Problem {
                    q: qe,
                    b,
                    g,
                    rows,
                    dk,
                    dv,
                    k: kc(ke),
                    v: (!shared).then(|| vc(ve)),
                    q_starts: starts,
                    q_len,
                };
                let got = attention(level, &p);
                let want = reference(&p, &round(&q, dtype), &kf, (!shared).then_some(&vf[..]));
                // the bf16 dot products round the softmax weights to bf16: each output is off
                // by at most 2^-8 (bf16's unit roundoff) of the largest value it averages
                let dot = uses_bf16_dot(level, &p);
                let widths = dk.is_multiple_of(32) && dv.is_multiple_of(32);
                assert_eq!(
                    dot,
                    level == Level::Avx512Bf16 && dtype == 2 && widths,
                    "{level} dtype {dtype} dk {dk} dv {dv}: bf16 dot products taken or not"
                );
                let vmax = (if shared { &kf } else { &vf })
                    .iter()
                    .fold(0f32, |a, x| a.max(x.abs()));
                let tol = if dot { vmax / 256.0 + 2e-5 } else { 2e-5 };
                for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                    assert!((a - w).abs() < tol, "{level} dtype {dtype} [{i}]: {a} vs {w} (b {b} g {g} rows {rows} dk {dk} dv {dv})");
                }
            }
        }
    }

    #[test]
    fn decode_steps_match_the_reference_at_every_level_and_storage_type() {
        // one row per pair, many pairs, odd widths (tails at every vector width)
        check(3, 4, 1, 37, 29, 80, &[5, 70, 0], 1, false);
        // absorbed MLA's shape: one group, many rows, values inside the keys, long context split
        check(1, 1, 8, 40, 32, 1500, &[1400], 1, true);
        // 13 rows: groups of 8 (AVX-512), 4 and 1
        check(1, 1, 13, 72, 64, 300, &[299], 1, true);
        // 5 rows: one tile of four rows, scored four (two) keys at a time, and a single row; 67
        // keys: a block of 64, then one of 3 keys (fewer than a key tile)
        check(1, 1, 5, 37, 29, 67, &[66], 1, true);
        // 7 rows (a tile and a group of 3 after it), dk a whole number of pairs (no tail: absorbed
        // MLA's 576 is one)
        check(1, 1, 7, 64, 64, 67, &[66], 1, true);
    }

    #[test]
    fn bf16_dot_products_match_the_reference_at_deepseek_widths() {
        // absorbed MLA: 16 heads on one latent (576 / 512), 301 keys (split in key ranges on
        // two or more threads: blocks of 64 and an odd last one)
        check(1, 1, 16, 576, 512, 301, &[300], 1, true);
        // MHA decode of two sequences (128-wide heads, separate values): one row per pair, an
        // odd last block (151 keys)
        check(2, 4, 1, 128, 128, 200, &[150, 7], 1, false);
        // 13 rows: value groups of 8, 4 and 1, score groups of 4, 4, 4 and 1; 131 keys
        check(1, 1, 13, 64, 64, 131, &[130], 1, true);
        // a verify step: 3 tokens per sequence, each row masked at its own position (rows that
        // see none of a block's last keys; odd counts)
        check(2, 2, 6, 64, 32, 300, &[0, 290], 3, false);
        // DeepSeek-V2-Lite / V3 MHA head width 192 against values of 128
        check(1, 2, 3, 192, 128, 90, &[88], 1, false);
        // prefill chunks (many rows: keys packed as column pairs): 2 heads x 35 tokens on one
        // latent; separate values with rows past a block's keys; tiles of many rows
        check(1, 1, 70, 96, 64, 300, &[200], 35, true);
        check(2, 2, 40, 64, 32, 200, &[0, 150], 40, false);
        check(1, 1, 600, 32, 32, 650, &[40], 600, false);
        // one pair of 40 rows, key ranges split (partials combined) on two or more threads
        check(1, 1, 40, 64, 32, 1500, &[1400], 40, false);
    }

    /// Flat scores (every key equally likely) over equal values: the rounding of the weights
    /// to bf16 does not cancel across keys, the case the 2^-8 bound is for.
    #[test]
    fn bf16_dot_products_stay_within_the_bound_on_flat_scores() {
        let (rows, dk, dv, n) = (5, 32, 32, 200);
        let qb = vec![bf16::ZERO; rows * dk];
        let kv: Vec<bf16> = (0..n * dk)
            .map(|i| bf16::from_f32(if i % dk < dv { 0.75 } else { 0.1 }))
            .collect();
        let starts = [n - 1];
        let p = Problem {
            q: Elems::Bf16(&qb),
            b: 1,
            g: 1,
            rows,
            dk,
            dv,
            k: Cache {
                data: Elems::Bf16(&kv),
                offset: 0,
                strides: [n * dk, n * dk, dk],
            },
            v: None,
            q_starts: &starts,
            q_len: 1,
        };
        for level in Level::available() {
            for (i, x) in attention(level, &p).iter().enumerate() {
                // weights exp(0) = 1 are exact in bf16: the average of equal values is exact
                assert!((x - 0.75).abs() < 1e-6, "{level} [{i}]: {x}");
            }
        }
        // scores spread so that most weights round (exp(-s) for s in [0, 2)): within 2^-8
        let q: Vec<bf16> = (0..rows * dk)
            .map(|i| bf16::from_f32(if i % dk == 0 { 1.0 } else { 0.0 }))
            .collect();
        let kv: Vec<bf16> = (0..n * dk)
            .map(|i| {
                let (t, c) = (i / dk, i % dk);
                bf16::from_f32(if c == 0 {
                    -(((t * 37) % 200) as f32) / 100.0
                } else {
                    0.5
                })
            })
            .collect();
        let p = Problem {
            q: Elems::Bf16(&q),
            k: Cache {
                data: Elems::Bf16(&kv),
                ..p.k
            },
            ..p
        };
        for level in Level::available() {
            let got = attention(level, &p);
            for r in 0..rows {
                // column 0 holds the keys' own first element; every other column is 0.5
                for (c, x) in got[r * dv..(r + 1) * dv].iter().enumerate().skip(1) {
                    assert!(
                        (x - 0.5).abs() <= 0.5 / 256.0 + 1e-6,
                        "{level} row {r} column {c}: {x}"
                    );
                }
            }
        }
    }

    #[test]
    fn verify_steps_mask_each_row_by_its_own_position() {
        // 3 tokens per sequence, 2 heads per group as rows (rows = heads x tokens)
        check(2, 2, 6, 16, 16, 300, &[0, 290], 3, false);
        // a row group of fewer than four rows, and a context shorter than one key block
        check(1, 3, 3, 8, 8, 10, &[2], 3, false);
    }

    #[test]
    fn prefill_chunks_match_the_reference_at_every_level_and_storage_type() {
        // packed key blocks (>= PACKED_ROWS rows), odd widths, rows past a block's keys skipped
        check(2, 2, 40, 37, 29, 200, &[0, 150], 40, false);
        // 2 heads x 35 tokens as rows, values inside the keys (absorbed MLA's prefill)
        check(1, 1, 70, 72, 64, 300, &[200], 35, true);
        // one pair, rows too few to tile: key ranges split, partials combined
        check(1, 1, 40, 16, 16, 1500, &[1400], 40, false);
        // rows tiled across tasks (more than MAX_TILE_ROWS), tiles of unequal fill
        check(1, 1, 600, 16, 8, 650, &[40], 600, false);
    }
}
