//! CPU 后端上的注意力（解码步、推测解码的验证步与预填充）：从 burn-flex 张量中取出查询与缓存，
//! 交给内核模块（[`crate::kernels::attend`]），键值按存储精度（f32、f16、bf16）读取。
//!
//! At a short context a decode or verify step's attention is a few hundred floating-point
//! operations per (sequence, head) and the cost of `blocked::attention` there is the tensor ops
//! themselves: per key block a slice, a matmul, a host-built mask (one per sequence when the
//! sequences sit at different positions), a `mask_fill`, five element-wise ops and a second
//! matmul (perf on `dsopt bench mtp`, flex: 29 % of the CPU time). At a long context in half
//! precision burn-flex's matmul widens every key block to f32 as a whole tensor per call. So on
//! burn-flex each (sequence, K/V group) is one pass of the kernel over its cached keys and values
//! (with split key ranges where the pairs do not fill the pool, see the kernel's notes).
//!
//! Prefill takes the same pass (the kernel scores many rows as a small matrix product against
//! each key block packed once, see `kernels::attend::PACKED_ROWS`). Measured at
//! `scenarios/sc001-mla.toml`'s dimensions (MHA, 8192 tokens in chunks of 512, 2-core Xeon):
//! the blocked tensor-op path took 7.7 s in f32 and 18-21 s in bf16 (burn-flex widens every key
//! block and casts the scores per call); see the issue notes for the figures of this path.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{backend::Backend, bf16, f16, Bytes, DType, Shape, Tensor};

use crate::kernels::attend::{self, Cache, Problem};
use crate::kernels::convert::Elems;
use crate::kernels::Level;
use crate::nn::flex::{self, from_flex, into_flex};

/// The fused pass for `blocked::attention`'s arguments (see there), or `q` back when it does
/// not apply: another backend, a dtype other than f32/f16/bf16 or mixed dtypes, a view whose rows
/// are not contiguous in the last dimension.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k_src: &Tensor<B, 4>,
    v_src: &Tensor<B, 4>,
    dv: usize,
    q_starts: &[usize],
    q_len: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, g, rows, dk] = q.dims();
    if rows == 0 || q_len == 0 || b == 0 || g == 0 || dv == 0 || q_starts.len() != b {
        return Err(q);
    }
    let qf = into_flex(q)?;
    let (kf, vf) = match (into_flex(k_src.clone()), into_flex(v_src.clone())) {
        (Ok(k), Ok(v)) => (k, v),
        _ => return Err(from_flex(qf)),
    };
    let dtype = qf.dtype();
    let same = [&kf, &vf].iter().all(|t| t.dtype() == dtype);
    let inner = |t: &FlexTensor| {
        let s = t.layout().strides();
        s[3] == 1 && s.iter().all(|&x| x >= 0)
    };
    let known = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
    // the caches cover every query's position, keys dk and values dv wide
    let last = q_starts.iter().max().map_or(0, |&st| st + q_len);
    let covers = |t: &FlexTensor, d: usize| {
        let sh = t.layout().shape();
        sh[0] >= b && sh[1] >= g && sh[2] >= last && sh[3] >= d
    };
    if !known || !same || !inner(&kf) || !inner(&vf) || !covers(&kf, dk) || !covers(&vf, dv) {
        return Err(from_flex(qf));
    }
    let level = Level::current();
    let qf = qf.to_contiguous();
    let qn = b * g * rows * dk;
    // read as stored: each task of the kernel widens its own rows
    let q = flex::elems(&qf, qf.layout().start_offset(), qn);
    // absorbed MLA passes one tensor as keys and values (the values are its first dv columns)
    let v_in_k = kf.bytes().as_ptr() == vf.bytes().as_ptr()
        && kf.layout().start_offset() == vf.layout().start_offset()
        && kf.layout().strides() == vf.layout().strides()
        && dv <= dk;
    let p = Problem {
        q,
        b,
        g,
        rows,
        dk,
        dv,
        k: cache(&kf),
        v: (!v_in_k).then(|| cache(&vf)),
        q_starts,
        q_len,
    };
    // the output in the cache's dtype, each task's rows rounded as they finish
    use half::slice::HalfFloatSliceExt;
    let n = b * g * rows * dv;
    let bytes = match dtype {
        DType::F16 => {
            let mut out = vec![f16::ZERO; n];
            attend::attention_into(level, &p, &mut out, |s, d| d.convert_from_f32_slice(s));
            Bytes::from_elems(out)
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; n];
            attend::attention_into(level, &p, &mut out, |s, d| d.convert_from_f32_slice(s));
            Bytes::from_elems(out)
        }
        _ => Bytes::from_elems(attend::attention(level, &p)),
    };
    let layout = Layout::contiguous(Shape::from([b, g, rows, dv]));
    Ok(from_flex(FlexTensor::new(bytes, layout, dtype)))
}

/// A K or V tensor `[b, g, cap, d]` (non-negative strides, contiguous last dimension) as the
/// kernel reads it.
fn cache(t: &FlexTensor) -> Cache<'_> {
    let st = t.layout().strides();
    let data = match t.dtype() {
        DType::F16 => Elems::F16(t.storage::<f16>()),
        DType::BF16 => Elems::Bf16(t.storage::<bf16>()),
        _ => Elems::F32(t.storage::<f32>()),
    };
    Cache {
        data,
        offset: t.layout().start_offset(),
        strides: [st[0] as usize, st[1] as usize, st[2] as usize],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::blocked;

    use crate::nn::test_util::t4;

    #[test]
    fn equals_the_blocked_path_with_per_sequence_positions() {
        // MHA-like (g = 2, rows = q_len), grouped rows (rows = 3 heads x q_len), a K/V tensor
        // wider than dk (MLA's latent: keys and values are column ranges of one tensor)
        for (g, hpg, q_len, dk, dv, starts) in [
            (2, 1, 1, 8, 8, vec![5, 5, 5]),
            (2, 1, 4, 8, 8, vec![0, 17, 70]),
            (1, 3, 4, 20, 12, vec![3, 90, 41]),
            (1, 4, 1, 40, 33, vec![130, 2, 64]),
            // the register kernels' widths (x86 with AVX2): 32 and 64, rows of one and of four
            (2, 1, 4, 32, 32, vec![0, 9, 150]),
            (2, 2, 1, 64, 64, vec![7, 130, 66]),
            (1, 1, 4, 16, 16, vec![1, 3, 40]),
            // long contexts (split key ranges where the pairs do not fill the pool)
            (2, 1, 4, 32, 32, vec![1500, 1100, 1030]),
            (2, 2, 1, 20, 12, vec![1200, 3, 1499]),
            (1, 16, 1, 40, 32, vec![1400]),
            // prefill chunks (the packed path): one head per group, and 4 heads x 20 tokens
            (2, 1, 40, 24, 24, vec![0, 100, 7]),
            (1, 4, 20, 40, 33, vec![30, 0, 200]),
        ] {
            let b = starts.len();
            let rows = hpg * q_len;
            let cap = 1504;
            let q = t4([b, g, rows, dk], 1);
            let kv = t4([b, g, cap, dk.max(dv) + 3], 2);
            let k = kv.clone().slice([0..b, 0..g, 0..cap, 0..dk + 3]);
            let last = starts.iter().max().unwrap() + q_len;
            let fused = attention(q.clone(), &k, &kv, dv, &starts, q_len)
                .unwrap_or_else(|_| panic!("fused path applies"));
            // the tensor-op loop, no fused pass
            let want =
                blocked::attention_with(q.clone(), &k, &kv, dv, &starts, q_len, last, 16, false);
            assert_eq!(fused.dims(), want.dims());
            let d: f32 = (fused.clone() - want.clone()).abs().max().into_scalar();
            assert!(d < 1e-5, "g {g}, rows {rows}, starts {starts:?}: {d}");
            // half precision: the same inputs rounded, against the blocked path in that dtype
            for dt in [DType::F16, DType::BF16] {
                let (qh, kvh) = (q.clone().cast(dt), kv.clone().cast(dt));
                let kh = kvh.clone().slice([0..b, 0..g, 0..cap, 0..dk + 3]);
                let got = attention(qh.clone(), &kh, &kvh, dv, &starts, q_len)
                    .unwrap_or_else(|_| panic!("fused path applies in {dt:?}"));
                assert_eq!(got.dtype(), dt);
                let want =
                    blocked::attention_with(qh, &kh, &kvh, dv, &starts, q_len, last, 16, false);
                let d: f32 = (got.cast(DType::F32) - want.cast(DType::F32))
                    .abs()
                    .max()
                    .into_scalar();
                // both round the output to the dtype (f16 2^-11, bf16 2^-8 relative; |o| < 1),
                // Burn's path also each block's scores and probabilities
                let tol = if dt == DType::F16 { 8e-3 } else { 6e-2 };
                assert!(d < tol, "{dt:?} g {g}, rows {rows}, starts {starts:?}: {d}");
            }
        }
    }

    #[test]
    fn prefill_takes_the_kernel_and_mixed_dtypes_keep_the_blocked_path() {
        let k = t4([1, 1, 2048, 8], 2);
        assert!(attention(t4([1, 1, 1024, 8], 1), &k, &k, 8, &[0], 1024).is_ok());
        // one pair at a long context: the fused pass with split key ranges
        assert!(attention(t4([1, 1, 2, 8], 1), &k, &k, 8, &[1500], 1).is_ok());
        let h = k.clone().cast(DType::F16);
        assert!(
            attention(t4([1, 1, 2, 8], 1), &h, &h, 8, &[10], 1).is_err(),
            "f32 q, f16 cache"
        );
    }
}
