//! Rotary position embedding, interleaved pairs (DeepSeek's `view_as_complex` convention).
//!
//! The angles are computed on the host for the positions a call needs, so no table that grows
//! with the maximum sequence length is kept on the device (it would distort memory figures).
//! The last table computed is kept (host, one entry): every layer of one forward rotates the
//! same positions, so the angles are computed once per forward, not once per layer and tensor.
//! On burn-flex (f32) the rotation is one pass over the input's strided view into a contiguous
//! output; the portable tensor-op path (six strided element-wise ops, a stack) measured 26 % of
//! the CPU time of `dsopt bench mtp` (perf, flex) before this pass existed.

use std::cell::RefCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorData};

use super::flex::{from_flex, into_flex};

/// cos and sin of every (row, position, pair): row `r` covers `rows[r]..rows[r]+len`.
struct Table {
    rows: Vec<usize>,
    len: usize,
    d: usize,
    rope: Rope,
    cos: Rc<Vec<f32>>,
    sin: Rc<Vec<f32>>,
}

thread_local! {
    static LAST: RefCell<Option<Table>> = const { RefCell::new(None) };
}

/// The cos and sin tables (`[rows.len(), len, d/2]`, row-major) for `rows`, reused when the
/// previous call asked for the same positions.
fn host_tables(rows: &[usize], len: usize, d: usize, rope: Rope) -> (Rc<Vec<f32>>, Rc<Vec<f32>>) {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(t) = last.as_ref() {
            if t.rows == rows && t.len == len && t.d == d && t.rope == rope {
                return (t.cos.clone(), t.sin.clone());
            }
        }
        let half = d / 2;
        let mut cos = Vec::with_capacity(rows.len() * len * half);
        let mut sin = Vec::with_capacity(rows.len() * len * half);
        // 第 i 对的频率：普通 RoPE 为 theta^(-2i/d)；YaRN 在高低频之间按斜坡混合（见 [`Yarn::inv_freq`]）
        let freqs = rope.inv_freq(d);
        // YaRN 的 cos/sin 系数（transformers 的 attention_factor；DeepSeek 各版本都是 1）
        let af = rope.attention_factor();
        for &start in rows {
            for p in start..start + len {
                for &freq in &freqs {
                    let a = p as f64 * freq;
                    cos.push((a.cos() * af) as f32);
                    sin.push((a.sin() * af) as f32);
                }
            }
        }
        let (cos, sin) = (Rc::new(cos), Rc::new(sin));
        *last = Some(Table {
            rows: rows.to_vec(),
            len,
            d,
            rope,
            cos: cos.clone(),
            sin: sin.clone(),
        });
        (cos, sin)
    })
}

/// cos and sin tables `[n, len, d/2]`: row `i` holds positions `starts[i]..starts[i]+len`.
fn tables_multi<B: Backend>(
    starts: &[usize],
    len: usize,
    d: usize,
    rope: Rope,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let half = d / 2;
    let n = starts.len();
    let (cos, sin) = host_tables(starts, len, d, rope);
    (
        Tensor::from_data(TensorData::new(cos.to_vec(), [n, len, half]), device),
        Tensor::from_data(TensorData::new(sin.to_vec(), [n, len, half]), device),
    )
}

/// The one start shared by every sequence, if they all start at the same position.
pub fn uniform(starts: &[usize]) -> Option<usize> {
    let first = *starts.first()?;
    starts.iter().all(|&s| s == first).then_some(first)
}

/// Rotates `x` `[b, h, len, d]`; sequence `i` of the batch sits at positions
/// `starts[i]..starts[i]+len` (one entry per sequence; all equal in plain prefill/decode,
/// different in batched speculative decoding where each sequence keeps its own length).
///
/// # Shapes
/// - x: `[b, h, len, d]`, d even; pairs are (x[2i], x[2i+1]).
pub fn apply4<B: Backend>(x: Tensor<B, 4>, starts: &[usize], rope: Rope) -> Tensor<B, 4> {
    apply4_scaled(x, starts, rope, 1.0)
}

/// [`apply4`] times `scale` (the softmax scale folded into the query rotation).
pub fn apply4_scaled<B: Backend>(
    x: Tensor<B, 4>,
    starts: &[usize],
    rope: Rope,
    scale: f32,
) -> Tensor<B, 4> {
    let [b, _, _, d] = x.dims();
    assert_eq!(starts.len(), b, "one start position per sequence");
    assert!(d % 2 == 0, "RoPE needs an even head dimension");
    // one table row for all when the starts agree, else one per sequence
    let rows = match uniform(starts) {
        Some(s) => vec![s],
        None => starts.to_vec(),
    };
    match flex_rotate(x, &rows, rope, scale) {
        Ok(done) => done,
        Err(x) => portable(x, &rows, rope, scale),
    }
}

/// The tensor-op rotation (every backend; the reference the flex pass is tested against).
fn portable<B: Backend>(x: Tensor<B, 4>, rows: &[usize], rope: Rope, scale: f32) -> Tensor<B, 4> {
    let [b, h, len, d] = x.dims();
    let half = d / 2;
    let (cos, sin) = tables_multi::<B>(rows, len, d, rope, &x.device());
    let nb = rows.len();
    let cos = cos.reshape([nb, 1, len, half]).expand([b, h, len, half]);
    let sin = sin.reshape([nb, 1, len, half]).expand([b, h, len, half]);
    let pairs = x.reshape([b, h, len, half, 2]);
    let x0 = pairs
        .clone()
        .slice([0..b, 0..h, 0..len, 0..half, 0..1])
        .reshape([b, h, len, half]);
    let x1 = pairs
        .slice([0..b, 0..h, 0..len, 0..half, 1..2])
        .reshape([b, h, len, half]);
    let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
    let r1 = x0 * sin + x1 * cos;
    let out = Tensor::stack::<5>(vec![r0, r1], 4).reshape([b, h, len, d]);
    if scale == 1.0 {
        out
    } else {
        out * scale
    }
}

/// The flex pass: reads `x` through its strides (any view whose pairs are adjacent) and writes
/// a contiguous `[b, h, len, d]`; computes `(x0·cos − x1·sin)·scale` and `(x0·sin + x1·cos)·scale`
/// in the same order as the tensor-op path (in f32: half precision is widened on reading and
/// rounded once on writing, where the tensor-op path rounds every product). Gives `x` back when
/// it does not apply (another backend, another dtype, pairs not adjacent).
fn flex_rotate<B: Backend>(
    x: Tensor<B, 4>,
    rows: &[usize],
    rope: Rope,
    scale: f32,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, len, d] = x.dims();
    let xf = into_flex(x)?;
    let st = xf.layout().strides().to_vec();
    let known = matches!(xf.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !known || st[3] != 1 || st.iter().any(|&s| s < 0) || b * h * len * d == 0 {
        return Err(from_flex(xf));
    }
    let st: Vec<usize> = st.iter().map(|&s| s as usize).collect();
    let half = d / 2;
    let (cos, sin) = host_tables(rows, len, d, rope);
    let off = xf.layout().start_offset();
    // the last element any row reads, plus one
    let span = off
        + (0..4)
            .map(|k| ([b, h, len, d][k] - 1) * st[k])
            .sum::<usize>()
        + 1;
    let src = crate::nn::flex::elems(&xf, 0, span);
    let level = crate::kernels::Level::current();
    let mut xin = vec![0f32; d];
    let mut out = vec![0f32; b * h * len * d];
    for (o, chunk) in out.chunks_exact_mut(d).enumerate() {
        let (bh, li) = (o / len, o % len);
        let (bi, hi) = (bh / h, bh % h);
        let r = if rows.len() == 1 { 0 } else { bi };
        let t = (r * len + li) * half;
        let (c, s) = (&cos[t..t + half], &sin[t..t + half]);
        let i0 = off + bi * st[0] + hi * st[1] + li * st[2];
        // half precision widened once per row (f32: a copy)
        crate::kernels::convert::widen(level, src.sub(i0, d), &mut xin);
        for i in 0..half {
            let (x0, x1) = (xin[2 * i], xin[2 * i + 1]);
            chunk[2 * i] = (x0 * c[i] - x1 * s[i]) * scale;
            chunk[2 * i + 1] = (x0 * s[i] + x1 * c[i]) * scale;
        }
    }
    let shape = Shape::from([b, h, len, d]);
    Ok(from_flex(crate::nn::flex::from_f32(out, shape, xf.dtype())))
}

/// `apply4` for `[b, len, d]` (one head, e.g. MLA's shared RoPE key).
pub fn apply<B: Backend>(x: Tensor<B, 3>, starts: &[usize], rope: Rope) -> Tensor<B, 3> {
    let [b, len, d] = x.dims();
    apply4(x.reshape([b, 1, len, d]), starts, rope).reshape([b, len, d])
}

/// RoPE 的频率设定：基数 θ（config.json 的 `rope_theta`），以及可选的 YaRN 长上下文缩放
/// （config.json 的 `rope_scaling`，`type = "yarn"`）。旋转总是按相邻元素成对（interleaved），
/// 与 DeepSeek 参考实现的 `view_as_complex` 一致。
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// 基数 θ。
    pub theta: f64,
    /// YaRN（`None` = 普通 RoPE）。
    pub yarn: Option<Yarn>,
}

impl Rope {
    /// 普通 RoPE（没有 YaRN）。
    pub fn plain(theta: f64) -> Self {
        Rope { theta, yarn: None }
    }

    /// 旋转宽度为 `d` 时每一对的角频率（`d/2` 个）。
    pub fn inv_freq(&self, d: usize) -> Vec<f64> {
        match &self.yarn {
            None => (0..d / 2)
                .map(|i| self.theta.powf(-(2.0 * i as f64) / d as f64))
                .collect(),
            Some(y) => y.inv_freq(d, self.theta),
        }
    }

    /// cos 与 sin 的系数（普通 RoPE 为 1）。
    pub fn attention_factor(&self) -> f64 {
        self.yarn.as_ref().map_or(1.0, Yarn::attention_factor)
    }

    /// 整个 softmax logit 的额外系数（普通 RoPE 为 1；YaRN 为 `mscale(s, mscale_all_dim)²`）。
    pub fn softmax_factor(&self) -> f64 {
        self.yarn.as_ref().map_or(1.0, Yarn::softmax_factor)
    }
}

/// YaRN 参数，名字与 config.json 的 `rope_scaling` 相同（DeepSeek-V3 `inference/model.py` 的
/// `precompute_freqs_cis` 与 `MLA.__init__`，transformers 的 `_compute_yarn_parameters`）。公式与 transformers 一致（它生成参考 logits）：
/// - `mscale(s, m) = 1`（s <= 1）否则 `0.1·m·ln s + 1`；
/// - 角频率在外推 `b^(-2i/d)` 与内插 `b^(-2i/d)/s` 之间按 `[low, high]` 上的线性斜坡混合；
/// - cos/sin 乘以 [`Yarn::attention_factor`]，softmax 缩放乘以 [`Yarn::softmax_factor`]。
///
/// 与 DeepSeek `inference/model.py` 的差别：那里只在 `max_seq_len > original_seq_len` 时才用
/// YaRN 的频率；transformers（以及 dsopt）总是使用。
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yarn {
    /// 上下文扩展倍数 s（DeepSeek：40）。
    pub factor: f64,
    /// 原始训练长度 L（DeepSeek：4096）。
    pub original_max_position_embeddings: usize,
    /// 斜坡高频端的旋转圈数（默认 32）。
    #[serde(default = "beta_fast")]
    pub beta_fast: f64,
    /// 斜坡低频端的旋转圈数（默认 1）。
    #[serde(default = "beta_slow")]
    pub beta_slow: f64,
    /// config.json 的系数 m（`mscale`，不是算好的系数；V2/V2-Lite 0.707，V3 1.0）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// config.json 的 `mscale_all_dim`（softmax 缩放用它）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
}

fn beta_fast() -> f64 {
    32.0
}
fn beta_slow() -> f64 {
    1.0
}

/// YaRN 的 `mscale(s, m)`：`s <= 1` 时为 1，否则 `0.1·m·ln s + 1`。
pub fn yarn_get_mscale(s: f64, m: f64) -> f64 {
    if s <= 1.0 {
        1.0
    } else {
        0.1 * m * s.ln() + 1.0
    }
}

impl Yarn {
    /// 旋转宽度 `d`、基数 `theta` 时每一对的角频率。
    pub fn inv_freq(&self, d: usize, theta: f64) -> Vec<f64> {
        let (s, l) = (self.factor, self.original_max_position_embeddings as f64);
        // 转 r 圈的波长所对应的维度：corr(r) = d·ln(L/(2πr)) / (2 ln θ)
        let corr =
            |r: f64| d as f64 * (l / (2.0 * std::f64::consts::PI * r)).ln() / (2.0 * theta.ln());
        let low = corr(self.beta_fast).floor().max(0.0);
        let mut high = corr(self.beta_slow).ceil().min(d as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        (0..d / 2)
            .map(|i| {
                let extra = theta.powf(-(2.0 * i as f64) / d as f64);
                let inter = extra / s;
                // 斜坡 0 -> 1：低于 low 的维度保持原频率（外推），高于 high 的按 s 内插
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let mask = 1.0 - ramp;
                inter * (1.0 - mask) + extra * mask
            })
            .collect()
    }

    /// cos/sin 的系数：两个系数都给出时为 `mscale(s, mscale)/mscale(s, mscale_all_dim)`
    /// （DeepSeek 各版本为 1），否则为 `mscale(s, 1)`（transformers 的规则）。
    pub fn attention_factor(&self) -> f64 {
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                yarn_get_mscale(self.factor, m) / yarn_get_mscale(self.factor, a)
            }
            _ => yarn_get_mscale(self.factor, 1.0),
        }
    }

    /// softmax logit 的系数 `mscale(s, mscale_all_dim)²`（`mscale_all_dim` 缺省或为 0 时为 1）。
    pub fn softmax_factor(&self) -> f64 {
        match self.mscale_all_dim {
            Some(a) if a != 0.0 => yarn_get_mscale(self.factor, a).powi(2),
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    #[test]
    fn rotates_pairs_by_position_times_frequency() {
        let dev = Default::default();
        // d = 4: pair 0 frequency 1, pair 1 frequency theta^-0.5 = 0.01 for theta = 10000
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 1.0, 0.0], [1, 1, 4]),
            &dev,
        );
        let y: Vec<f32> = apply(x, &[2], Rope::plain(10000.0))
            .into_data()
            .to_vec()
            .unwrap();
        let expect = [2f32.cos(), 2f32.sin(), 0.02f32.cos(), 0.02f32.sin()];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn relative_position_property() {
        // <rope(q, m), rope(k, n)> depends only on m - n
        let dev = Default::default();
        let q = Tensor::<B, 3>::from_data(
            TensorData::new(vec![0.3f32, -1.2, 0.7, 0.5], [1, 1, 4]),
            &dev,
        );
        let k = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.1f32, 0.4, -0.2, 0.9], [1, 1, 4]),
            &dev,
        );
        let dot = |m, n| -> f32 {
            (apply(q.clone(), &[m], Rope::plain(100.0))
                * apply(k.clone(), &[n], Rope::plain(100.0)))
            .sum()
            .into_scalar()
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-5);
        assert!((dot(5, 2) - dot(2, 5)).abs() > 1e-3);
    }

    #[test]
    fn flex_pass_equals_the_tensor_ops_on_strided_views() {
        let dev = Default::default();
        // [b, s, h, d] as the projections give it, viewed as [b, h, s, d] (strided), and a
        // column slice of it (MLA's RoPE part)
        let raw = Tensor::<B, 4>::from_data(
            TensorData::new(crate::rng::uniform(3 * 4 * 2 * 10, 5), [3, 4, 2, 10]),
            &dev,
        );
        let views = [
            raw.clone().slice([0..3, 0..4, 0..2, 0..8]).swap_dims(1, 2),
            raw.clone().slice([0..3, 0..4, 0..2, 4..10]).swap_dims(1, 2),
            raw.clone().slice([0..3, 0..4, 0..2, 0..8]),
        ];
        for (v, x) in views.into_iter().enumerate() {
            for (starts, rows) in [(vec![5, 5, 5], vec![5]), (vec![0, 9, 3], vec![0, 9, 3])] {
                for scale in [1.0f32, 0.125] {
                    let fast = apply4_scaled(x.clone(), &starts, Rope::plain(10000.0), scale);
                    let reference = portable(x.clone(), &rows, Rope::plain(10000.0), scale);
                    assert_eq!(fast.dims(), reference.dims());
                    let d: f32 = (fast - reference).abs().max().into_scalar();
                    assert!(d <= 1e-6, "view {v}, starts {starts:?}, scale {scale}: {d}");
                    // half precision: read as stored, rotated in f32, rounded once
                    for (dt, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
                        let xh = x.clone().cast(dt);
                        let fast = apply4_scaled(xh.clone(), &starts, Rope::plain(10000.0), scale);
                        assert_eq!(fast.dtype(), dt);
                        let reference =
                            portable(xh.cast(DType::F32), &rows, Rope::plain(10000.0), scale);
                        let d: f32 = (fast.cast(DType::F32) - reference)
                            .abs()
                            .max()
                            .into_scalar();
                        assert!(d <= tol, "{dt:?} view {v}, starts {starts:?}: {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn per_sequence_starts_match_separate_calls() {
        let dev = Default::default();
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(crate::rng::uniform(2 * 3 * 2 * 4, 3), [2, 3, 2, 4]),
            &dev,
        );
        let both = apply4(x.clone(), &[1, 7], Rope::plain(10000.0));
        for (i, start) in [1usize, 7].into_iter().enumerate() {
            let one = apply4(
                x.clone().slice([i..i + 1, 0..3, 0..2, 0..4]),
                &[start],
                Rope::plain(10000.0),
            );
            let got = both.clone().slice([i..i + 1, 0..3, 0..2, 0..4]);
            let d: f32 = (one - got).abs().max().into_scalar();
            assert!(d < 1e-7, "sequence {i}: {d}");
        }
    }

    /// DeepSeek-V3's rope_scaling (its config.json): factor 40, original 4096, betas 32 / 1.
    fn v3_yarn(m: f64) -> Yarn {
        Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(m),
            mscale_all_dim: Some(m),
        }
    }

    #[test]
    fn yarn_frequencies_follow_the_reference_ramp() {
        // d = 64, θ = 10000: corr(32) = 10.2 -> low 10, corr(1) = 22.1 -> high 23; values from
        // the formula of `precompute_freqs_cis` evaluated independently (Python, f64)
        let f = v3_yarn(1.0).inv_freq(64, 10000.0);
        assert_eq!(f.len(), 32);
        let expect = [
            (0, 1.0),
            (9, 0.07498942093324558),
            (10, 0.05623413251903491),
            (11, 0.03900692656714386),
            (15, 0.008334508951020777),
            (20, 0.0007905694150420946),
            (23, 3.33380358040831e-05),
            (31, 3.3338035804083097e-06),
        ];
        for (i, v) in expect {
            assert!(
                (f[i] - v).abs() <= 1e-12 * v.max(1e-6) + 1e-18,
                "pair {i}: {} vs {v}",
                f[i]
            );
        }
        // below `low` the frequency is the plain one, above `high` it is divided by the factor
        let plain = Rope::plain(10000.0).inv_freq(64);
        assert_eq!(f[3], plain[3]);
        assert!((f[28] - plain[28] / 40.0).abs() < 1e-20);
    }

    #[test]
    fn yarn_softmax_scale_matches_the_published_constants() {
        // (qk_nope + qk_rope)^-0.5 · mscale(40, mscale_all_dim)²: V3 0.13523, V2/V2-Lite 0.11472
        let base = 192f64.powf(-0.5);
        let v3 = base * v3_yarn(1.0).softmax_factor();
        let v2 = base * v3_yarn(0.707).softmax_factor();
        assert!((v3 - 0.135236).abs() < 5e-6, "{v3}");
        assert!((v2 - 0.114722).abs() < 5e-6, "{v2}");
        // cos/sin factor mscale/mscale_all_dim = 1 for every DeepSeek release
        assert_eq!(v3_yarn(0.707).attention_factor(), 1.0);
        // without mscale_all_dim the logit is not rescaled, and transformers scales cos/sin
        let bare = Yarn {
            mscale: None,
            mscale_all_dim: None,
            ..v3_yarn(1.0)
        };
        assert_eq!(bare.softmax_factor(), 1.0);
        assert!((bare.attention_factor() - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(yarn_get_mscale(1.0, 0.707), 1.0);
    }

    #[test]
    fn yarn_rotation_uses_its_frequencies_and_factor() {
        let dev = Default::default();
        let rope = Rope {
            theta: 10000.0,
            yarn: Some(Yarn {
                mscale: None,
                mscale_all_dim: None,
                ..v3_yarn(1.0)
            }),
        };
        let d = 64;
        let mut v = vec![0f32; d];
        v[2 * 28] = 1.0; // pair 28, interpolated
        let x = Tensor::<B, 3>::from_data(TensorData::new(v, [1, 1, d]), &dev);
        let y: Vec<f32> = apply(x, &[5000], rope).into_data().to_vec().unwrap();
        let f = rope.inv_freq(d)[28];
        let af = rope.attention_factor();
        let a = 5000.0 * f;
        assert!((y[56] as f64 - a.cos() * af).abs() < 1e-5, "{}", y[56]);
        assert!((y[57] as f64 - a.sin() * af).abs() < 1e-5, "{}", y[57]);
        assert!(y
            .iter()
            .enumerate()
            .all(|(i, v)| i == 56 || i == 57 || *v == 0.0));
    }
}
