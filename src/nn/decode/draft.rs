//! 起草：MTP 模块（或外部草稿模型）在设备上串联给出每个序列的下 D 个草稿 token；
//! 模块 k 只重算上一轮以草稿为输入的位置（见 [`MtpState::from`]）。

use burn::tensor::{backend::Backend, Int, Tensor};

use super::*;

/// Per-sequence state of the MTP drafter between steps.
pub(super) struct MtpState<B: Backend> {
    /// Main-model residual stream (before the final norm) at every committed position:
    /// `[b, 1, cap, d]`.
    pub(super) hidden: Tensor<B, 4>,
    /// One cache layer per module.
    pub(super) caches: Vec<LayerCache<B>>,
    /// Output of module k (the input of module k+1) at every position it has computed,
    /// `[b, 1, cap, d]`, for k = 0..D-1 (the last module's output feeds nothing).
    pub(super) outputs: Vec<Tensor<B, 4>>,
    /// `from[k][i]`: where module k's pass over sequence i starts next time (its cache and its
    /// outputs are final before it).
    pub(super) from: Vec<Vec<usize>>,
}

impl<B: Backend> MtpState<B> {
    /// After a verify step in which sequence `i` accepted `accepted[i]` drafts (`None`: it had
    /// finished). Drafting left module k to restart at the first position that used a draft
    /// (`n - 1 - k`, n the length before the step); its results at positions whose drafts were
    /// all accepted are final as they are (the same inputs as the real tokens), so its next
    /// pass starts `min(k, a)` positions later. Module k then passes over max(a + 1, k + 1)
    /// positions of a sequence instead of a + 1 + k.
    pub(super) fn accept(&mut self, accepted: &[usize]) {
        for (k, from) in self.from.iter_mut().enumerate() {
            for (f, &a) in from.iter_mut().zip(accepted) {
                *f += k.min(a);
            }
        }
    }

    /// Keeps only the sequences `rows` of the batch (`idx`: the same indices on the device):
    /// the main model's hidden states, each module's cache and outputs, and the restart points.
    pub(super) fn keep_sequences(&mut self, rows: &[usize], idx: Tensor<B, 1, Int>) {
        self.hidden = self.hidden.clone().select(0, idx.clone());
        for o in &mut self.outputs {
            *o = o.clone().select(0, idx.clone());
        }
        for c in &mut self.caches {
            c.keep_sequences(idx.clone());
        }
        for f in &mut self.from {
            *f = rows.iter().map(|&r| f[r]).collect();
        }
    }
}

/// Where the drafts of one speculative decode come from: the MTP modules with their state
/// between steps, or a planted function (tests).
pub(super) enum Source<'a, B: Backend> {
    /// The modules and their per-sequence state.
    Mtp(&'a MtpPredictor<B>, MtpState<B>),
    /// `f(sequence index among the prompts, tokens so far) -> depth drafts`.
    Planted {
        depth: usize,
        f: &'a dyn Fn(usize, &[u32]) -> Vec<u32>,
    },
}

impl<B: Backend> Source<'_, B> {
    /// The MTP state, when the drafts come from MTP modules.
    pub(super) fn mtp_state(&mut self) -> Option<&mut MtpState<B>> {
        match self {
            Source::Mtp(_, st) => Some(st),
            Source::Planted { .. } => None,
        }
    }
}

/// The next D drafts for every sequence of the batch, on the device: `[b, D]`. `ids[r]`: the
/// index among the prompts of the batch's row r (what a planted drafter is told).
pub(super) fn draft<B: Backend>(
    model: &Decoder<B>,
    source: &mut Source<'_, B>,
    seqs: &[Vec<u32>],
    ids: &[usize],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    match source {
        Source::Planted { f, depth } => {
            let rows: Vec<Vec<u32>> = seqs
                .iter()
                .zip(ids)
                .map(|(s, &i)| {
                    let d = f(i, s);
                    assert_eq!(d.len(), *depth, "a planted drafter returns D drafts");
                    d
                })
                .collect();
            id_tensor::<B>(&rows, device)
        }
        Source::Mtp(m, st) => draft_mtp(model, m, st, seqs, device),
    }
}

/// Runs the D modules in sequence; module k (0-based) passes over each sequence's positions
/// `from[k]..=n-2` (n = its length). At position i it needs token i+k+1, known for i+k+1 < n
/// and a draft of an earlier module otherwise; its draft is its prediction at position n-2.
///
/// Module k recomputes only the positions whose inputs were rejected drafts in the previous
/// round (`i + k + 1 >= n_prev + a`, a the accepted drafts, so from `n_prev - 1 - k + min(k, a)`,
/// set by [`MtpState::accept`]): its cache and its outputs before that are final. Its input
/// there is module k-1's output, kept per position in `st.outputs` (computed this round for
/// positions `>= from[k-1]`, in earlier rounds before that). Module 0 passes over one position
/// more than the accepted drafts, module k over max(a + 1, k + 1) positions.
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
    let [_, _, cap, d] = st.hidden.dims();
    let ends: Vec<usize> = seqs.iter().map(|s| s.len() - 2).collect();
    let mut drafts: Vec<Tensor<B, 2, Int>> = Vec::with_capacity(depth);
    let mut prev_out: Option<Tensor<B, 3>> = None;
    let mut prev_from: Vec<usize> = Vec::new();
    for k in 0..depth {
        // (finished sequences have left the batch, so every pass has a position to compute)
        let from = st.from[k].clone();
        debug_assert!(
            from.iter().zip(&ends).all(|(&f, &e)| f <= e),
            "{from:?} {ends:?}"
        );
        let len = from
            .iter()
            .zip(&ends)
            .map(|(&f, &e)| e + 1 - f)
            .max()
            .unwrap_or(0); // an empty batch passes over nothing
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
        let source = match k.checked_sub(1) {
            Some(j) => &st.outputs[j],
            None => &st.hidden,
        };
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
    // next round: module k restarts where its inputs were drafts this round (i + k + 1 >= n),
    // moved on past the accepted ones by `MtpState::accept`
    for (k, f) in st.from.iter_mut().enumerate() {
        *f = seqs.iter().map(|s| s.len().saturating_sub(1 + k)).collect();
    }
    Tensor::cat(drafts, 1)
}
