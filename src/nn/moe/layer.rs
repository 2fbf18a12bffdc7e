//! MoE 层：细粒度路由专家（SwiGLU）+ 常驻共享专家，按专家分组的稀疏分发。
//!
//! 分发（dropless）：路由在主机上得到每个 token 的 k 个专家；把 (token, 槽位) 对按专家排序，
//! 对每个被选中的专家用 `select` 取出它的 token 行、做一次矩阵乘（该专家的 SwiGLU），把所有
//! 专家的输出按排序顺序拼接，再用逆排列一次 `select` 还原成 `[tokens, k, dim]`，乘门控权重后
//! 在 k 上求和，最后加上共享专家的输出。没有对每个 token 遍历所有专家，也没有
//! `[tokens, experts, width]` 的稠密掩码。

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::offload::ExpertStore;
use super::router::{MoeRouter, RouterConfig, Routing};
use crate::nn::attention::blocked::bucket;
use crate::nn::ffn::SwiGlu;

/// MoE 层配置（DeepSeek 的参数名）。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// 隐藏维度。
    pub dim: usize,
    /// 每个专家的中间维度。
    pub moe_inter_dim: usize,
    /// 共享专家数（合成一个宽度为 `n_shared_experts · moe_inter_dim` 的 SwiGLU）。
    pub n_shared_experts: usize,
    /// 路由器。
    pub router: RouterConfig,
    /// 专家的 token 组按桶大小填充（形状分桶，见 [`MoeLayer::dispatch_with`]）：在按形状编译内核
    /// 的后端上由运行器打开一次；运行期属性，不写入场景、报告或检查点键。
    #[serde(skip)]
    pub shape_buckets: bool,
}

impl MoeConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MoeLayer<B> {
        MoeLayer {
            router: MoeRouter::new(self.dim, self.router.clone(), device),
            experts: (0..self.router.n_routed_experts)
                .map(|_| SwiGlu::new(self.dim, self.moe_inter_dim, device))
                .collect(),
            shared: (self.n_shared_experts > 0)
                .then(|| SwiGlu::new(self.dim, self.n_shared_experts * self.moe_inter_dim, device)),
            shape_buckets: self.shape_buckets,
        }
    }

    /// Total parameters (router + every expert + shared).
    pub fn total_params(&self) -> usize {
        let e = SwiGlu::<burn::backend::Flex>::params(self.dim, self.moe_inter_dim);
        self.dim * self.router.n_routed_experts
            + e * (self.router.n_routed_experts + self.n_shared_experts)
    }

    /// Parameters used per token (router + k routed + shared).
    pub fn active_params(&self) -> usize {
        let e = SwiGlu::<burn::backend::Flex>::params(self.dim, self.moe_inter_dim);
        self.dim * self.router.n_routed_experts
            + e * (self.router.num_experts_per_tok + self.n_shared_experts)
    }

    /// FFN width of the dense baseline with the same TOTAL parameters.
    pub fn dense_equal_total_width(&self) -> usize {
        (self.router.n_routed_experts + self.n_shared_experts) * self.moe_inter_dim
    }

    /// FFN width of the dense baseline with the same ACTIVE parameters.
    pub fn dense_equal_active_width(&self) -> usize {
        (self.router.num_experts_per_tok + self.n_shared_experts) * self.moe_inter_dim
    }
}

/// DeepSeekMoE 层。
#[derive(Module, Debug)]
pub struct MoeLayer<B: Backend> {
    /// 门控。
    pub router: MoeRouter<B>,
    /// 路由专家。
    pub experts: Vec<SwiGlu<B>>,
    /// 共享专家（合成一个）。
    pub shared: Option<SwiGlu<B>>,
    /// 形状分桶（见 [`MoeConfig::shape_buckets`]）。
    pub shape_buckets: bool,
}

impl<B: Backend> MoeLayer<B> {
    /// Routes and runs the experts. Returns the output and the routing (with load statistics).
    ///
    /// # Shapes
    /// `x: [tokens, dim] -> [tokens, dim]`
    pub fn forward(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Routing) {
        let routing = self.router.route(x.clone());
        let y = self.dispatch(x, &routing);
        (y, routing)
    }

    /// [`MoeLayer::forward`] with the routed experts taken from `store` (layer `layer` of an
    /// offloaded model) instead of this layer's own (empty) expert list.
    ///
    /// `next` is the following MoE layer (its index and router). When the store prefetches,
    /// that router is applied to this layer's input in the same read-back as this layer's own
    /// routing, and once this layer's experts are dispatched (their kernels queued) the
    /// predicted experts of the next layer are copied in, so the copies overlap this layer's
    /// compute on asynchronous devices. Prefetching changes what is resident, never what is
    /// computed.
    pub fn forward_offloaded(
        &self,
        x: Tensor<B, 2>,
        layer: usize,
        store: &mut ExpertStore<B>,
        next: Option<(usize, &MoeRouter<B>)>,
    ) -> (Tensor<B, 2>, Routing) {
        let (routing, predicted) = match next.filter(|_| store.prefetching()) {
            Some((nl, r)) => {
                let (now, guess) = self.router.route_with_lookahead(x.clone(), r);
                (now, Some((nl, guess)))
            }
            None => (self.router.route(x.clone()), None),
        };
        let y = self.dispatch_with(x, &routing, &mut |e, xe| store.get(layer, e).forward(xe));
        if let Some((nl, guess)) = predicted {
            let in_use: std::collections::BTreeSet<usize> =
                routing.experts.iter().flatten().copied().collect();
            store.prefetch(nl, &guess, in_use.len());
        }
        (y, routing)
    }

    /// [`MoeLayer::forward`] with the routed experts taken from `src` as the layer reaches them
    /// (CPU backend: experts on storage behind a cache, or all in memory for the twin), each
    /// expert's rows computed in the kernel module in expert order ([`super::cpu::streamed`]).
    /// When `src` prefetches, `next`'s router is applied to this layer's input in the same pass
    /// as this layer's routing, and its predicted experts (most votes first) are read ahead after
    /// this layer's own.
    pub fn forward_streamed(
        &self,
        x: Tensor<B, 2>,
        layer: usize,
        src: &mut dyn super::storage::ExpertSource,
        next: Option<(usize, &MoeRouter<B>)>,
    ) -> anyhow::Result<(Tensor<B, 2>, Routing)> {
        let (routing, predicted) = match next.filter(|_| src.prefetching()) {
            Some((nl, r)) => {
                let (now, guess) = self.router.route_with_lookahead(x.clone(), r);
                (now, Some((nl, by_votes(&guess))))
            }
            None => (self.router.route(x.clone()), None),
        };
        let y = super::cpu::streamed(&x, &routing, layer, src, predicted)?;
        Ok((self.with_shared(x, y), routing))
    }

    /// Sorted dispatch for a given routing.
    ///
    /// On the CPU backend a decode step's routed experts run in the kernel module, on their own
    /// weight rows (no gathered copies; see `nn::moe::cpu`); elsewhere the sorted dispatch.
    pub fn dispatch(&self, x: Tensor<B, 2>, routing: &Routing) -> Tensor<B, 2> {
        if !self.shape_buckets {
            if let Some(y) = super::cpu::routed(&x, routing, &self.experts) {
                return self.with_shared(x, y);
            }
        }
        // (no module clones here: cloning a lazily initialised parameter draws new weights)
        self.dispatch_with(x, routing, &mut |e, xe| self.experts[e].forward(xe))
    }

    /// `y` plus the shared experts' output for `x` (`[t, dim]` both).
    fn with_shared(&self, x: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 2> {
        let [t, dim] = x.dims();
        match &self.shared {
            Some(shared) => {
                crate::nn::add(y, shared.forward(x.reshape([1, t, dim])).reshape([t, dim]))
            }
            None => y,
        }
    }

    /// Sorted dispatch; `expert(e, x)` applies routed expert `e` to its tokens `[1, n, dim]`
    /// (a resident expert, or one fetched from an offload cache).
    ///
    /// With `shape_buckets` on (set for backends that compile kernels per shape: CubeCL's wgpu and
    /// CUDA) each expert's group of
    /// tokens is padded to a bucket size ([`bucket`]: 1, 2, 3, 4, 6, 8, 12, …) by repeating its
    /// last token, and the padded rows' outputs are dropped: with a varying number of tokens per
    /// expert, exact shapes would compile new kernels on almost every call.
    pub fn dispatch_with(
        &self,
        x: Tensor<B, 2>,
        routing: &Routing,
        expert: &mut dyn FnMut(usize, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        self.dispatch_rows(x, routing, expert, self.shape_buckets)
    }

    /// [`MoeLayer::dispatch_with`] with the row padding chosen by the caller.
    pub fn dispatch_rows(
        &self,
        x: Tensor<B, 2>,
        routing: &Routing,
        expert: &mut dyn FnMut(usize, Tensor<B, 3>) -> Tensor<B, 3>,
        bucketed: bool,
    ) -> Tensor<B, 2> {
        let [t, dim] = x.dims();
        let device = x.device();
        let k = routing.experts.first().map(|e| e.len()).unwrap_or(0);
        // (expert, token, slot) triples sorted by expert: one contiguous group per expert
        let mut pairs: Vec<(usize, usize, usize)> = routing
            .experts
            .iter()
            .enumerate()
            .flat_map(|(tok, es)| es.iter().enumerate().map(move |(slot, &e)| (e, tok, slot)))
            .collect();
        pairs.sort_unstable();
        let mut outs = Vec::new();
        let mut i = 0;
        while i < pairs.len() {
            let e = pairs[i].0;
            let j = i + pairs[i..].iter().take_while(|p| p.0 == e).count();
            let mut rows: Vec<i64> = pairs[i..j].iter().map(|p| p.1 as i64).collect();
            let n = rows.len();
            let nb = if bucketed { bucket(n) } else { n };
            rows.resize(nb, rows[n - 1]);
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [nb]), &device);
            let xe = x.clone().select(0, idx).reshape([1, nb, dim]);
            let ye = expert(e, xe).reshape([nb, dim]);
            outs.push(if nb > n { ye.slice([0..n, 0..dim]) } else { ye });
            i = j;
        }
        let y = if outs.is_empty() {
            Tensor::zeros([t, dim], &device)
        } else {
            // inverse permutation: sorted position of each (token, slot)
            let mut inv = vec![0i64; t * k];
            for (pos, &(_, tok, slot)) in pairs.iter().enumerate() {
                inv[tok * k + slot] = pos as i64;
            }
            let sorted = Tensor::cat(outs, 0); // [t·k, dim] in expert order
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(inv, [t * k]), &device);
            let per_slot = sorted.select(0, idx).reshape([t, k, dim]);
            let w: Vec<f32> = routing.weights.iter().flatten().copied().collect();
            let w = Tensor::<B, 3>::from_data(TensorData::new(w, [t, k, 1]), &device);
            (per_slot * w.expand([t, k, dim]))
                .sum_dim(1)
                .reshape([t, dim])
        };
        self.with_shared(x, y)
    }

    /// Reference: token by token, expert by expert (tests only; slow by design).
    pub fn forward_reference(&self, x: Tensor<B, 2>, routing: &Routing) -> Tensor<B, 2> {
        let [t, dim] = x.dims();
        let rows: Vec<Tensor<B, 2>> = (0..t)
            .map(|tok| {
                let xt = x.clone().slice([tok..tok + 1, 0..dim]);
                let mut acc = Tensor::<B, 2>::zeros([1, dim], (&x.device(), x.dtype()));
                for (&e, &w) in routing.experts[tok].iter().zip(&routing.weights[tok]) {
                    let o = self.experts[e].forward(xt.clone().reshape([1, 1, dim]));
                    acc = acc + o.reshape([1, dim]) * w;
                }
                if let Some(shared) = &self.shared {
                    acc = acc + shared.forward(xt.reshape([1, 1, dim])).reshape([1, dim]);
                }
                acc
            })
            .collect();
        Tensor::cat(rows, 0)
    }
}

/// The experts of `r`, most-routed first (ties: lower index first).
pub(crate) fn by_votes(r: &Routing) -> Vec<usize> {
    let mut votes: std::collections::BTreeMap<usize, usize> = Default::default();
    for &e in r.experts.iter().flatten() {
        *votes.entry(e).or_default() += 1;
    }
    let mut order: Vec<(usize, usize)> = votes.into_iter().collect();
    order.sort_by_key(|&(e, v)| (std::cmp::Reverse(v), e));
    order.into_iter().map(|(e, _)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::moe::router::ScoreFunc;
    use crate::rng::uniform;
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::tensor::DType;

    type B = Flex;

    fn config(score: ScoreFunc, groups: usize) -> MoeConfig {
        MoeConfig {
            dim: 16,
            moe_inter_dim: 8,
            n_shared_experts: 1,
            router: RouterConfig {
                n_routed_experts: 8,
                num_experts_per_tok: 3,
                score_func: score,
                topk_method: crate::nn::moe::TopkMethod::NoauxTc,
                n_group: groups,
                topk_group: groups.clamp(1, 2),
                route_scale: 1.0,
                norm_topk_prob: true,
                bias_update_speed: 0.001,
            },
            shape_buckets: false,
        }
    }

    #[test]
    fn sorted_dispatch_equals_the_per_token_reference() {
        let dev = Default::default();
        for (score, groups) in [(ScoreFunc::Softmax, 1), (ScoreFunc::Sigmoid, 4)] {
            B::seed(&dev, 3);
            let layer = config(score, groups).init::<B>(&dev);
            let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(20 * 16, 5), [20, 16]), &dev);
            let (y, routing) = layer.forward(x.clone());
            let want = layer.forward_reference(x, &routing);
            let d: f32 = (y - want).abs().max().into_scalar();
            assert!(d < 1e-5, "{score:?}: max |diff| {d} (tolerance 1e-5)");
            assert_eq!(
                routing.load.tokens_per_expert.iter().sum::<usize>(),
                20 * 3,
                "dropless"
            );
        }
    }

    #[test]
    fn a_batch_8_decode_step_equals_the_per_token_reference_in_every_dtype() {
        // 8 tokens: the CPU kernel path (nn::moe::cpu), f32 and half precision
        let dev = Default::default();
        B::seed(&dev, 4);
        let layer = config(ScoreFunc::Sigmoid, 4).init::<B>(&dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(8 * 16, 6), [8, 16]), &dev);
        let routing = layer.router.route(x.clone());
        assert!(
            super::super::cpu::routed(&x, &routing, &layer.experts).is_some(),
            "kernel path"
        );
        let want = layer.forward_reference(x.clone(), &routing);
        let d: f32 = (layer.dispatch(x.clone(), &routing) - want.clone())
            .abs()
            .max()
            .into_scalar();
        assert!(d < 1e-5, "f32: max |diff| {d}");
        for (dt, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let cast = |f: &SwiGlu<B>| {
                let [w1, w2, w3] = f.linears().map(|l| burn::nn::Linear {
                    weight: burn::module::Param::from_tensor(l.weight.val().cast(dt)),
                    bias: None,
                });
                SwiGlu::from_linears(w1, w2, w3)
            };
            let lh = MoeLayer {
                router: layer.router.clone(),
                experts: layer.experts.iter().map(cast).collect(),
                shared: layer.shared.as_ref().map(cast),
                shape_buckets: false,
            };
            let xh = x.clone().cast(dt);
            let want = lh.forward_reference(xh.clone(), &routing).cast(DType::F32);
            let got = lh.dispatch(xh, &routing);
            assert_eq!(got.dtype(), dt);
            let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
            assert!(d < tol, "{dt:?}: max |diff| {d}");
        }
    }

    #[test]
    fn bucketed_rows_give_the_same_output() {
        // 20 tokens x top-3 over 8 experts: groups of uneven sizes, padded to buckets
        let dev = Default::default();
        B::seed(&dev, 4);
        let layer = config(ScoreFunc::Softmax, 1).init::<B>(&dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(20 * 16, 6), [20, 16]), &dev);
        let routing = layer.router.route(x.clone());
        let mut shapes = Vec::new();
        let padded = layer.dispatch_rows(
            x.clone(),
            &routing,
            &mut |e, xe| {
                shapes.push(xe.dims()[1]);
                layer.experts[e].forward(xe)
            },
            true,
        );
        let exact = layer.dispatch_rows(
            x,
            &routing,
            &mut |e, xe| layer.experts[e].forward(xe),
            false,
        );
        let d: f32 = (padded - exact).abs().max().into_scalar();
        assert!(d < 1e-6, "max |diff| {d}");
        assert!(shapes.iter().all(|&n| n == bucket(n)), "{shapes:?}");
        let counts: Vec<usize> = routing
            .load
            .tokens_per_expert
            .iter()
            .copied()
            .filter(|&c| c > 0)
            .collect();
        assert!(
            counts.iter().any(|&c| c != bucket(c)),
            "some group needed padding: {counts:?}"
        );
    }

    #[test]
    fn parameter_counts() {
        let c = config(ScoreFunc::Softmax, 1);
        let layer = c.init::<B>(&Default::default());
        assert_eq!(layer.num_params(), c.total_params());
        // 8 routed + 1 shared experts of 3·16·8 = 384, router 16·8
        assert_eq!(c.total_params(), 128 + 9 * 384);
        assert_eq!(c.active_params(), 128 + 4 * 384);
        assert_eq!(c.dense_equal_total_width(), 72);
        assert_eq!(c.dense_equal_active_width(), 32);
    }

    #[test]
    fn a_single_token_batch_works() {
        let dev = Default::default();
        let layer = config(ScoreFunc::Softmax, 1).init::<B>(&dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(16, 8), [1, 16]), &dev);
        let (y, r) = layer.forward(x);
        assert_eq!(y.dims(), [1, 16]);
        assert_eq!(r.experts[0].len(), 3);
    }
}
