//! CPU 后端上 MoE 解码步的路由专家：取出被选中专家的权重切片，交给内核模块
//! （[`crate::kernels::moe::routed`]），不做张量级的收集与拼接。

use burn::backend::flex::FlexTensor;
use burn::tensor::{backend::Backend, DType, Shape, Tensor};

use super::router::Routing;
use crate::kernels::convert;
use crate::kernels::moe::{routed as routed_kernel, Expert, Group};
use crate::kernels::Level;
use crate::nn::ffn::SwiGlu;
use crate::nn::flex::{self, from_flex, into_flex};
use crate::nn::linear::MAX_STREAM_ROWS;

/// The routed experts' weighted sum `[t, dim]` for `x` `[t, dim]` on flex (decode steps: at most
/// [`MAX_STREAM_ROWS`] tokens), or `None` where it does not apply: another backend, more tokens,
/// an expert that is not in `experts` (offloaded layers), a weight that is not a plain contiguous
/// matrix of `x`'s dtype.
pub(crate) fn routed<B: Backend>(
    x: &Tensor<B, 2>,
    routing: &Routing,
    experts: &[SwiGlu<B>],
) -> Option<Tensor<B, 2>> {
    let [t, dim] = x.dims();
    if t == 0 || t > MAX_STREAM_ROWS || routing.experts.len() != t {
        return None;
    }
    // touched experts in index order, each with its (token, weight) rows
    let groups = super::storage::groups(&routing.experts, &routing.weights);
    let order: Vec<usize> = groups.iter().map(|g| g.0).collect();
    if order.last().is_some_and(|&e| e >= experts.len()) {
        return None;
    }
    let (x32, dtype) = host_f32(x)?;
    let inter = experts[order.first().copied()?].linears()[0].weight.dims()[1];
    let mut weights: Vec<[FlexTensor; 3]> = Vec::with_capacity(order.len());
    for &e in &order {
        let [w1, w2, w3] = experts[e].linears().map(|l| into_flex(l.weight.val()).ok());
        let ws = [w1?, w2?, w3?];
        let plain = |w: &FlexTensor, shape: [usize; 2]| {
            w.dtype() == dtype
                && w.layout().is_contiguous()
                && w.layout().start_offset() == 0
                && w.layout().shape().to_vec() == shape.to_vec()
        };
        if !plain(&ws[0], [dim, inter])
            || !plain(&ws[1], [inter, dim])
            || !plain(&ws[2], [dim, inter])
        {
            return None;
        }
        weights.push(ws);
    }
    let ex: Vec<Expert<'_>> = weights
        .iter()
        .map(|[w1, w2, w3]| Expert {
            w1: flex::elems(w1, 0, dim * inter),
            w2: flex::elems(w2, 0, dim * inter),
            w3: flex::elems(w3, 0, dim * inter),
        })
        .collect();
    let groups: Vec<Group> = groups
        .into_iter()
        .enumerate()
        .map(|(i, (_, rows))| (i, rows))
        .collect();
    let level = Level::current();
    let y = routed_kernel(level, &x32, t, dim, inter, &ex, &groups);
    Some(from_flex(flex::from_f32(y, Shape::from([t, dim]), dtype)))
}

/// `x` `[t, dim]` on flex as f32 values (widened once from f16/bf16), with its dtype; `None` on
/// another backend or dtype.
fn host_f32<B: Backend>(x: &Tensor<B, 2>) -> Option<(Vec<f32>, DType)> {
    let [t, dim] = x.dims();
    let xf = into_flex(x.clone()).ok()?;
    let dtype = xf.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
    let xf = xf.to_contiguous();
    let level = Level::current();
    Some((
        convert::to_f32(level, flex::elems(&xf, xf.layout().start_offset(), t * dim)),
        dtype,
    ))
}

/// The routed experts' weighted sum `[t, dim]` for `x` `[t, dim]` on flex, each expert taken from
/// `src` (storage through a cache, or all in memory) as the layer reaches it, in expert order: the
/// same products and the same order of sums as [`routed`] for any number of tokens. `next` is
/// the following MoE layer and its predicted experts (read ahead when `src` prefetches).
pub(crate) fn streamed<B: Backend>(
    x: &Tensor<B, 2>,
    routing: &Routing,
    layer: usize,
    src: &mut dyn super::storage::ExpertSource,
    next: Option<(usize, Vec<usize>)>,
) -> anyhow::Result<Tensor<B, 2>> {
    let [t, dim] = x.dims();
    let (x32, dtype) = host_f32(x).ok_or_else(|| {
        anyhow::anyhow!(
            "experts streamed from storage run on the CPU backend (flex) in f32, f16 or bf16"
        )
    })?;
    let groups = super::storage::groups(&routing.experts, &routing.weights);
    let order: Vec<usize> = groups.iter().map(|g| g.0).collect();
    src.begin_layer(layer, &order, next);
    let level = Level::current();
    let mut y = vec![0f32; t * dim];
    for (e, rows) in &groups {
        let buf = src.get(layer, *e)?;
        let ex = buf.expert();
        let inter = ex.w1.len() / dim;
        let o = crate::kernels::moe::expert_rows(level, &x32, dim, inter, &ex, rows);
        crate::kernels::moe::accumulate(&mut y, dim, rows, &o);
    }
    Ok(from_flex(flex::from_f32(y, Shape::from([t, dim]), dtype)))
}
