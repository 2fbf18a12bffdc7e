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
    // touched experts in index order, and each one's (token, weight) rows
    let mut order: Vec<usize> = routing.experts.iter().flatten().copied().collect();
    order.sort_unstable();
    order.dedup();
    if order.last().is_some_and(|&e| e >= experts.len()) {
        return None;
    }
    let xf = into_flex(x.clone()).ok()?;
    let dtype = xf.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
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
    let groups: Vec<Group> = order
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let rows = routing
                .experts
                .iter()
                .zip(&routing.weights)
                .enumerate()
                .flat_map(|(tok, (es, ws))| {
                    es.iter()
                        .zip(ws)
                        .filter(|p| *p.0 == e)
                        .map(move |p| (tok, *p.1))
                })
                .collect();
            (i, rows)
        })
        .collect();
    let level = Level::current();
    let xf = xf.to_contiguous();
    let x32 = convert::to_f32(level, flex::elems(&xf, xf.layout().start_offset(), t * dim));
    let y = routed_kernel(level, &x32, t, dim, inter, &ex, &groups);
    Some(from_flex(flex::from_f32(y, Shape::from([t, dim]), dtype)))
}
