//! 生成：普通贪心自回归解码，与带 MTP 草稿的自推测解码（贪心验证）。
//!
//! 自推测解码每一步：主模型对"上一步的最后一个 token + D 个草稿"做**一次** k+1 个 token 的
//! 前向，逐序列接受与主模型自身 argmax 一致的最长草稿前缀，再取主模型的下一个 token；随后
//! MTP 模块起草下 D 个 token。批中每条序列保留自己的已接受长度（KV 缓存按序列各自的位置
//! 写入与屏蔽，RoPE 按各自的位置旋转），不等待最慢的序列。输出与普通贪心解码逐 token 相同
//! （测试证明；数值上验证前向与单步前向的浮点舍入可能不同，基准报告逐序列比对结果）。
//!
//! 已生成够 `new_tokens` 的序列在批中继续参与计算直到全部完成（静态批处理），但不再增长，
//! 其结果被忽略；这部分开销计入测得的时间。

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::nn::attention::{append, LayerCache};
use crate::nn::mtp::MtpPredictor;
use crate::nn::Decoder;

/// 草稿来源：训练好的 MTP 模块，或测试用的"植入"草稿函数。
pub enum Drafter<'a, B: Backend> {
    /// MTP 模块（深度 = 草稿数 D）。
    Mtp(&'a MtpPredictor<B>),
    /// `f(sequence index, tokens so far) -> D drafts`（测试：强制全对或全错）。
    Planted {
        /// 草稿数 D。
        depth: usize,
        /// 草稿函数。
        f: &'a dyn Fn(usize, &[u32]) -> Vec<u32>,
    },
}

impl<B: Backend> Drafter<'_, B> {
    /// Draft depth D.
    pub fn depth(&self) -> usize {
        match self {
            Drafter::Mtp(m) => m.depth(),
            Drafter::Planted { depth, .. } => *depth,
        }
    }
}

/// 自推测解码的统计。
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    /// 验证步数（批的前向次数）。
    pub steps: usize,
    /// 逐序列的验证步数之和（序列完成后不再计数）。
    pub sequence_steps: usize,
    /// 第 j 个草稿被检验的次数（前 j-1 个都已接受）。
    pub attempted: Vec<usize>,
    /// 第 j 个草稿被接受的次数。
    pub accepted: Vec<usize>,
    /// 每步新增 token（接受的草稿 + 1）之和。
    pub tokens: usize,
    /// 两个阶段的墙钟时间（秒）：预填充（到第一个生成的 token 读回为止）与其后的解码。
    pub phases: PhaseTimes,
    /// 主机读回（设备同步）次数：预填充 1 次，之后每个验证步 1 次。
    pub read_backs: usize,
    /// 验证（D+1 个 token 的主模型前向、设备上的接受判定、读回、主机记账）的秒数之和。
    /// 在 CPU 后端上是真实计算时间；在异步后端上，起草的设备计算会落在下一次读回里。
    pub verify_s: f64,
    /// 起草（D 个 MTP 模块）的秒数之和（同上）。
    pub draft_s: f64,
}

/// 一次生成的两个阶段：预填充（整个提示 + 第一个生成 token 的读回）与之后的解码步。
/// 读回（`argmax` 到主机）是同步点，所以两段时间都包含设备上的真实计算。
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// 预填充秒数。
    pub prefill_s: f64,
    /// 解码秒数（第一个生成 token 之后的全部步）。
    pub decode_s: f64,
}

impl SpecStats {
    /// Writes the acceptance figures into a report's metrics: `mean_accepted_length`,
    /// `verify_steps`, and per draft position `acceptance_conditional_d{j}` / `acceptance_d{j}`.
    pub fn insert_metrics(&self, metrics: &mut std::collections::BTreeMap<String, Option<f64>>) {
        metrics.insert("mean_accepted_length".into(), self.mean_accepted_length());
        metrics.insert("verify_steps".into(), Some(self.steps as f64));
        let per_step = |x: f64| (self.steps > 0).then(|| x / self.steps as f64);
        // the prefill's read-back (the first token) is not a step's
        metrics.insert(
            "read_backs_per_step".into(),
            per_step(self.read_backs.saturating_sub(1) as f64),
        );
        metrics.insert("verify_s_per_step".into(), per_step(self.verify_s));
        metrics.insert("draft_s_per_step".into(), per_step(self.draft_s));
        metrics.insert(
            "draft_over_verify".into(),
            (self.verify_s > 0.0).then(|| self.draft_s / self.verify_s),
        );
        let per_position = self
            .conditional_acceptance()
            .into_iter()
            .zip(self.acceptance());
        for (j, (c, u)) in per_position.enumerate() {
            metrics.insert(format!("acceptance_conditional_d{}", j + 1), c);
            metrics.insert(format!("acceptance_d{}", j + 1), u);
        }
    }

    /// Acceptance rate of draft position j given that drafts 1..j-1 were accepted.
    pub fn conditional_acceptance(&self) -> Vec<Option<f64>> {
        self.attempted
            .iter()
            .zip(&self.accepted)
            .map(|(&n, &a)| (n > 0).then(|| a as f64 / n as f64))
            .collect()
    }

    /// Fraction of sequence-steps in which draft position j was accepted.
    pub fn acceptance(&self) -> Vec<Option<f64>> {
        self.accepted
            .iter()
            .map(|&a| (self.sequence_steps > 0).then(|| a as f64 / self.sequence_steps as f64))
            .collect()
    }

    /// Mean tokens gained per sequence-step (accepted drafts + the main model's own token).
    pub fn mean_accepted_length(&self) -> Option<f64> {
        (self.sequence_steps > 0).then(|| self.tokens as f64 / self.sequence_steps as f64)
    }
}

/// Token ids `[b, s]` on `device` from rows of equal length.
pub fn id_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let s = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), s]), device)
}

/// Row-wise argmax of logits `[b, s, v]` read back to the host: `b` rows of `s` ids.
fn argmax_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<u32>> {
    try_argmax_rows(logits).expect("argmax ids")
}

/// [`argmax_rows`] with a read-back failure returned instead of a panic.
pub fn try_argmax_rows<B: Backend>(logits: Tensor<B, 3>) -> anyhow::Result<Vec<Vec<u32>>> {
    let [b, s, _] = logits.dims();
    id_rows(logits.argmax(2).reshape([b, s]))
}

/// Token ids `[b, n]` read back to the host as `b` rows (one device synchronisation).
fn id_rows<B: Backend>(ids: Tensor<B, 2, Int>) -> anyhow::Result<Vec<Vec<u32>>> {
    let [b, n] = ids.dims();
    let flat: Vec<i64> = ids
        .into_data()
        .convert::<i64>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("reading token ids back: {e:?}"))?;
    Ok((0..b)
        .map(|i| flat[i * n..(i + 1) * n].iter().map(|&t| t as u32).collect())
        .collect())
}

fn check_prompts(prompts: &[Vec<u32>]) -> usize {
    let p = prompts.first().map(Vec::len).unwrap_or(0);
    assert!(p > 0, "prompts must not be empty");
    assert!(
        prompts.iter().all(|r| r.len() == p),
        "prompts of one batch must have equal length"
    );
    p
}

/// Plain greedy autoregressive decoding with the KV cache: `new_tokens` per sequence.
/// Returns only the generated tokens.
pub fn greedy<B: Backend>(
    model: &Decoder<B>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    prefill_chunk: usize,
) -> Vec<Vec<u32>> {
    greedy_timed(model, prompts, new_tokens, prefill_chunk).0
}

/// [`greedy`], with the wall time of its prefill and decode phases.
pub fn greedy_timed<B: Backend>(
    model: &Decoder<B>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    prefill_chunk: usize,
) -> (Vec<Vec<u32>>, PhaseTimes) {
    let started = std::time::Instant::now();
    let p = check_prompts(prompts);
    let b = prompts.len();
    let device = model.device();
    let mut cache = model.new_cache(b, p + new_tokens);
    let logits = model.prefill(
        id_tensor::<B>(prompts, &device),
        &mut cache,
        prefill_chunk,
        |_| {},
    );
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(new_tokens); b];
    let mut next: Vec<Vec<u32>> = argmax_rows(logits);
    let prefill_s = started.elapsed().as_secs_f64();
    for step in 0..new_tokens {
        for (o, n) in out.iter_mut().zip(&next) {
            o.push(n[0]);
        }
        if step + 1 == new_tokens {
            break;
        }
        let logits = model.decode_step(id_tensor::<B>(&next, &device), &mut cache);
        next = argmax_rows(logits);
    }
    let decode_s = started.elapsed().as_secs_f64() - prefill_s;
    (
        out,
        PhaseTimes {
            prefill_s,
            decode_s,
        },
    )
}

/// Per-sequence state of the MTP drafter between steps.
struct MtpState<B: Backend> {
    /// Main-model residual stream (before the final norm) at every committed position:
    /// `[b, 1, cap, d]`.
    hidden: Option<Tensor<B, 4>>,
    /// One cache layer per module.
    caches: Vec<LayerCache<B>>,
    /// Output of module k (the input of module k+1) at every position it has computed,
    /// `[b, 1, cap, d]`, for k = 0..D-1 (the last module's output feeds nothing).
    outputs: Vec<Option<Tensor<B, 4>>>,
    /// `from[k][i]`: where module k's pass over sequence i starts next time (its cache and its
    /// outputs are final before it).
    from: Vec<Vec<usize>>,
}

/// Self-speculative greedy decoding: `new_tokens` per sequence, drafts from `drafter`.
/// Returns the generated tokens (identical to [`greedy`]'s) and acceptance statistics.
pub fn speculative<B: Backend>(
    model: &Decoder<B>,
    drafter: &Drafter<'_, B>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    prefill_chunk: usize,
) -> (Vec<Vec<u32>>, SpecStats) {
    speculative_traced(model, drafter, prompts, new_tokens, prefill_chunk, None)
}

/// Every drafting point of a run: the sequences as they stood and the drafts made for them.
pub type DraftTrace = Vec<(Vec<Vec<u32>>, Vec<Vec<u32>>)>;

/// Ids `[b, n]` read back to the host: ONE device synchronisation, counted in `stats`.
fn read_ids<B: Backend>(ids: Tensor<B, 2, Int>, stats: &mut SpecStats) -> Vec<Vec<u32>> {
    stats.read_backs += 1;
    id_rows(ids).expect("token ids")
}

/// Length of the longest prefix of `drafts` `[b, D]` that equals `predicted[:, ..D]`
/// (`predicted`: `[b, D+1]`), per sequence, computed on the device: `[b, 1]`.
pub fn accepted_lengths<B: Backend>(
    drafts: Tensor<B, 2, Int>,
    predicted: Tensor<B, 2, Int>,
) -> Tensor<B, 2, Int> {
    let [b, depth] = drafts.dims();
    let same = drafts.equal(predicted.slice([0..b, 0..depth])).int();
    same.cumprod(1).sum_dim(1)
}

/// [`speculative`], recording each drafting point in `trace` (tests check the incremental
/// drafter against a from-scratch computation; tracing reads the drafts back, one extra
/// synchronisation per step).
///
/// Per step the host reads back ONE tensor, `[b, 1 + (D+1)]`: each sequence's accepted length
/// (computed on the device, [`accepted_lengths`]) and the main model's D+1 tokens. The drafts
/// never leave the device: each module's argmax feeds the next module and the verify window
/// directly. `stats.read_backs` counts the synchronisations (tests hold it to one per step
/// plus one for the prefill).
pub fn speculative_traced<B: Backend>(
    model: &Decoder<B>,
    drafter: &Drafter<'_, B>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    prefill_chunk: usize,
    mut trace: Option<&mut DraftTrace>,
) -> (Vec<Vec<u32>>, SpecStats) {
    let depth = drafter.depth();
    if depth == 0 {
        // D = 0: exactly plain greedy decoding (FR-006)
        let stats = SpecStats::default();
        return (greedy(model, prompts, new_tokens, prefill_chunk), stats);
    }
    let started = std::time::Instant::now();
    let p = check_prompts(prompts);
    let b = prompts.len();
    let device = model.device();
    // room for the last verify window and the drafter's padded module pass
    let cap = p + new_tokens + 2 * depth + 2;
    let mut cache = model.new_cache(b, cap);
    let mut stats = SpecStats {
        attempted: vec![0; depth],
        accepted: vec![0; depth],
        ..SpecStats::default()
    };
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();

    // prefill: the whole prompt, then the main model's first token
    let mut trunk_parts = Vec::new();
    let mut i = 0;
    let chunk = prefill_chunk.max(1);
    let ids = id_tensor::<B>(prompts, &device);
    while i < p {
        let e = (i + chunk).min(p);
        let part = model.forward_trunk(
            ids.clone().slice([0..b, i..e]),
            &mut cache,
            &vec![i; b],
            None,
        );
        trunk_parts.push(part);
        i = e;
    }
    let trunk = Tensor::cat(trunk_parts, 1); // [b, p, d]
    let d = trunk.dims()[2];
    let last = trunk.clone().slice([0..b, p - 1..p, 0..d]);
    let first = model
        .logits(model.final_norm(last))
        .argmax(2)
        .reshape([b, 1]);
    for (s, n) in seqs.iter_mut().zip(read_ids(first, &mut stats)) {
        s.push(n[0]);
    }
    stats.phases.prefill_s = started.elapsed().as_secs_f64();
    let mut state = match drafter {
        Drafter::Mtp(m) => {
            let mut hidden = Some(crate::nn::attention::cache_write::zeros::<B>(
                [b, 1, cap, d],
                &device,
            ));
            append(&mut hidden, trunk.unsqueeze_dim::<4>(1), &vec![0; b]);
            let zeros = || {
                Some(crate::nn::attention::cache_write::zeros::<B>(
                    [b, 1, cap, d],
                    &device,
                ))
            };
            Some(MtpState {
                hidden,
                caches: m.new_caches(b, cap),
                outputs: (1..m.depth()).map(|_| zeros()).collect(),
                from: vec![vec![0; b]; m.depth()],
            })
        }
        Drafter::Planted { .. } => None,
    };
    let done = |seqs: &[Vec<u32>]| seqs.iter().all(|s| s.len() >= p + new_tokens);
    let mut clock = std::time::Instant::now();
    let mut drafts = draft(model, drafter, state.as_mut(), &seqs, &device);
    stats.draft_s += clock.elapsed().as_secs_f64();
    if let Some(t) = trace.as_deref_mut() {
        t.push((seqs.clone(), read_ids(drafts.clone(), &mut stats)));
    }

    while !done(&seqs) {
        clock = std::time::Instant::now();
        // verify: the last token plus the D drafts, each sequence at its own position
        let starts: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        let last: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| vec![*s.last().expect("token")])
            .collect();
        let window = Tensor::cat(vec![id_tensor::<B>(&last, &device), drafts.clone()], 1);
        let trunk = model.forward_trunk(window, &mut cache, &starts, None);
        if let Some(st) = state.as_mut() {
            append(&mut st.hidden, trunk.clone().unsqueeze_dim::<4>(1), &starts);
        }
        let predicted = model
            .logits(model.final_norm(trunk))
            .argmax(2)
            .reshape([b, depth + 1]);
        let accepted = accepted_lengths(drafts.clone(), predicted.clone());
        // the one read-back of the step: accepted lengths, the main model's D+1 tokens, drafts
        let back = read_ids(
            Tensor::cat(vec![accepted, predicted, drafts], 1),
            &mut stats,
        );
        stats.steps += 1;
        for (s, row) in seqs.iter_mut().zip(&back) {
            if s.len() >= p + new_tokens {
                continue; // finished: stays in the batch, computed and ignored
            }
            let a = row[0] as usize;
            let (y, dr) = (&row[1..depth + 2], &row[depth + 2..]);
            debug_assert_eq!(a, (0..depth).take_while(|&j| dr[j] == y[j]).count());
            stats.sequence_steps += 1;
            stats.tokens += a + 1;
            for j in 0..(a + 1).min(depth) {
                stats.attempted[j] += 1;
            }
            for j in 0..a {
                stats.accepted[j] += 1;
            }
            s.extend_from_slice(&dr[..a]);
            s.push(y[a]);
        }
        stats.verify_s += clock.elapsed().as_secs_f64();
        if done(&seqs) {
            break;
        }
        clock = std::time::Instant::now();
        drafts = draft(model, drafter, state.as_mut(), &seqs, &device);
        stats.draft_s += clock.elapsed().as_secs_f64();
        if let Some(t) = trace.as_deref_mut() {
            t.push((seqs.clone(), read_ids(drafts.clone(), &mut stats)));
        }
    }
    let out = seqs
        .into_iter()
        .map(|s| s[p..p + new_tokens].to_vec())
        .collect();
    stats.phases.decode_s = started.elapsed().as_secs_f64() - stats.phases.prefill_s;
    (out, stats)
}

/// The next D drafts for every sequence, on the device: `[b, D]`.
fn draft<B: Backend>(
    model: &Decoder<B>,
    drafter: &Drafter<'_, B>,
    state: Option<&mut MtpState<B>>,
    seqs: &[Vec<u32>],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    match (drafter, state) {
        (Drafter::Planted { f, depth }, _) => {
            let rows: Vec<Vec<u32>> = seqs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let d = f(i, s);
                    assert_eq!(d.len(), *depth, "a planted drafter returns D drafts");
                    d
                })
                .collect();
            id_tensor::<B>(&rows, device)
        }
        (Drafter::Mtp(m), Some(st)) => draft_mtp(model, m, st, seqs, device),
        (Drafter::Mtp(_), None) => unreachable!("MTP drafter has its state"),
    }
}

/// Runs the D modules in sequence; module k (0-based) passes over each sequence's positions
/// `from[k]..=n-2` (n = its length). At position i it needs token i+k+1, known for i+k+1 < n
/// and a draft of an earlier module otherwise; its draft is its prediction at position n-2.
///
/// Module k recomputes only the positions whose inputs were drafts in the previous round
/// (`i + k + 1 >= n_prev`, so from `n_prev - 1 - k`): its cache and its outputs before that are
/// final. Its input there is module k-1's output, kept per position in `st.outputs` (computed
/// this round for positions `>= from[k-1]`, in earlier rounds before that). Module 0 passes over
/// one position more than the accepted drafts, module D-1 over D-1 more: fewer rows than one
/// common start for all modules (which recomputed D-1 final positions in module 0).
///
/// No read-back: a module's draft (its argmax, `[b, 1]` on the device) is placed into the next
/// modules' input tokens with a host-built 0/1 position mask, and the D drafts are returned as
/// one device tensor.
fn draft_mtp<B: Backend>(
    model: &Decoder<B>,
    m: &MtpPredictor<B>,
    st: &mut MtpState<B>,
    seqs: &[Vec<u32>],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let b = seqs.len();
    let depth = m.depth();
    let [_, _, cap, d] = st.hidden.as_ref().expect("hidden cache").dims();
    let ends: Vec<usize> = seqs.iter().map(|s| s.len() - 2).collect();
    let mut drafts: Vec<Tensor<B, 2, Int>> = Vec::with_capacity(depth);
    let mut prev_out: Option<Tensor<B, 3>> = None;
    let mut prev_from: Vec<usize> = Vec::new();
    for k in 0..depth {
        // a finished sequence no longer grows: its next pass would start past its end, so it
        // recomputes its last position (harmless: same inputs, same cache entry)
        let from: Vec<usize> = st.from[k]
            .iter()
            .zip(&ends)
            .map(|(&f, &e)| f.min(e))
            .collect();
        let len = from
            .iter()
            .zip(&ends)
            .map(|(&f, &e)| e + 1 - f)
            .max()
            .expect("batch");
        assert!(
            from.iter().all(|&f| f + len <= cap),
            "MTP pass beyond cache capacity"
        );
        // module k-1's output this round, written at its positions, before module k reads it
        if let (Some(out), Some(slot)) = (prev_out.take(), st.outputs.get_mut(k.wrapping_sub(1))) {
            append(slot, out.unsqueeze_dim::<4>(1), &prev_from);
        }
        // the input rows from..from+len of each sequence, gathered in one select (padding past
        // a sequence's end is computed and ignored: causal attention keeps it away from real
        // positions, and those positions are recomputed before they are ever read as final)
        let source = if k == 0 {
            st.hidden.as_ref()
        } else {
            st.outputs[k - 1].as_ref()
        }
        .expect("input cache");
        let rows: Vec<i64> = from
            .iter()
            .enumerate()
            .flat_map(|(i, &f)| (0..len).map(move |j| (i * cap + f + j) as i64))
            .collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b * len]), device);
        let h = source
            .clone()
            .reshape([b * cap, d])
            .select(0, rows)
            .reshape([b, len, d]);
        // known tokens on the host (0 where a draft goes), drafts added on the device
        let mut known = Vec::with_capacity(b * len);
        let mut slots: Vec<Vec<i64>> = vec![vec![0; b * len]; k];
        for (i, s) in seqs.iter().enumerate() {
            let n = s.len();
            for j in 0..len {
                let pos = from[i] + j + k + 1;
                if pos < n {
                    known.push(s[pos] as i64);
                } else {
                    known.push(0);
                    // a draft of an earlier module, or padding (pos - n >= k)
                    if let Some(slot) = slots.get_mut(pos - n) {
                        slot[i * len + j] = 1;
                    }
                }
            }
        }
        let mut ahead = Tensor::<B, 2, Int>::from_data(TensorData::new(known, [b, len]), device);
        for (slot, dr) in slots.into_iter().zip(&drafts) {
            if slot.iter().any(|&x| x != 0) {
                let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(slot, [b, len]), device);
                ahead = ahead + mask * dr.clone().expand([b, len]);
            }
        }
        let out = m.forward_module(k, model, h, ahead, &from, &mut st.caches[k]);
        // the draft: the prediction at each sequence's last real position
        let pick: Vec<i64> = (0..b)
            .map(|i| (i * len + ends[i] - from[i]) as i64)
            .collect();
        let pick = Tensor::<B, 1, Int>::from_data(TensorData::new(pick, [b]), device);
        let last = out.clone().reshape([b * len, d]).select(0, pick);
        let next = m
            .logits(k, model, last.reshape([b, 1, d]))
            .argmax(2)
            .reshape([b, 1]);
        drafts.push(next);
        prev_out = Some(out);
        prev_from = from;
    }
    // next round: module k restarts where its inputs were drafts this round (i + k + 1 >= n)
    for (k, f) in st.from.iter_mut().enumerate() {
        *f = seqs.iter().map(|s| s.len().saturating_sub(1 + k)).collect();
    }
    Tensor::cat(drafts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::AttentionConfig;
    use crate::nn::DecoderConfig;
    use burn::backend::Flex;

    type B = Flex;

    fn config() -> DecoderConfig {
        let mut a = AttentionConfig::mha(2, 8);
        a.key_block = 4;
        DecoderConfig {
            vocab_size: 24,
            hidden: 16,
            n_layers: 2,
            ffn_hidden: 24,
            attention: a,
            moe: None,
        }
    }

    fn setup(depth: usize) -> (Decoder<B>, MtpPredictor<B>) {
        let dev = Default::default();
        B::seed(&dev, 11);
        let c = config();
        (c.init(&dev), MtpPredictor::new(&c, depth, &dev))
    }

    fn prompts(b: usize, p: usize) -> Vec<Vec<u32>> {
        (0..b)
            .map(|i| (0..p).map(|j| ((i * 7 + j * 3 + 1) % 24) as u32).collect())
            .collect()
    }

    /// Drafts that are the greedy continuation (`right`) or never it (`!right`).
    fn oracle<'a>(
        greedy_out: &'a [Vec<u32>],
        p: usize,
        depth: usize,
        right: impl Fn(usize) -> bool + 'a,
    ) -> impl Fn(usize, &[u32]) -> Vec<u32> + 'a {
        move |i, s| {
            (0..depth)
                .map(|j| {
                    let g = greedy_out[i].get(s.len() - p + j).copied().unwrap_or(0);
                    if right(i) {
                        g
                    } else {
                        (g + 1) % 24
                    }
                })
                .collect()
        }
    }

    #[test]
    fn planted_right_and_wrong_drafts_give_greedy_tokens_at_batch_1_and_8() {
        let (m, _) = setup(0);
        let (p, n, depth) = (5, 12, 3);
        for b in [1, 8] {
            let pr = prompts(b, p);
            let want = greedy(&m, &pr, n, 4);
            // all right: every draft accepted, D+1 tokens per step
            let f = oracle(&want, p, depth, |_| true);
            let (got, st) = speculative(&m, &Drafter::Planted { depth, f: &f }, &pr, n, 4);
            assert_eq!(got, want, "all-right drafts, batch {b}");
            assert_eq!(st.accepted, st.attempted, "every draft accepted");
            assert_eq!(st.mean_accepted_length(), Some(4.0));
            // all wrong: nothing accepted, one token per step
            let f = oracle(&want, p, depth, |_| false);
            let (got, st) = speculative(&m, &Drafter::Planted { depth, f: &f }, &pr, n, 4);
            assert_eq!(got, want, "all-wrong drafts, batch {b}");
            assert_eq!(st.accepted, vec![0; depth]);
            assert_eq!(st.mean_accepted_length(), Some(1.0));
        }
    }

    #[test]
    fn sequences_of_a_batch_keep_their_own_lengths() {
        let (m, _) = setup(0);
        let (p, n, depth) = (4, 11, 3);
        let pr = prompts(8, p);
        let want = greedy(&m, &pr, n, 2);
        // even sequences always accept, odd never: lengths diverge at once
        let f = oracle(&want, p, depth, |i| i % 2 == 0);
        let (got, st) = speculative(&m, &Drafter::Planted { depth, f: &f }, &pr, n, 2);
        assert_eq!(got, want);
        let acc = st.acceptance();
        assert!(acc[0].unwrap() > 0.2 && acc[0].unwrap() < 0.8, "{acc:?}");
    }

    #[test]
    fn depth_zero_is_plain_greedy() {
        let (m, mtp) = setup(0);
        let pr = prompts(2, 4);
        let (got, st) = speculative(&m, &Drafter::Mtp(&mtp), &pr, 6, 4);
        assert_eq!(got, greedy(&m, &pr, 6, 4));
        assert_eq!(st.steps, 0);
    }

    /// Module drafts for one sequence computed from scratch: main trunk over all but the last
    /// token, then the modules over every position.
    fn reference_drafts(m: &Decoder<B>, mtp: &MtpPredictor<B>, seq: &[u32]) -> Vec<u32> {
        let dev = m.device();
        let n = seq.len();
        let mut cache = m.new_cache(1, n + 8);
        let mut h = m.forward_trunk(
            id_tensor::<B>(&[seq[..n - 1].to_vec()], &dev),
            &mut cache,
            &[0],
            None,
        );
        let mut ext = seq.to_vec();
        let mut caches = mtp.new_caches(1, n + 8);
        for k in 0..mtp.depth() {
            let ahead: Vec<u32> = (0..n - 1).map(|i| ext[i + k + 1]).collect();
            h = mtp.forward_module(
                k,
                m,
                h,
                id_tensor::<B>(&[ahead], &dev),
                &[0],
                &mut caches[k],
            );
            let d = h.dims()[2];
            let last = h.clone().slice([0..1, n - 2..n - 1, 0..d]);
            ext.push(argmax_rows(mtp.logits(k, m, last))[0][0]);
        }
        ext[n..].to_vec()
    }

    #[test]
    fn mtp_drafts_match_a_from_scratch_computation_and_output_stays_greedy() {
        let (m, mtp) = setup(3);
        let pr = prompts(8, 6);
        let want = greedy(&m, &pr, 14, 4);
        let mut trace = DraftTrace::new();
        let (got, st) = speculative_traced(&m, &Drafter::Mtp(&mtp), &pr, 14, 4, Some(&mut trace));
        assert_eq!(got, want);
        assert!(st.steps > 0 && trace.len() >= 2);
        for (seqs, drafts) in &trace {
            for (s, d) in seqs.iter().zip(drafts) {
                assert_eq!(
                    d,
                    &reference_drafts(&m, &mtp, s),
                    "sequence of length {}",
                    s.len()
                );
            }
        }
    }

    #[test]
    fn finished_sequences_wait_without_breaking_any_depth() {
        // even sequences accept every draft and finish early, odd ones never; each depth,
        // including D = 1 where a finished sequence's next pass would start past its end
        let pr = prompts(4, 5);
        let (m, mtp) = setup(4);
        let want = greedy(&m, &pr, 13, 4);
        for depth in 1..=4 {
            let f = oracle(&want, 5, depth, |i| i % 2 == 0);
            let (got, _) = speculative(&m, &Drafter::Planted { depth, f: &f }, &pr, 13, 4);
            assert_eq!(got, want, "planted, D = {depth}");
            let mtp = mtp.clone().truncated(depth);
            let (got, _) = speculative(&m, &Drafter::Mtp(&mtp), &pr, 13, 4);
            assert_eq!(got, want, "MTP, D = {depth}");
        }
    }

    #[test]
    fn one_read_back_per_step_with_mtp_and_planted_drafts() {
        let (m, mtp) = setup(3);
        let pr = prompts(8, 5);
        let want = greedy(&m, &pr, 12, 4);
        let f = oracle(&want, 5, 3, |i| i % 3 == 0);
        for drafter in [Drafter::Mtp(&mtp), Drafter::Planted { depth: 3, f: &f }] {
            let (got, st) = speculative(&m, &drafter, &pr, 12, 4);
            assert_eq!(got, want);
            assert!(st.steps > 1);
            // the prefill's first token, then exactly one per verify step
            assert_eq!(st.read_backs, st.steps + 1, "{st:?}");
            let mut metrics = Default::default();
            st.insert_metrics(&mut metrics);
            assert_eq!(metrics["read_backs_per_step"], Some(1.0));
        }
    }

    #[test]
    fn device_acceptance_equals_the_host_prefix_rule() {
        let dev = Default::default();
        let drafts = vec![
            vec![1, 2, 3],
            vec![1, 9, 3],
            vec![7, 2, 3],
            vec![1, 2, 8],
            vec![4, 4, 4],
        ];
        let predicted = vec![
            vec![1, 2, 3, 5],
            vec![1, 2, 3, 5],
            vec![1, 2, 3, 5],
            vec![1, 2, 3, 5],
            vec![4, 4, 4, 4],
        ];
        let host: Vec<u32> = drafts
            .iter()
            .zip(&predicted)
            .map(|(d, p)| d.iter().zip(p).take_while(|(a, b)| a == b).count() as u32)
            .collect();
        assert_eq!(host, vec![3, 1, 0, 2, 3]);
        let a = accepted_lengths(
            id_tensor::<B>(&drafts, &dev),
            id_tensor::<B>(&predicted, &dev),
        );
        let mut st = SpecStats::default();
        let got: Vec<u32> = read_ids(a, &mut st).into_iter().map(|r| r[0]).collect();
        assert_eq!(got, host);
    }
}
