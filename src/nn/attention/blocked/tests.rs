//! Blocked attention tests: equal to plain softmax attention for every head layout, block size, start and widening.

use super::*;
use crate::rng::uniform;
use burn::backend::Flex;

use crate::nn::test_util::t4;

type B = Flex;

fn max_diff(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Host f64 reference: causal softmax attention over rows `(head, query)` of each
/// (sequence, group), keys `0..=start + query`, values the first `dv` columns of `v`.
#[allow(clippy::too_many_arguments)]
fn host_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, g, rows, dk]: [usize; 4],
    kcols: usize,
    vcols: usize,
    cap: usize,
    dv: usize,
    starts: &[usize],
    q_len: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; b * g * rows * dv];
    for bi in 0..b {
        for gi in 0..g {
            for r in 0..rows {
                let qrow = &q[((bi * g + gi) * rows + r) * dk..][..dk];
                let last = starts[bi] + r % q_len;
                let scores: Vec<f64> = (0..=last)
                    .map(|j| {
                        let krow = &k[((bi * g + gi) * cap + j) * kcols..][..dk];
                        qrow.iter()
                            .zip(krow)
                            .map(|(a, c)| *a as f64 * *c as f64)
                            .sum()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let o = &mut out[((bi * g + gi) * rows + r) * dv..][..dv];
                for (j, p) in e.iter().enumerate() {
                    let vrow = &v[((bi * g + gi) * cap + j) * vcols..][..dv];
                    for (oc, vc) in o.iter_mut().zip(vrow) {
                        *oc += p / z * *vc as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn flex_agrees_with_a_host_f64_reference() {
    // MHA-like (separate K and V) and absorbed-MLA-like (one latent source, keys = all 20
    // columns, values = the first 16), per-sequence starts, a pre-sized cache with stale
    // entries past each sequence's length
    let (q_len, cap) = (3, 40);
    let starts = [5usize, 30];
    for (g, rows, dk, kcols, vcols, dv, shared) in [
        (2, 2 * q_len, 8, 8, 6, 6, false),
        (1, 4 * q_len, 20, 20, 20, 16, true),
    ] {
        let q = uniform(2 * g * rows * dk, 41);
        let k = uniform(2 * g * cap * kcols, 42);
        let v = if shared {
            k.clone()
        } else {
            uniform(2 * g * cap * vcols, 43)
        };
        let dev = Default::default();
        let qt = Tensor::<B, 4>::from_data(TensorData::new(q.clone(), [2, g, rows, dk]), &dev);
        let kt = Tensor::<B, 4>::from_data(TensorData::new(k.clone(), [2, g, cap, kcols]), &dev);
        let vt = Tensor::<B, 4>::from_data(TensorData::new(v.clone(), [2, g, cap, vcols]), &dev);
        let want = host_f64(
            &q,
            &k,
            &v,
            [2, g, rows, dk],
            kcols,
            vcols,
            cap,
            dv,
            &starts,
            q_len,
        );
        for block in [4, 16, 64] {
            let got: Vec<f32> = attention_with(
                qt.clone(),
                &kt,
                if shared { &kt } else { &vt },
                dv,
                &starts,
                q_len,
                starts[1] + q_len,
                block,
                false,
            )
            .into_data()
            .to_vec()
            .unwrap();
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(d < 2e-6, "shared {shared} block {block}: max |diff| {d}");
        }
    }
}

#[test]
fn buckets_are_few_and_cover() {
    let got: Vec<usize> = (1..=13).map(bucket).collect();
    assert_eq!(got, [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]);
    for n in 1..5000 {
        let b = bucket(n);
        assert!(
            b >= n && (b as f64) <= (n as f64 * 1.5).max(2.0),
            "{n} -> {b}"
        );
    }
    let distinct: std::collections::BTreeSet<usize> = (1..=4096).map(bucket).collect();
    assert!(distinct.len() <= 24, "{} shapes", distinct.len());
}

#[test]
fn widened_partial_blocks_count_no_key_twice() {
    // one query row per sequence at every length: the last block is partial and widened
    // backwards over keys the previous block already counted (they must be masked)
    let block = 8;
    for kv_len in 1..=40 {
        let q_start = kv_len - 1;
        let q = t4([1, 2, 3, 8], 10 + kv_len as u64); // 3 heads folded into rows, q_len 1
                                                      // a pre-sized cache: 7 slots past the filled length (forward widening reads them)
        let k = t4([1, 2, kv_len + 7, 8], 20);
        let v = t4([1, 2, kv_len + 7, 5], 30);
        let kf = k.clone().slice([0..1, 0..2, 0..kv_len, 0..8]);
        let vf = v.clone().slice([0..1, 0..2, 0..kv_len, 0..5]);
        let want = reference(q.clone(), kf.clone(), vf.clone(), q_start, 1);
        for (kk, vv) in [(&k, &v), (&kf, &vf)] {
            let got = attention_with(q.clone(), kk, vv, 5, &[q_start], 1, kv_len, block, true);
            let d = max_diff(got, want.clone());
            assert!(d < 1e-5, "kv_len {kv_len}: max |diff| {d}");
        }
    }
}

#[test]
fn blocked_equals_full_softmax_for_every_block_size() {
    // 2 heads folded into rows: rows = 2 * q_len
    let (q_start, q_len, kv_len) = (5, 7, 12);
    let q = t4([2, 3, 2 * q_len, 8], 1);
    let k = t4([2, 3, kv_len, 8], 2);
    let v = t4([2, 3, kv_len, 6], 3);
    let want = reference(q.clone(), k.clone(), v.clone(), q_start, q_len);
    for block in [1, 3, 4, 5, 12, 64] {
        for widen in [false, true] {
            let got = attention_with(
                q.clone(),
                &k,
                &v,
                6,
                &[q_start; 2],
                q_len,
                kv_len,
                block,
                widen,
            );
            let d = max_diff(got, want.clone());
            assert!(d < 1e-5, "block {block} widen {widen}: max |diff| {d}");
        }
    }
}

#[test]
fn row_tiles_give_the_same_result() {
    // 3000 rows in one group: split into tiles of ROW_TILE rows, masks offset per tile
    let (q_start, q_len) = (2, 1500); // two heads folded: rows = 2 * q_len
    let q = t4([1, 1, 2 * q_len, 4], 9);
    let k = t4([1, 1, q_start + q_len, 4], 10);
    let v = t4([1, 1, q_start + q_len, 3], 11);
    let want = reference(q.clone(), k.clone(), v.clone(), q_start, q_len);
    let got = attention(q, &k, &v, 3, &[q_start], q_len, q_start + q_len, 256, false);
    assert!(max_diff(got, want) < 1e-5);
}

#[test]
fn keys_and_values_may_share_one_source_with_extra_columns() {
    // absorbed MLA: K = all 10 columns, V = the first 6 of the same tensor
    let q = t4([1, 1, 4, 10], 4);
    let kv = t4([1, 1, 9, 10], 5); // capacity 9, only 4 used
    let got = attention(q.clone(), &kv, &kv, 6, &[0], 4, 4, 2, false);
    let k = kv.clone().slice([0..1, 0..1, 0..4, 0..10]);
    let v = kv.slice([0..1, 0..1, 0..4, 0..6]);
    let want = reference(q, k, v, 0, 4);
    assert!(max_diff(got, want) < 1e-5);
}

#[test]
fn first_query_sees_only_the_first_key() {
    let q = t4([1, 1, 3, 4], 6);
    let k = t4([1, 1, 3, 4], 7);
    let v = t4([1, 1, 3, 2], 8);
    let out = attention(q, &k, &v, 2, &[0], 3, 3, 2, false);
    let row0 = out.slice([0..1, 0..1, 0..1, 0..2]);
    let v0 = v.slice([0..1, 0..1, 0..1, 0..2]);
    assert!(max_diff(row0, v0) < 1e-6);
}

#[test]
fn per_sequence_starts_mask_each_sequence_at_its_own_position() {
    // sequence 0 at positions 2..5, sequence 1 at 6..9; keys past a row's position are
    // masked even though the cache holds (stale) values there
    let (q_len, kv_len) = (3, 9);
    let q = t4([2, 2, 2 * q_len, 8], 21);
    let k = t4([2, 2, kv_len, 8], 22);
    let v = t4([2, 2, kv_len, 5], 23);
    let got = attention(q.clone(), &k, &v, 5, &[2, 6], q_len, kv_len, 4, false);
    for (i, st) in [2usize, 6].into_iter().enumerate() {
        let qi = q.clone().slice([i..i + 1, 0..2, 0..2 * q_len, 0..8]);
        let ki = k.clone().slice([i..i + 1, 0..2, 0..st + q_len, 0..8]);
        let vi = v.clone().slice([i..i + 1, 0..2, 0..st + q_len, 0..5]);
        let want = reference(qi, ki, vi, st, q_len);
        let gi = got.clone().slice([i..i + 1, 0..2, 0..2 * q_len, 0..5]);
        assert!(max_diff(gi, want) < 1e-5, "sequence {i}");
    }
}

#[test]
fn device_masks_equal_the_host_masks() {
    let dev = Default::default();
    for (starts, rows, row0, q_len, k0, valid_from, kb) in [
        (vec![4, 4], 3, 0, 3, 0, 0, 8),
        (vec![0, 9, 3], 8, 0, 4, 2, 2, 6),
        (vec![10, 2], 5, 3, 2, 4, 6, 7),
        (vec![7], 1, 0, 1, 0, 3, 12),
    ] {
        let host = batch_mask::<B>(&starts, rows, row0, q_len, k0, valid_from, kb, &dev);
        let pos = row_positions::<B>(&starts, rows, row0, q_len, &dev);
        let device = device_mask(&pos, k0, valid_from, kb);
        assert_eq!(host.dims(), device.dims(), "{starts:?}");
        let (h, d): (Vec<bool>, Vec<bool>) = (
            host.into_data().to_vec().unwrap(),
            device.into_data().to_vec().unwrap(),
        );
        assert_eq!(
            h, d,
            "{starts:?} rows {rows} row0 {row0} k0 {k0} from {valid_from}"
        );
    }
}
