//! 专家卸载：路由专家的权重常驻主机内存，设备上只缓存最多 `capacity` 个专家（LRU）。
//!
//! 每次前向先在主机上路由，再为每个被选中的专家取设备副本：命中则直接用，未命中则从主机
//! 复制到设备（必要时先淘汰最久未用的专家）。统计命中、未命中、淘汰与复制字节数。
//! 计算与常驻模型完全相同（同一组权重、同一分发代码），测试证明输出一致。
//!
//! 预取（可选，[`ExpertStore::set_prefetch`]）：路由第 l 层时，把下一个 MoE 层的门控也作用在同一输入上
//! （与本层路由同一次读回），按票数猜出下一层会用的专家；本层专家分发（内核已排队）之后就把猜中的
//! 专家复制进来，复制因此与本层计算重叠（异步设备上）。预取只改变哪些专家常驻，不改变计算；
//! 为了不挤掉本层正在用的专家，最多预取 `容量 − 本层用到的专家数` 个。统计预取次数与其中真被用到的次数。

use std::collections::{HashMap, HashSet};

use burn::tensor::{backend::Backend, TensorData};

use crate::nn::ffn::SwiGlu;

/// 一个路由专家在主机上的权重（w1、w2、w3，Burn 的 `[d_in, d_out]` 布局）。
#[derive(Debug, Clone)]
pub struct HostExpert {
    /// `w1`, `w2`, `w3`.
    pub weights: [TensorData; 3],
}

impl HostExpert {
    /// Bytes of the three matrices.
    pub fn bytes(&self) -> u64 {
        self.weights.iter().map(|w| w.bytes.len() as u64).sum()
    }
}

/// 卸载统计。
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OffloadStats {
    /// 命中次数（专家已在设备上）。
    pub hits: u64,
    /// 未命中次数（从主机复制）。
    pub misses: u64,
    /// 淘汰次数。
    pub evictions: u64,
    /// 从主机复制到设备的字节数。
    pub bytes_copied: u64,
    /// 设备上同时缓存的专家数的最大值。
    pub max_resident: usize,
    /// 预取复制进来的专家数（其字节已计入 `bytes_copied`）。
    pub prefetched: u64,
    /// 预取的专家中，被淘汰之前真被用到的个数（每个至多计一次）。
    pub prefetch_used: u64,
}

impl OffloadStats {
    /// Hits over lookups.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }

    /// Prefetched experts that were used before being evicted, over all prefetched.
    pub fn prefetch_accuracy(&self) -> Option<f64> {
        (self.prefetched > 0).then(|| self.prefetch_used as f64 / self.prefetched as f64)
    }
}

/// 主机上的全部路由专家，加设备端 LRU 缓存。键是 (层, 专家)。
#[derive(Debug)]
pub struct ExpertStore<B: Backend> {
    host: Vec<Vec<HostExpert>>,
    cache: HashMap<(usize, usize), (SwiGlu<B>, u64)>,
    capacity: usize,
    tick: u64,
    device: B::Device,
    prefetch: bool,
    /// experts copied in by a prefetch and not used yet
    unused_prefetch: HashSet<(usize, usize)>,
    /// 统计。
    pub stats: OffloadStats,
}

impl<B: Backend> ExpertStore<B> {
    /// A store over `host[layer][expert]` with room for `capacity` experts on `device`.
    pub fn new(host: Vec<Vec<HostExpert>>, capacity: usize, device: &B::Device) -> Self {
        assert!(
            capacity > 0,
            "the device cache needs room for one expert at least"
        );
        ExpertStore {
            host,
            cache: HashMap::new(),
            capacity,
            tick: 0,
            device: device.clone(),
            prefetch: false,
            unused_prefetch: HashSet::new(),
            stats: OffloadStats::default(),
        }
    }

    /// Switches prefetching of the next MoE layer's predicted experts on or off.
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Whether prefetching is on.
    pub fn prefetching(&self) -> bool {
        self.prefetch
    }

    /// Host bytes of every routed expert.
    pub fn host_bytes(&self) -> u64 {
        self.host.iter().flatten().map(HostExpert::bytes).sum()
    }

    /// Bytes of one expert (all experts have one shape).
    pub fn expert_bytes(&self) -> u64 {
        self.host
            .iter()
            .flatten()
            .next()
            .map(HostExpert::bytes)
            .unwrap_or(0)
    }

    /// Experts cached on the device now.
    pub fn resident(&self) -> usize {
        self.cache.len()
    }

    /// The device copy of expert `e` of MoE layer `layer` (copied in on a miss; the least
    /// recently used expert is evicted first when the cache is full).
    pub fn get(&mut self, layer: usize, e: usize) -> SwiGlu<B> {
        self.tick += 1;
        let tick = self.tick;
        if let Some((m, used)) = self.cache.get_mut(&(layer, e)) {
            *used = tick;
            self.stats.hits += 1;
            if self.unused_prefetch.remove(&(layer, e)) {
                self.stats.prefetch_used += 1;
            }
            return m.clone();
        }
        self.stats.misses += 1;
        self.copy_in(layer, e, tick)
    }

    /// Copies expert `e` of `layer` to the device (evicting the least recently used expert
    /// when the cache is full) and marks it used at `tick`.
    fn copy_in(&mut self, layer: usize, e: usize, tick: u64) -> SwiGlu<B> {
        let full = self.cache.len() >= self.capacity;
        let lru = || {
            self.cache
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        };
        if let Some(oldest) = full.then(lru).flatten() {
            self.cache.remove(&oldest);
            self.unused_prefetch.remove(&oldest);
            self.stats.evictions += 1;
        }
        let h = &self.host[layer][e];
        self.stats.bytes_copied += h.bytes();
        let [w1, w2, w3] = h.weights.clone();
        let m = SwiGlu::from_data(w1, w2, w3, &self.device);
        self.cache.insert((layer, e), (m.clone(), tick));
        self.stats.max_resident = self.stats.max_resident.max(self.cache.len());
        m
    }

    /// Copies in the experts of `layer` that `predicted` routes to most often (ties: lower
    /// index first) and that are not resident yet, at most `capacity - keep` of them, so the
    /// `keep` experts the current layer uses are not pushed out. Nothing happens when
    /// prefetching is off.
    pub fn prefetch(&mut self, layer: usize, predicted: &super::Routing, keep: usize) {
        if !self.prefetch || layer >= self.host.len() || self.host[layer].is_empty() {
            return;
        }
        let order = super::layer::by_votes(predicted);
        let room = self.capacity.saturating_sub(keep);
        for e in order.into_iter().take(room) {
            self.tick += 1;
            let tick = self.tick;
            if let Some((_, used)) = self.cache.get_mut(&(layer, e)) {
                *used = tick; // already here: keep it from being the next one evicted
                continue;
            }
            let _ = self.copy_in(layer, e, tick);
            self.unused_prefetch.insert((layer, e));
            self.stats.prefetched += 1;
        }
    }

    /// Empties the device cache and zeroes the statistics (a cold start).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.unused_prefetch.clear();
        self.stats = OffloadStats::default();
    }

    /// Every expert of every layer as device modules (the resident twin of the same weights).
    pub fn all_on_device(&self) -> Vec<Vec<SwiGlu<B>>> {
        self.host
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|h| {
                        let [w1, w2, w3] = h.weights.clone();
                        SwiGlu::from_data(w1, w2, w3, &self.device)
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::AttentionConfig;
    use crate::nn::moe::{LoadStats, MoeConfig, RouterConfig, Routing, ScoreFunc};
    use crate::nn::DecoderConfig;
    use crate::rng::uniform;
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::tensor::{Int, Tensor};

    type B = Flex;

    fn moe() -> MoeConfig {
        MoeConfig {
            dim: 16,
            moe_inter_dim: 8,
            n_shared_experts: 1,
            router: RouterConfig {
                n_routed_experts: 4,
                num_experts_per_tok: 2,
                score_func: ScoreFunc::Softmax,
                topk_method: crate::nn::moe::TopkMethod::Greedy,
                n_group: 1,
                topk_group: 1,
                route_scale: 1.0,
                norm_topk_prob: true,
                bias_update_speed: 0.001,
            },
            shape_buckets: false,
        }
    }

    fn decoder() -> DecoderConfig {
        DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: 32,
            hidden: 16,
            n_layers: 2,
            ffn_hidden: 24,
            attention: AttentionConfig::mha(2, 8),
            moe: Some(moe()),
        }
    }

    #[test]
    fn planted_routing_gives_the_hand_counted_hits_misses_and_evictions() {
        let dev = Default::default();
        B::seed(&dev, 1);
        let (model, host) = decoder().init_offloaded::<B>(&dev);
        assert_eq!(host[0].len(), 4);
        let layer = moe().init::<B>(&dev);
        let mut store = ExpertStore::<B>::new(host, 2, &dev);
        let x = Tensor::<B, 2>::from_data(TensorData::new(uniform(2 * 16, 2), [2, 16]), &dev);
        let plan = |experts: Vec<Vec<usize>>| Routing {
            weights: experts.iter().map(|e| vec![0.5; e.len()]).collect(),
            load: LoadStats::of(vec![0; 4]),
            experts,
        };
        // {0,1}: 2 misses; {0,1}: 2 hits; {1,2}: hit on 1, miss on 2 evicting 0 (least recent)
        for (i, r) in [
            vec![vec![0, 1], vec![1, 0]],
            vec![vec![0, 1], vec![0, 1]],
            vec![vec![1, 2], vec![2, 1]],
        ]
        .into_iter()
        .enumerate()
        {
            let _ = layer.dispatch_with(x.clone(), &plan(r), &mut |e, xe| {
                store.get(0, e).forward(xe)
            });
            assert!(
                store.resident() <= 2,
                "call {i}: the cache never holds more than its capacity"
            );
        }
        let s = &store.stats;
        assert_eq!(
            (s.hits, s.misses, s.evictions, s.max_resident),
            (3, 3, 1, 2)
        );
        assert_eq!(s.bytes_copied, 3 * store.expert_bytes());
        assert_eq!(store.expert_bytes(), 3 * 16 * 8 * 4);
        drop(model);
    }

    #[test]
    fn prefetch_copies_the_most_voted_experts_within_the_room_left() {
        let dev = Default::default();
        B::seed(&dev, 2);
        let (_model, host) = decoder().init_offloaded::<B>(&dev);
        let mut store = ExpertStore::<B>::new(host, 3, &dev);
        let guess = Routing {
            experts: vec![vec![2, 3], vec![3, 1]],
            weights: vec![vec![0.5; 2]; 2],
            load: LoadStats::of(vec![0; 4]),
        };
        // off: nothing moves
        store.prefetch(1, &guess, 1);
        assert_eq!((store.resident(), store.stats.prefetched), (0, 0));
        store.set_prefetch(true);
        let _ = store.get(0, 0); // the current layer's expert (keep = 1)
                                 // votes: 3 twice, then 1 and 2 once (lower index first): room 3 - 1 = 2 -> {3, 1}
        store.prefetch(1, &guess, 1);
        let s = store.stats.clone();
        assert_eq!((s.prefetched, s.misses, store.resident()), (2, 1, 3));
        assert_eq!(s.bytes_copied, 3 * store.expert_bytes());
        assert_eq!(s.evictions, 0, "the current layer's expert stays");
        let _ = store.get(1, 3); // predicted right
        let _ = store.get(1, 3); // a second use counts once
        let _ = store.get(1, 2); // predicted wrong: a miss, evicts the oldest
        let s = &store.stats;
        assert_eq!((s.hits, s.misses, s.prefetch_used), (2, 2, 1));
        assert_eq!(s.prefetch_accuracy(), Some(0.5));
        assert!(store.resident() <= 3 && s.max_resident == 3);
        // already resident experts are not copied again
        let before = store.stats.bytes_copied;
        store.prefetch(1, &guess, 0);
        assert!(store.stats.bytes_copied - before <= store.expert_bytes());
        assert!(store.resident() <= 3);
    }

    #[test]
    fn offloaded_model_equals_its_resident_twin() {
        for prefetch in [false, true] {
            offloaded_equals_resident(prefetch);
        }
    }

    fn offloaded_equals_resident(prefetch: bool) {
        let dev = Default::default();
        B::seed(&dev, 4);
        let c = decoder();
        let (model, host) = c.init_offloaded::<B>(&dev);
        // with prefetching, room for layer 1's guesses next to the 4 experts layer 0 uses
        let cap = if prefetch { 6 } else { 3 };
        let mut store = ExpertStore::<B>::new(host, cap, &dev);
        store.set_prefetch(prefetch);
        let ids: Vec<i64> = (0..2 * 6).map(|i| (i * 5 + 1) % 32).collect();
        let toks = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 6]), &dev);
        // materialise the lazy parameters first: a clone of an uninitialised Burn parameter
        // draws its own weights
        let _ =
            model.forward_hidden_offloaded(toks.clone(), &mut model.new_cache(2, 8), &mut store);
        let mut resident = model.clone();
        resident.set_routed_experts(store.all_on_device());
        assert_eq!(
            resident.num_params(),
            c.params(),
            "the resident twin has every expert"
        );
        store.reset();
        let mut c1 = resident.new_cache(2, 8);
        let mut c2 = model.new_cache(2, 8);
        let want = resident.forward_hidden(toks.clone(), &mut c1);
        let got = model.forward_hidden_offloaded(toks, &mut c2, &mut store);
        let d: f32 = (want - got).abs().max().into_scalar();
        assert!(d <= 1e-6, "prefetch {prefetch}: max |diff| {d}");
        assert!(store.stats.max_resident <= cap);
        if prefetch {
            // layer 0 predicts layer 1: something was copied ahead, and every lookup of
            // layer 1 is a hit or a miss as before
            assert!(store.stats.prefetched > 0);
            assert!(store.stats.prefetch_used <= store.stats.prefetched);
        } else {
            assert!(
                store.stats.misses >= 4,
                "2 layers x at least 2 distinct experts"
            );
            assert_eq!(store.stats.prefetched, 0);
        }
        assert_eq!(store.host_bytes(), 2 * 4 * store.expert_bytes());
    }
}
