//! `MoeRouter`：DeepSeek 的门控（`Gate`）。
//!
//! 打分：`scores = softmax(x · Wᵀ)`（V2）或 `sigmoid(x · Wᵀ)`（V3），`W` 形状 `[n_experts, dim]`。
//! 选择：可选的无辅助损失偏置 `bias`（只用于挑选专家）；按 `topk_method` 分组路由——专家分成
//! `n_group` 组，组分数在 `group_limited_greedy`（V2）是组内最高分，在 `noaux_tc`（V3）是组内
//! 最高两个加偏置分数之和；保留 `topk_group` 组（其余组的专家不参与，相当于 −inf），再在其中选
//! top-k；`greedy` 不分组。
//! 权重：取*未加偏置*的分数；`norm_topk_prob` 时在选中的专家上归一化（分母加 1e-20，与
//! transformers 相同），再乘 `route_scale`（`routed_scaling_factor`）。不丢弃任何 token。
//!
//! 偏置更新（DeepSeek-V3 的负载均衡）：每步之后，负载低于平均的专家 `bias += γ`，高于平均的
//! `bias -= γ`（γ 默认 0.001）。每次调用都给出负载统计（每个专家的 token 数、最大/平均、空闲专家数）。
//!
//! top-k 在主机上完成：Burn 的 `topk`/`sort` 在每个后端都会回落到主机（一次设备→主机同步），
//! 所以这里只把 `[tokens, n_experts]` 的分数读回一次，挑选与统计都在主机上做。

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// 路由打分函数（场景文件与 config.json 里写作 `scoring_func = "softmax" | "sigmoid"`）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunc {
    /// softmax（DeepSeek-V2）。
    Softmax,
    /// sigmoid（DeepSeek-V3）。
    Sigmoid,
}

/// `topk_method`：如何从打分中选出专家（config.json 的取值）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// 直接取 top-k，不分组（V2-Lite）。
    #[default]
    Greedy,
    /// 组分数 = 组内最大分数，保留 `topk_group` 个组，再在其中取 top-k（V2）。
    GroupLimitedGreedy,
    /// 打分加上选择偏置（`e_score_correction_bias`）只用于挑选；组分数 = 组内前 2 个加偏置
    /// 分数之和（V3、Moonlight）。
    NoauxTc,
}

impl TopkMethod {
    /// The name config.json uses.
    pub fn name(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

/// 路由器配置（DeepSeek 的参数名）。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    /// 路由专家数。
    pub n_routed_experts: usize,
    /// 每个 token 选中的专家数 top-k。
    pub num_experts_per_tok: usize,
    /// 打分函数。
    pub score_func: ScoreFunc,
    /// 选择方法（决定组分数的定义；`Greedy` 不分组）。
    pub topk_method: TopkMethod,
    /// 分组数（1 = 不分组）。
    pub n_group: usize,
    /// 保留的组数。
    pub topk_group: usize,
    /// 门控权重缩放（`routed_scaling_factor`）。
    pub route_scale: f64,
    /// 是否在选中专家上把权重归一化（`norm_topk_prob`）。
    pub norm_topk_prob: bool,
    /// 偏置更新步长 γ。
    pub bias_update_speed: f32,
}

/// 一次路由的结果（主机上）。
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// 每个 token 选中的专家 `[tokens][k]`（按分数从高到低）。
    pub experts: Vec<Vec<usize>>,
    /// 对应的门控权重 `[tokens][k]`。
    pub weights: Vec<Vec<f32>>,
    /// 负载统计。
    pub load: LoadStats,
}

/// 负载统计。
#[derive(Debug, Clone, PartialEq)]
pub struct LoadStats {
    /// 每个专家分到的 token 数。
    pub tokens_per_expert: Vec<usize>,
    /// 最大负载 / 平均负载（1.0 = 完全均衡）。
    pub max_over_mean: f64,
    /// 没有分到 token 的专家数。
    pub unused_experts: usize,
}

impl LoadStats {
    /// 由每个专家分到的 token 数计算负载统计。
    pub fn of(tokens_per_expert: Vec<usize>) -> LoadStats {
        let n = tokens_per_expert.len().max(1) as f64;
        let total: usize = tokens_per_expert.iter().sum();
        let mean = total as f64 / n;
        let max = tokens_per_expert.iter().copied().max().unwrap_or(0) as f64;
        LoadStats {
            max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            unused_experts: tokens_per_expert.iter().filter(|&&c| c == 0).count(),
            tokens_per_expert,
        }
    }
}

/// 门控模块：`W` 为 `[dim -> n_experts]` 的线性层（Burn 的权重形状为 `[dim, n_experts]`）。
#[derive(Module, Debug)]
pub struct MoeRouter<B: Backend> {
    gate: Linear<B>,
    /// 只用于挑选专家的偏置（不是可训练参数，按负载规则更新）。
    #[module(skip)]
    bias: Vec<f32>,
    #[module(skip)]
    config: RouterConfig,
}

impl<B: Backend> MoeRouter<B> {
    /// 为隐藏维度 `dim` 新建路由器（偏置初始为 0）。
    pub fn new(dim: usize, config: RouterConfig, device: &B::Device) -> Self {
        MoeRouter {
            gate: LinearConfig::new(dim, config.n_routed_experts)
                .with_bias(false)
                .init(device),
            bias: vec![0.0; config.n_routed_experts],
            config,
        }
    }

    /// 由门控线性层（Burn 的 `[dim, n_experts]` 布局）与选择偏置组成路由器（加载的检查点）。
    ///
    /// # Panics
    /// `bias` 的长度不等于 `n_routed_experts` 时 panic。
    pub fn from_parts(gate: Linear<B>, bias: Vec<f32>, config: RouterConfig) -> Self {
        assert_eq!(bias.len(), config.n_routed_experts);
        MoeRouter { gate, bias, config }
    }

    /// 路由器配置。
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// 选择偏置（每个专家一个）。
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// 设置选择偏置（用于测试、加载已均衡的路由器）。
    ///
    /// # Panics
    /// `bias` 的长度不等于 `n_routed_experts` 时 panic。
    pub fn set_bias(&mut self, bias: Vec<f32>) {
        assert_eq!(bias.len(), self.config.n_routed_experts);
        self.bias = bias;
    }

    /// 在设备上计算路由分数。`[tokens, dim] -> [tokens, n_experts]`
    pub fn scores(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // 无论模型的 dtype 是什么，都以 f32 打分（DeepSeek 的 `Gate` 也是如此）
        let logits =
            crate::nn::attention::blocked::to_dtype(self.gate.forward(x), burn::tensor::DType::F32);
        match self.config.score_func {
            ScoreFunc::Softmax => activation::softmax(logits, 1),
            ScoreFunc::Sigmoid => activation::sigmoid(logits),
        }
    }

    /// 路由 `[tokens, dim]`：在设备上打分，读回一次，在主机上挑选。
    pub fn route(&self, x: Tensor<B, 2>) -> Routing {
        let [t, _] = x.dims();
        // read in whatever float type the backend keeps them (converted per element)
        let scores: Vec<f32> = self.scores(x).into_data().iter::<f32>().collect();
        select(&scores, t, &self.bias, &self.config)
    }

    /// 用本路由器路由 `x`，并在同一次设备读回中预测 `next`（下一个 MoE 层的路由器）对同一
    /// 输入的路由：这是预门控专家预取的前瞻（残差流逐层变化很小，所以把下一层的门控
    /// 作用在本层输入上，就能廉价地猜出它的选择）。
    pub fn route_with_lookahead(&self, x: Tensor<B, 2>, next: &MoeRouter<B>) -> (Routing, Routing) {
        let [t, _] = x.dims();
        let (e1, e2) = (self.config.n_routed_experts, next.config.n_routed_experts);
        let both: Vec<f32> = Tensor::cat(vec![self.scores(x.clone()), next.scores(x)], 1)
            .into_data()
            .iter::<f32>()
            .collect();
        let (mut a, mut b) = (Vec::with_capacity(t * e1), Vec::with_capacity(t * e2));
        for row in both.chunks(e1 + e2) {
            a.extend_from_slice(&row[..e1]);
            b.extend_from_slice(&row[e1..]);
        }
        (
            select(&a, t, &self.bias, &self.config),
            select(&b, t, &next.bias, &next.config),
        )
    }

    /// 无辅助损失的负载均衡更新：负载低于平均的专家 `bias += γ`，
    /// 高于平均的 `-= γ`。
    pub fn update_bias(&mut self, load: &LoadStats) {
        let n = load.tokens_per_expert.len() as f64;
        let mean = load.tokens_per_expert.iter().sum::<usize>() as f64 / n;
        let g = self.config.bias_update_speed;
        for (b, &c) in self.bias.iter_mut().zip(&load.tokens_per_expert) {
            if (c as f64) < mean {
                *b += g;
            } else if (c as f64) > mean {
                *b -= g;
            }
        }
    }
}

/// 在主机上为 `t` 个 token 从行优先的 `scores` `[t, n_experts]` 中挑选专家并计算权重。
pub fn select(scores: &[f32], t: usize, bias: &[f32], c: &RouterConfig) -> Routing {
    let e = c.n_routed_experts;
    let k = c.num_experts_per_tok;
    let per_group = e / c.n_group.max(1);
    let mut experts = Vec::with_capacity(t);
    let mut weights = Vec::with_capacity(t);
    let mut counts = vec![0usize; e];
    for row in scores.chunks(e).take(t) {
        // 加偏置的分数用于挑选；未加偏置的分数用于加权
        let biased: Vec<f32> = row.iter().zip(bias).map(|(s, b)| s + b).collect();
        let mut allowed = vec![true; e];
        if c.n_group > 1 && c.topk_method != TopkMethod::Greedy {
            // 组分数：V2 取组内最高分，V3 取组内最高两个加偏置分数之和
            let top = match c.topk_method {
                TopkMethod::GroupLimitedGreedy => 1,
                _ => 2,
            };
            let mut groups: Vec<(usize, f32)> = (0..c.n_group)
                .map(|g| {
                    let mut v: Vec<f32> = biased[g * per_group..(g + 1) * per_group].to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    (g, v.iter().take(top).sum())
                })
                .collect();
            groups.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let keep: Vec<usize> = groups.iter().take(c.topk_group).map(|g| g.0).collect();
            for (i, a) in allowed.iter_mut().enumerate() {
                *a = keep.contains(&(i / per_group));
            }
        }
        let mut order: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
        // 按加偏置分数降序；分数相同时编号小者优先（结果确定）
        order.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
        order.truncate(k);
        let mut w: Vec<f32> = order.iter().map(|&i| row[i]).collect();
        // as transformers' DeepseekV3TopkRouter: `w / (sum + 1e-20)`, then `· routed_scaling_factor`
        if c.norm_topk_prob {
            let sum: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= sum);
        }
        w.iter_mut().for_each(|x| *x *= c.route_scale as f32);
        for &i in &order {
            counts[i] += 1;
        }
        experts.push(order);
        weights.push(w);
    }
    Routing {
        experts,
        weights,
        load: LoadStats::of(counts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(e: usize, k: usize, groups: usize, topk_group: usize) -> RouterConfig {
        RouterConfig {
            n_routed_experts: e,
            num_experts_per_tok: k,
            score_func: ScoreFunc::Softmax,
            topk_method: if groups > 1 {
                TopkMethod::NoauxTc
            } else {
                TopkMethod::Greedy
            },
            n_group: groups,
            topk_group,
            route_scale: 1.0,
            norm_topk_prob: false,
            bias_update_speed: 0.001,
        }
    }

    #[test]
    fn top_k_by_hand() {
        let s = [0.1, 0.4, 0.05, 0.3, 0.15];
        let r = select(&s, 1, &[0.0; 5], &cfg(5, 2, 1, 1));
        assert_eq!(r.experts, vec![vec![1, 3]]);
        assert_eq!(r.weights, vec![vec![0.4, 0.3]]);
        assert_eq!(r.load.tokens_per_expert, vec![0, 1, 0, 1, 0]);
        assert_eq!(r.load.unused_experts, 3);
    }

    #[test]
    fn group_limited_by_hand() {
        // 3 groups of 2: g0 = {0.30, 0.01} -> 0.31, g1 = {0.20, 0.20} -> 0.40, g2 = {0.25, 0.04} -> 0.29
        // keep 1 group (g1) although expert 0 has the highest single score
        let s = [0.30, 0.01, 0.20, 0.20, 0.25, 0.04];
        let r = select(&s, 1, &[0.0; 6], &cfg(6, 2, 3, 1));
        assert_eq!(r.experts, vec![vec![2, 3]]);
        // keep 2 groups (g1, g0): top-2 among {0,1,2,3} = 0 then 2 (tie 2/3 -> lower index)
        let r = select(&s, 1, &[0.0; 6], &cfg(6, 2, 3, 2));
        assert_eq!(r.experts, vec![vec![0, 2]]);
    }

    #[test]
    fn bias_changes_selection_not_weights() {
        let s = [0.1, 0.4, 0.05, 0.3, 0.15];
        let bias = [0.0, 0.0, 0.5, 0.0, 0.0];
        let r = select(&s, 1, &bias, &cfg(5, 2, 1, 1));
        assert_eq!(r.experts, vec![vec![2, 1]]);
        // weights are the unbiased scores of the chosen experts
        assert_eq!(r.weights, vec![vec![0.05, 0.4]]);
    }

    #[test]
    fn sigmoid_weights_are_renormalised_and_scaled() {
        let mut c = cfg(4, 2, 1, 1);
        c.score_func = ScoreFunc::Sigmoid;
        c.norm_topk_prob = true;
        c.route_scale = 2.5;
        let r = select(&[0.9, 0.1, 0.6, 0.2], 1, &[0.0; 4], &c);
        assert_eq!(r.experts, vec![vec![0, 2]]);
        let w = &r.weights[0];
        assert!((w[0] - 2.5 * 0.9 / 1.5).abs() < 1e-6 && (w[1] - 2.5 * 0.6 / 1.5).abs() < 1e-6);
        c.norm_topk_prob = false;
        let w = select(&[0.9, 0.1, 0.6, 0.2], 1, &[0.0; 4], &c).weights;
        assert!((w[0][0] - 2.5 * 0.9).abs() < 1e-6);
    }

    #[test]
    fn group_score_is_max_for_v2_and_top2_sum_for_v3() {
        // g0 = {0.30, 0.01}: max 0.30, top-2 sum 0.31; g1 = {0.20, 0.20}: max 0.20, sum 0.40
        let s = [0.30, 0.01, 0.20, 0.20];
        let mut c = cfg(4, 1, 2, 1);
        c.topk_method = TopkMethod::GroupLimitedGreedy;
        assert_eq!(select(&s, 1, &[0.0; 4], &c).experts, vec![vec![0]]);
        c.topk_method = TopkMethod::NoauxTc;
        assert_eq!(select(&s, 1, &[0.0; 4], &c).experts, vec![vec![2]]);
        // greedy ignores the groups
        c.topk_method = TopkMethod::Greedy;
        assert_eq!(select(&s, 1, &[0.0; 4], &c).experts, vec![vec![0]]);
    }

    #[test]
    fn balance_update_moves_load_toward_uniform() {
        use burn::backend::Flex;
        let dev = Default::default();
        let mut c = cfg(4, 1, 1, 1);
        c.bias_update_speed = 0.005;
        let mut router = MoeRouter::<Flex>::new(2, c.clone(), &dev);
        // skewed scores: expert 0 wins for most tokens; a deterministic jitter varies the margins
        let base = [0.40f32, 0.30, 0.20, 0.10];
        let t = 256;
        let scores: Vec<f32> = (0..t)
            .flat_map(|i| {
                base.iter().enumerate().map(move |(j, b)| {
                    // independent pseudo-random jitter per (token, expert)
                    let h = ((i as u32).wrapping_mul(2654435761) ^ (j as u32).wrapping_mul(40503))
                        .wrapping_mul(2246822519);
                    b + 0.25 * (h as f64 / 4294967296.0) as f32
                })
            })
            .collect();
        let first = select(&scores, t, router.bias(), &c).load;
        assert!(first.max_over_mean > 2.0, "skewed to start with: {first:?}");
        let mut best = f64::INFINITY;
        for _ in 0..200 {
            let l = select(&scores, t, router.bias(), &c).load;
            router.update_bias(&l);
            best = best.min(l.max_over_mean);
        }
        let last = select(&scores, t, router.bias(), &c).load;
        assert!(
            last.max_over_mean < first.max_over_mean,
            "{first:?} -> {last:?}"
        );
        assert!(best < 1.2, "load approaches uniform: best max/mean {best}");
        assert_eq!(last.unused_experts, 0, "{last:?}");
    }

    #[test]
    fn load_stats() {
        let l = LoadStats::of(vec![4, 0, 2, 2]);
        assert_eq!(l.max_over_mean, 2.0);
        assert_eq!(l.unused_experts, 1);
    }
}
