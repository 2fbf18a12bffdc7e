//! Decoding tests: cached greedy equals the full forward, speculative equals greedy token for token, drafts equal their from-scratch computation.

use super::*;
use crate::nn::attention::AttentionConfig;
use crate::nn::DecoderConfig;
use burn::backend::Flex;

type B = Flex;

fn config() -> DecoderConfig {
    let mut a = AttentionConfig::mha(2, 8);
    a.key_block = 4;
    DecoderConfig {
        first_k_dense_replace: 0,
        first_dense_ffn_hidden: None,
        rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
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
fn drafts_after_every_acceptance_length_match_a_from_scratch_computation() {
    // A random model rarely accepts a draft, so acceptance is decided here: sequence i accepts
    // (i + step) % (D + 1) drafts, then gets a token other than the next draft. Every module
    // then restarts past positions it computed from accepted drafts (`MtpState::accept`), and
    // its drafts must still equal the from-scratch ones. Halfway, four sequences leave the
    // batch (as finished ones do): the rest keep their caches and module state through the
    // gather, and their drafts must still be the from-scratch ones.
    let depth = 3;
    let (m, mtp) = setup(depth);
    let dev = m.device();
    let pr = prompts(8, 6);
    let (b, p) = (pr.len(), 6);
    let cap = p + 8 * (depth + 1) + 2 * depth + 2;
    let mut cache = m.new_cache(b, cap);
    let trunk = m.forward_trunk(id_tensor::<B>(&pr, &dev), &mut cache, &vec![0; b], None);
    let d = trunk.dims()[2];
    let zeros = || crate::nn::attention::cache_write::zeros::<B>([b, 1, cap, d], &dev);
    let mut hidden = zeros();
    append(&mut hidden, trunk.unsqueeze_dim::<4>(1), &vec![0; b]);
    let state = MtpState {
        hidden,
        caches: mtp.new_caches(b, cap),
        outputs: (1..depth).map(|_| zeros()).collect(),
        from: vec![vec![0; b]; depth],
    };
    let mut source = Source::Mtp(&mtp, state);
    let mut seqs: Vec<Vec<u32>> = pr.iter().map(|s| [s.as_slice(), &[1]].concat()).collect();
    let mut accepted_at = vec![0usize; depth + 1];
    for step in 0..8 {
        if step == 4 {
            let keep = [1, 3, 4, 6];
            seqs = keep.iter().map(|&r| seqs[r].clone()).collect();
            cache.keep_sequences(&keep);
            let idx = row_index::<B>(&keep, &dev);
            source.mtp_state().unwrap().keep_sequences(&keep, idx);
        }
        let ids: Vec<usize> = (0..seqs.len()).collect();
        let drafts = draft(&m, &mut source, &seqs, &ids, &dev);
        let dr = id_rows(drafts.clone());
        for (s, got) in seqs.iter().zip(&dr) {
            assert_eq!(
                got,
                &reference_drafts(&m, &mtp, s),
                "step {step}, length {}",
                s.len()
            );
        }
        // the verify step's main-model pass, as in the decode loop
        let starts: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        let last: Vec<Vec<u32>> = seqs.iter().map(|s| vec![s[s.len() - 1]]).collect();
        let window = Tensor::cat(vec![id_tensor::<B>(&last, &dev), drafts], 1);
        let t = m.forward_trunk(window, &mut cache, &starts, None);
        let st = source.mtp_state().unwrap();
        append(&mut st.hidden, t.unsqueeze_dim::<4>(1), &starts);
        let mut accepted = Vec::new();
        for (i, (s, dr)) in seqs.iter_mut().zip(&dr).enumerate() {
            let a = (i + step) % (depth + 1);
            s.extend_from_slice(&dr[..a]);
            s.push(dr.get(a).map_or(5, |x| (x + 1) % 24));
            accepted.push(a);
            accepted_at[a] += 1;
        }
        st.accept(&accepted);
    }
    assert!(accepted_at.iter().all(|&n| n > 0), "{accepted_at:?}");
}

#[test]
fn finished_sequences_leave_the_batch_without_breaking_any_depth() {
    // sequences 0 and 2 accept every draft and finish early (they leave the batch from the
    // middle, so the rows behind them move up), 1 and 3 never; each depth. With MTP drafts
    // the rows that stay keep their module caches and restart points through the gather.
    let pr = prompts(4, 5);
    let (m, mtp) = setup(4);
    let want = greedy(&m, &pr, 13, 4);
    for depth in 1..=4 {
        let f = oracle(&want, 5, depth, |i| i % 2 == 0);
        let (got, st) = speculative(&m, &Drafter::Planted { depth, f: &f }, &pr, 13, 4);
        assert_eq!(got, want, "planted, D = {depth}");
        // the early ones really left: the batch shrank, no row computed for a finished one
        assert_eq!(st.batch_rows, st.sequence_steps, "D = {depth}: {st:?}");
        assert!(st.batch_rows < st.steps * pr.len(), "D = {depth}: {st:?}");
        // MTP drafts (a random model rejects most: the rows that leave the batch with the
        // module state are tested in `drafts_after_every_acceptance_length_...`)
        let mtp = mtp.clone().truncated(depth);
        let (got, st) = speculative(&m, &Drafter::Mtp(&mtp), &pr, 13, 4);
        assert_eq!(got, want, "MTP, D = {depth}");
        assert_eq!(st.batch_rows, st.sequence_steps, "MTP, D = {depth}: {st:?}");
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
