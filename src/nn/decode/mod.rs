//! 生成：普通贪心自回归解码，与带 MTP 草稿的自推测解码（贪心验证）。
//!
//! 自推测解码每一步：主模型对"上一步的最后一个 token + D 个草稿"做**一次** k+1 个 token 的
//! 前向，逐序列接受与主模型自身 argmax 一致的最长草稿前缀，再取主模型的下一个 token；随后
//! MTP 模块起草下 D 个 token。批中每条序列保留自己的已接受长度（KV 缓存按序列各自的位置
//! 写入与屏蔽，RoPE 按各自的位置旋转），不等待最慢的序列。输出与普通贪心解码逐 token 相同
//! （测试证明；数值上验证前向与单步前向的浮点舍入可能不同，基准报告逐序列比对结果）。
//!
//! 已生成够 `new_tokens` 的序列在那一步之后离开批（它的 KV 缓存与 MTP 状态按批维度收缩，一次
//! gather 复制），剩下的序列继续解码：最慢的序列仍决定步数，但先完成的序列不再陪算。
//! 普通贪心解码中所有序列同时完成，不涉及此事。

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::nn::attention::{append, row_index, LayerCache};
use crate::nn::mtp::MtpPredictor;
use crate::nn::Decoder;

mod draft;
use draft::{draft, MtpState, Source};

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
    /// 各验证步的批行数之和（完成的序列离开批，所以等于 `sequence_steps`；测试据此检查）。
    pub batch_rows: usize,
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

    /// [`Self::conditional_acceptance`] as text for reports: `d1=0.920, d2=0.950, …`
    /// ("not measured" for a depth never attempted).
    pub fn acceptance_text(&self) -> String {
        self.conditional_acceptance()
            .iter()
            .enumerate()
            .map(|(j, a)| match a {
                Some(a) => format!("d{}={a:.3}", j + 1),
                None => format!("d{}=not measured", j + 1),
            })
            .collect::<Vec<_>>()
            .join(", ")
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
pub fn argmax_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<u32>> {
    let [b, s, _] = logits.dims();
    id_rows(logits.argmax(2).reshape([b, s]))
}

/// Token ids `[b, n]` read back to the host as `b` rows (one device synchronisation). The
/// ids are read in whatever integer type the backend keeps them (converted per element).
fn id_rows<B: Backend>(ids: Tensor<B, 2, Int>) -> Vec<Vec<u32>> {
    let [b, n] = ids.dims();
    let flat: Vec<i64> = ids.into_data().iter::<i64>().collect();
    (0..b)
        .map(|i| {
            let row = flat.get(i * n..(i + 1) * n).unwrap_or_default();
            row.iter().map(|&t| t as u32).collect()
        })
        .collect()
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
    id_rows(ids)
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
    // the sequences still decoding, in batch order, and each row's index among the prompts;
    // a sequence leaves the batch after the step that completes it (into `finished`)
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut rows: Vec<usize> = (0..b).collect();
    let mut finished: Vec<Vec<u32>> = vec![Vec::new(); b];

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
    let mut source = match drafter {
        Drafter::Mtp(m) => {
            let zeros = || crate::nn::attention::cache_write::zeros::<B>([b, 1, cap, d], &device);
            let mut hidden = zeros();
            append(&mut hidden, trunk.unsqueeze_dim::<4>(1), &vec![0; b]);
            Source::Mtp(
                m,
                MtpState {
                    hidden,
                    caches: m.new_caches(b, cap),
                    outputs: (1..m.depth()).map(|_| zeros()).collect(),
                    from: vec![vec![0; b]; m.depth()],
                },
            )
        }
        Drafter::Planted { depth, f } => Source::Planted {
            depth: *depth,
            f: *f,
        },
    };
    let mut clock = std::time::Instant::now();
    let mut drafts = draft(model, &mut source, &seqs, &rows, &device);
    stats.draft_s += clock.elapsed().as_secs_f64();
    if let Some(t) = trace.as_deref_mut() {
        t.push((seqs.clone(), read_ids(drafts.clone(), &mut stats)));
    }

    loop {
        let b = seqs.len();
        clock = std::time::Instant::now();
        // verify: the last token plus the D drafts, each sequence at its own position
        let starts: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        // (every sequence holds its prompt, so none is empty: `check_prompts`)
        let last: Vec<Vec<u32>> = seqs.iter().map(|s| s[s.len() - 1..].to_vec()).collect();
        let window = Tensor::cat(vec![id_tensor::<B>(&last, &device), drafts.clone()], 1);
        let trunk = model.forward_trunk(window, &mut cache, &starts, None);
        if let Some(st) = source.mtp_state() {
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
        stats.batch_rows += b;
        let mut accepted = vec![0; b];
        for ((s, row), acc) in seqs.iter_mut().zip(&back).zip(&mut accepted) {
            let a = row[0] as usize;
            *acc = a;
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
        if let Some(st) = source.mtp_state() {
            st.accept(&accepted);
        }
        // sequences complete after this step leave the batch
        let keep: Vec<usize> = (0..b).filter(|&r| seqs[r].len() < p + new_tokens).collect();
        if keep.len() < b {
            for r in (0..b).rev() {
                if seqs[r].len() >= p + new_tokens {
                    finished[rows.remove(r)] = seqs.remove(r);
                }
            }
            if !keep.is_empty() {
                cache.keep_sequences(&keep);
                if let Some(st) = source.mtp_state() {
                    st.keep_sequences(&keep, row_index::<B>(&keep, &device));
                }
            }
        }
        stats.verify_s += clock.elapsed().as_secs_f64();
        if seqs.is_empty() {
            break;
        }
        clock = std::time::Instant::now();
        drafts = draft(model, &mut source, &seqs, &rows, &device);
        stats.draft_s += clock.elapsed().as_secs_f64();
        if let Some(t) = trace.as_deref_mut() {
            t.push((seqs.clone(), read_ids(drafts.clone(), &mut stats)));
        }
    }
    let out = finished
        .into_iter()
        .map(|s| s[p..p + new_tokens].to_vec())
        .collect();
    stats.phases.decode_s = started.elapsed().as_secs_f64() - stats.phases.prefill_s;
    (out, stats)
}

#[cfg(test)]
mod tests;
