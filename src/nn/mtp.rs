//! 多 token 预测（MTP，DeepSeek-V3 式顺序模块）：[`MtpPredictor`]。
//!
//! 第 k 个模块（k = 1..D）在位置 i 上把上一深度的隐藏状态 `h_{k-1,i}`（k = 1 时是主模型最后
//! 一层的残差流，未过最终 RMSNorm）与第 i+k 个 token 的嵌入合并：
//! `h'_{k,i} = M_k [RMSNorm(h_{k-1,i}); RMSNorm(Emb(t_{i+k}))]`（`M_k`: 2d → d），
//! 再经过一个 Transformer 块得到 `h_{k,i}`，经模块自己的 RMSNorm 后由**共享**输出头预测
//! `t_{i+k+1}`。嵌入层与输出头属于主模型，MTP 模块只借用，不复制（一套参数）。
//!
//! 训练：损失 = 主模型交叉熵 + (λ/D)·Σ_k 第 k 深度交叉熵（见 `crate::train`）。
//! 推理：模块逐个串联起草 D 个 token，主模型一次前向验证（见 `crate::nn::decode`）。
//! D = 0 时没有模块，模型与解码完全是标准的（FR-006）。

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Int, Tensor};

use super::attention::LayerCache;
use super::model::{Block, Decoder, DecoderConfig};

/// 一个 MTP 模块：两个 RMSNorm、2d → d 投影、一个 Transformer 块、输出前的 RMSNorm。
#[derive(Module, Debug)]
pub struct MtpModule<B: Backend> {
    /// 上一深度隐藏状态的 RMSNorm。
    hnorm: RmsNorm<B>,
    /// 前瞻 token 嵌入的 RMSNorm。
    enorm: RmsNorm<B>,
    /// 合并投影 `M_k`：`[h; e]` 2d → d。
    proj: Linear<B>,
    /// 一个与主模型同构的 Transformer 块（自带注意力与 KV 缓存）。
    block: Block<B>,
    /// 送入共享输出头之前的 RMSNorm。
    norm: RmsNorm<B>,
}

/// MTP 预测器：D 个顺序模块，与主模型共享嵌入层和输出头。
#[derive(Module, Debug)]
pub struct MtpPredictor<B: Backend> {
    modules: Vec<MtpModule<B>>,
}

impl<B: Backend> MtpModule<B> {
    /// A module from its parts (a loaded checkpoint's MTP layer). `proj` takes `[h; e]`: the
    /// previous depth's hidden state first, the embedding second.
    pub fn from_parts(
        hnorm: RmsNorm<B>,
        enorm: RmsNorm<B>,
        proj: Linear<B>,
        block: Block<B>,
        norm: RmsNorm<B>,
    ) -> Self {
        MtpModule {
            hnorm,
            enorm,
            proj,
            block,
            norm,
        }
    }
}

impl<B: Backend> MtpPredictor<B> {
    /// A predictor of the given modules, in depth order.
    pub fn from_modules(modules: Vec<MtpModule<B>>) -> Self {
        MtpPredictor { modules }
    }

    /// 把第一个模块在每个深度上都用一次（权重绑定，每个深度有自己的缓存层）：DeepSeek-V3 只发布
    /// 一个 MTP 层。深度 k 的输入是深度 k-1 的隐藏状态和 token t+k 的嵌入，即论文中 D 个模块的
    /// 链式结构，只是权重相同；不是推理引擎（vLLM 的 EAGLE 提议器）那种共用一个缓存、逐位置前移的用法。
    ///
    /// The module's parameters must be initialised (loaded from a checkpoint): clones of an
    /// initialised parameter share its storage (Burn's tensors are reference-counted), while a
    /// lazy one would initialise each clone anew. Burn's `num_params` counts every depth, so the
    /// distinct weights are the first module's.
    ///
    /// # Panics
    /// Without a module.
    pub fn chained(self, depth: usize) -> Self {
        let first = self
            .modules
            .into_iter()
            .next()
            .expect("a predictor with a module");
        MtpPredictor {
            modules: vec![first; depth.max(1)],
        }
    }

    /// 新建 `depth` 个模块，形状与 `c` 的 Transformer 块相同（没有自己的嵌入层和输出头）。
    pub fn new(c: &DecoderConfig, depth: usize, device: &B::Device) -> Self {
        let d = c.hidden;
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(c.rms_norm_eps)
                .init(device)
        };
        MtpPredictor {
            modules: (0..depth)
                .map(|_| MtpModule {
                    hnorm: norm(),
                    enorm: norm(),
                    proj: LinearConfig::new(2 * d, d).with_bias(false).init(device),
                    block: Block::new(c, device),
                    norm: norm(),
                })
                .collect(),
        }
    }

    /// 配置 `c` 下 `depth` 个模块的参数量（解析计算；有测试核对）。
    pub fn params(c: &DecoderConfig, depth: usize) -> usize {
        let d = c.hidden;
        let block = (c.params() - 2 * c.vocab_size * d - d) / c.n_layers.max(1);
        depth * (3 * d + 2 * d * d + block)
    }

    /// 把每个模块的 MLA 切换为朴素/吸收实现（同一组权重；之后需要新建缓存）。
    pub fn set_mla_impl(&mut self, i: crate::nn::attention::MlaImpl) {
        for m in &mut self.modules {
            m.block.set_mla_impl(i);
        }
    }

    /// 草稿深度 D（模块数）。
    pub fn depth(&self) -> usize {
        self.modules.len()
    }

    /// 只保留前 `depth` 个模块（模块 k 只依赖编号小于 k 的模块，所以按深度 D 训练的
    /// 预测器可用于任何 <= D 的深度）。
    pub fn truncated(mut self, depth: usize) -> Self {
        self.modules.truncate(depth);
        self
    }

    /// 为每个模块新建一个空缓存层。
    pub fn new_caches(&self, batch: usize, capacity: usize) -> Vec<LayerCache<B>> {
        self.modules
            .iter()
            .map(|m| {
                let device = m.proj.weight.device();
                m.block.new_cache(batch, capacity, &device)
            })
            .collect()
    }

    /// 运行模块 `k`（从 0 开始：即论文中的第 k+1 个模块），输入为 `h_prev` `[b, s, d]` 与
    /// 前方 `k+1` 个位置的 token `[b, s]`；序列 `i` 位于位置 `starts[i]..`。返回该模块的
    /// 隐藏状态 `[b, s, d]`（输出 RMSNorm 之前），也就是下一个模块的输入。
    pub fn forward_module(
        &self,
        k: usize,
        main: &Decoder<B>,
        h_prev: Tensor<B, 3>,
        tokens_ahead: Tensor<B, 2, Int>,
        starts: &[usize],
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3> {
        let m = &self.modules[k];
        let e = super::rms_norm(&m.enorm, main.embed(tokens_ahead));
        let h = super::rms_norm(&m.hnorm, h_prev);
        let x = super::linear::forward(&m.proj, Tensor::cat(vec![h, e], 2));
        m.block.forward(x, starts, cache, None)
    }

    /// 模块 `k` 经主模型共享输出头得到的 logits。`[b, s, d] -> [b, s, vocab]`
    pub fn logits(&self, k: usize, main: &Decoder<B>, h: Tensor<B, 3>) -> Tensor<B, 3> {
        main.logits(super::rms_norm(&self.modules[k].norm, h))
    }
}

/// 主模型加 MTP 模块：训练与检查点的单位（一套参数，嵌入与输出头只在主模型里）。
#[derive(Module, Debug)]
pub struct MtpModel<B: Backend> {
    /// 主模型。
    pub main: Decoder<B>,
    /// MTP 模块。
    pub mtp: MtpPredictor<B>,
}

impl<B: Backend> MtpModel<B> {
    /// 新建模型（需要可复现的权重时，先给后端设随机种子）。
    pub fn new(c: &DecoderConfig, depth: usize, device: &B::Device) -> Self {
        MtpModel {
            main: c.init(device),
            mtp: MtpPredictor::new(c, depth, device),
        }
    }

    /// 训练窗口 `tokens` `[b, t]` 的 teacher forcing logits：主模型的 `[b, t-1, vocab]`
    /// （预测 token `1..t`），以及每个深度 k = 1..D 上模块 k 的 `[b, t-1-k, vocab]`
    /// （位置 i 预测 token `i+k+1`）。
    pub fn forward_all(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        let [b, t] = tokens.dims();
        let mut cache = self.main.new_cache(b, t);
        let starts = vec![0; b];
        let trunk = self
            .main
            .forward_trunk(tokens.clone(), &mut cache, &starts, None);
        let d = trunk.dims()[2];
        let main_logits =
            self.main.logits(
                self.main
                    .final_norm(trunk.clone().slice([0..b, 0..t - 1, 0..d])),
            );
        (main_logits, self.depth_logits(trunk, tokens))
    }

    /// 各深度模块在主干输出 `trunk` `[b, t, d]`（最终 RMSNorm 之前）上的教师强制 logits：
    /// 第 k 个 `[b, t-1-k, vocab]`。自蒸馏时 `trunk` 由冻结的主模型在非自动微分后端上算出，
    /// 只有模块（与共享的嵌入、输出头）进入计算图。
    pub fn depth_logits(
        &self,
        trunk: Tensor<B, 3>,
        tokens: Tensor<B, 2, Int>,
    ) -> Vec<Tensor<B, 3>> {
        let [b, t] = tokens.dims();
        let d = trunk.dims()[2];
        let starts = vec![0; b];
        let mut depth_logits = Vec::new();
        let mut h = trunk;
        for (k, mut cache) in self.mtp.new_caches(b, t).into_iter().enumerate() {
            // 位置 i = 0..len 由 h_{k,i} 与 token i+k+1 预测 token i+k+2
            let len = t.saturating_sub(k + 2);
            if len == 0 {
                break;
            }
            let h_prev = h.slice([0..b, 0..len, 0..d]);
            let ahead = tokens.clone().slice([0..b, k + 1..k + 1 + len]);
            h = self
                .mtp
                .forward_module(k, &self.main, h_prev, ahead, &starts, &mut cache);
            depth_logits.push(self.mtp.logits(k, &self.main, h.clone()));
        }
        depth_logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::AttentionConfig;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    fn config() -> DecoderConfig {
        DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: 40,
            hidden: 16,
            n_layers: 2,
            ffn_hidden: 24,
            attention: AttentionConfig::mha(2, 8),
            moe: None,
        }
    }

    #[test]
    fn modules_share_the_embedding_and_head_one_parameter_set() {
        let c = config();
        let dev = Default::default();
        let m = MtpModel::<B>::new(&c, 3, &dev);
        assert_eq!(m.main.num_params(), c.params());
        assert_eq!(m.mtp.num_params(), MtpPredictor::<B>::params(&c, 3));
        // the predictor holds no vocab-sized tensor: embedding and head are the main model's
        assert!(m.mtp.num_params() < 3 * (c.params() - 2 * c.vocab_size * c.hidden));
        assert_eq!(
            m.num_params(),
            c.params() + MtpPredictor::<B>::params(&c, 3)
        );
    }

    #[test]
    fn teacher_forced_shapes_per_depth() {
        let c = config();
        let dev = Default::default();
        let m = MtpModel::<B>::new(&c, 3, &dev);
        let ids: Vec<i64> = (0..2 * 10).map(|i| i % 40).collect();
        let toks = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 10]), &dev);
        let (main, depths) = m.forward_all(toks);
        assert_eq!(main.dims(), [2, 9, 40]);
        let shapes: Vec<[usize; 3]> = depths.iter().map(|t| t.dims()).collect();
        assert_eq!(shapes, vec![[2, 8, 40], [2, 7, 40], [2, 6, 40]]);
        assert_eq!(m.mtp.clone().truncated(2).depth(), 2);
    }
}
