//! SC-001b 的容量探测：每次探测都是真实分配并运行的缓存与解码步，在预算下倍增再二分出最长
//! 上下文。设备内存池后端按池**保留**的字节（保守的数）判定是否放得下，并用一次真实的分块
//! 预填充确认找到的容量（放不下则按 1/32 递减重试）；主机分配器逐字节计数，按实测峰值判定。

use burn::tensor::backend::Backend;

use super::*;

/// Least-squares slope of measured probe peak vs sequence length (bytes per token), over the
/// synthetic-cache probes (a confirming real prefill is another workload).
pub(super) fn probe_slope(probes: &[CapacityProbe], variant: &str) -> Option<f64> {
    let pts: Vec<(f64, f64)> = probes
        .iter()
        .filter(|p| p.variant == variant && !p.real_prefill)
        .filter_map(|p| Some((p.seq as f64, p.measured_peak_bytes? as f64)))
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// What every capacity probe of one variant shares: the model, its scenario and backend, the
/// memory level before the model was loaded (probes count the bytes above it) and the budget.
pub(super) struct Prober<'a, B: Backend> {
    pub(super) model: &'a Decoder<B>,
    pub(super) cfg: &'a DecoderConfig,
    pub(super) s: &'a MlaScenario,
    pub(super) ctx: &'a BackendContext<B>,
    pub(super) variant: &'a str,
    pub(super) before_load: Option<u64>,
    pub(super) budget: u64,
}

/// How far the capacity search of the spec's optimised variant goes when it still fits at
/// `capacity.max_seq`: a ratio still bounded there is only a lower bound.
pub(crate) const CAPACITY_CEILING: usize = 1 << 20;

/// The longest length the search of `variant` probes: `capacity.max_seq`, and for absorbed MLA
/// (SC-001b's optimised variant) beyond it up to [`CAPACITY_CEILING`] — except in a smoke
/// scenario, whose `max_seq` keeps its probes small.
pub(crate) fn search_ceiling(s: &crate::config::MlaScenario, variant: &str) -> usize {
    let max = s.capacity.max_seq;
    if variant == crate::config::MlaVariant::MlaAbsorbed.as_str() && !s.smoke {
        max.max(CAPACITY_CEILING)
    } else {
        max
    }
}

impl<B: Backend> Prober<'_, B> {
    /// Doubling then bisection on the context length; every probe is a real, measured run
    /// (a synthetic cache plus decode steps, `workspace` = the measured prefill workspace
    /// added). Returns the longest length that fit and whether it still fit at the search's
    /// ceiling ([`search_ceiling`]).
    pub(super) fn search(
        &self,
        workspace: u64,
        probes: &mut Vec<CapacityProbe>,
    ) -> (Option<usize>, bool) {
        let variant = self.variant;
        let mut probe = |seq: usize| -> bool {
            let p = self.probe_once(seq, workspace);
            let fits = p.fits;
            crate::monitor::progress::trace(format!(
                "{variant}: capacity probe {seq} tokens: total {:?} bytes, fits {fits} {}",
                p.total_bytes, p.note
            ));
            probes.push(p);
            fits
        };
        let (min, max) = (self.s.capacity.min_seq, search_ceiling(self.s, variant));
        if !probe(min) {
            return (None, false);
        }
        let mut lo = min;
        let mut hi = None;
        while hi.is_none() && lo < max {
            let next = (lo * 2).min(max);
            if probe(next) {
                lo = next;
            } else {
                hi = Some(next);
            }
        }
        let Some(mut hi) = hi else {
            return (Some(lo), true); // fits at the ceiling: a lower bound
        };
        // bisection to about 1/32 of the value
        while hi - lo > (lo / 32).max(1) {
            let mid = lo + (hi - lo) / 2;
            if probe(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (Some(lo), false)
    }

    /// One probe: a cache of `seq` tokens per sequence filled with synthetic values (memory does
    /// not depend on them), then the probe's decode steps; `workspace` is added to its figure.
    fn probe_once(&self, seq: usize, workspace: u64) -> CapacityProbe {
        let (s, cfg, dev) = (self.s, self.cfg, &self.ctx.device);
        let batch = s.run.batch;
        let steps = s.capacity.probe_decode_tokens;
        let eb = s.run.dtype.bytes();
        let analytic = cfg.kv_cache_bytes(batch, seq + steps, eb) + (cfg.params() * eb) as u64;
        if analytic > self.budget.saturating_mul(2) {
            // never provoke a real out-of-memory: clearly too big, by the analytic size alone
            return CapacityProbe {
                variant: self.variant.into(),
                seq,
                measured_peak_bytes: None,
                reserved_peak_bytes: None,
                total_bytes: None,
                fits: false,
                real_prefill: false,
                note: format!(
                    "not run: weights + cache alone are {analytic} bytes, over twice the budget"
                ),
            };
        }
        clean_start(self.ctx);
        let mut pool = PoolPeak::default();
        {
            let mut cache = self.model.new_cache(batch, seq + steps);
            cache.fill_synthetic(seq, 0.01);
            pool.sample(self.ctx);
            let mut next = crate::bench::token_tensor::<B>(batch, 1, cfg.vocab_size, 3, dev);
            for _ in 0..steps {
                let l = self.model.decode_step(next, &mut cache);
                next = l.argmax(2).reshape([batch, 1]);
                pool.sample(self.ctx);
            }
        }
        self.result(seq, pool, workspace, false)
    }

    /// A probe's record from its peaks: bytes above the pre-load level, plus `extra` (the
    /// measured prefill workspace for a synthetic-cache probe, 0 for a real prefill).
    fn result(&self, seq: usize, pool: PoolPeak, extra: u64, real_prefill: bool) -> CapacityProbe {
        let pooled = self.ctx.pool.is_some();
        let in_use = if pooled { pool.in_use } else { alloc::peak() };
        let above = |x: Option<u64>| x.zip(self.before_load).map(|(p, b)| p.saturating_sub(b));
        let (measured, reserved) = (above(in_use), above(pool.reserved));
        let (total, source) = budget_figure(pooled, measured, reserved, extra);
        CapacityProbe {
            variant: self.variant.into(),
            seq,
            measured_peak_bytes: measured,
            reserved_peak_bytes: reserved,
            total_bytes: total,
            fits: total.is_some_and(|t| t <= self.budget),
            real_prefill,
            note: if total.is_none() {
                "memory not measurable on this backend".into()
            } else if real_prefill {
                format!("real chunked prefill at the found capacity; decided on {source}")
            } else {
                format!("decided on {source}")
            },
        }
    }

    /// On a pool backend, confirms a capacity found with synthetic caches by one real chunked
    /// prefill (of `found` tokens per sequence, then the probe's decode steps), deciding on the
    /// pool's reserved bytes sampled after every chunk and step; when it does not fit, steps
    /// down by 1/32 and tries again (each try a listed probe). Returns the confirmed capacity,
    /// or None when [`CONFIRM_TRIES`] real prefills did not fit. Not run on the host allocator,
    /// whose count is exact (every byte, not sampled at sync points) and where the prefill
    /// workspace is measured.
    pub(super) fn confirm(&self, found: usize, probes: &mut Vec<CapacityProbe>) -> Option<usize> {
        let (s, dev) = (self.s, &self.ctx.device);
        let batch = s.run.batch;
        let steps = s.capacity.probe_decode_tokens;
        let mut seq = found;
        for _ in 0..CONFIRM_TRIES {
            clean_start(self.ctx);
            let mut pool = PoolPeak::default();
            {
                let mut cache = self.model.new_cache(batch, seq + steps);
                let vocab = self.cfg.vocab_size;
                let prompt = crate::bench::token_tensor::<B>(batch, seq, vocab, 5, dev);
                let chunk = s.attention.prefill_chunk;
                let logits = self
                    .model
                    .prefill(prompt, &mut cache, chunk, |_| pool.sample(self.ctx));
                let mut next = logits.argmax(2).reshape([batch, 1]);
                for _ in 0..steps {
                    let l = self.model.decode_step(next, &mut cache);
                    next = l.argmax(2).reshape([batch, 1]);
                    pool.sample(self.ctx);
                }
            }
            let p = self.result(seq, pool, 0, true);
            crate::monitor::progress::trace(format!(
                "{}: capacity confirmed by a real prefill of {seq} tokens: total {:?} bytes, fits {}",
                self.variant, p.total_bytes, p.fits
            ));
            let fits = p.fits;
            probes.push(p);
            if fits {
                return Some(seq);
            }
            let next = seq.saturating_sub((seq / 32).max(1));
            if next < s.capacity.min_seq || next == 0 {
                break;
            }
            seq = next;
        }
        None
    }
}

/// Tries before a capacity that no real prefill confirms is given up.
const CONFIRM_TRIES: usize = 4;

/// The highest pool readings seen at the sync points of one probe.
#[derive(Default)]
struct PoolPeak {
    in_use: Option<u64>,
    reserved: Option<u64>,
}

impl PoolPeak {
    /// Waits for the device and takes one reading of the pool (nothing without a pool).
    fn sample<B: Backend>(&mut self, ctx: &BackendContext<B>) {
        B::sync(&ctx.device).ok();
        if let Some(p) = ctx.pool.as_ref().and_then(|p| p()) {
            self.in_use = Some(self.in_use.unwrap_or(0).max(p.in_use));
            self.reserved = Some(self.reserved.unwrap_or(0).max(p.reserved));
        }
    }
}

/// Starts a probe from a clean slate: the device idle, the pool's free pages given back (so
/// its reserved bytes are this probe's, not the previous one's), the host peak reset.
fn clean_start<B: Backend>(ctx: &BackendContext<B>) {
    B::sync(&ctx.device).ok();
    B::memory_cleanup(&ctx.device);
    alloc::reset_peak();
}

/// The figure a probe compares with the budget and the note saying which it is: on a pool
/// backend the pool's reserved bytes (what the allocator really holds; in-use bytes when the
/// pool does not report reserved), on the host the counting allocator's exact peak.
fn budget_figure(
    pooled: bool,
    in_use: Option<u64>,
    reserved: Option<u64>,
    extra: u64,
) -> (Option<u64>, String) {
    match (pooled, reserved) {
        (true, Some(r)) => (Some(r + extra), "pool reserved bytes".into()),
        (true, None) => (
            in_use.map(|m| m + extra),
            "pool in-use bytes (reserved not reported)".into(),
        ),
        (false, _) => (in_use.map(|m| m + extra), "host allocator".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::budget_figure;

    #[test]
    fn a_pool_backend_decides_on_reserved_bytes_the_host_on_its_exact_count() {
        // pool: reserved (with the workspace added), whatever the in-use figure says
        let (t, src) = budget_figure(true, Some(100), Some(8 << 20), 5);
        assert_eq!(t, Some((8 << 20) + 5));
        assert!(src.contains("reserved"), "{src}");
        // pool without a reserved figure: in use, and the note says so
        let (t, src) = budget_figure(true, Some(100), None, 5);
        assert_eq!(t, Some(105));
        assert!(src.contains("not reported"), "{src}");
        // host allocator: its count, never a reserved figure
        let (t, src) = budget_figure(false, Some(100), Some(1 << 30), 5);
        assert_eq!(t, Some(105));
        assert_eq!(src, "host allocator");
        // nothing measured: nothing to compare
        assert_eq!(budget_figure(false, None, None, 5).0, None);
    }
}
