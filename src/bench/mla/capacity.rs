//! SC-001b 的容量探测：每次探测都是一次真实的预填充与解码，在预算下倍增再二分出最长上下文。

use burn::tensor::backend::Backend;

use super::*;

/// Least-squares slope of measured probe peak vs sequence length (bytes per token).
pub(super) fn probe_slope(probes: &[CapacityProbe], variant: &str) -> Option<f64> {
    let pts: Vec<(f64, f64)> = probes
        .iter()
        .filter(|p| p.variant == variant)
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

/// Doubling then bisection on the context length; every probe is a real, measured run.
#[allow(clippy::too_many_arguments)]
pub(super) fn capacity_search<B: Backend>(
    model: &Decoder<B>,
    cfg: &DecoderConfig,
    s: &MlaScenario,
    ctx: &BackendContext<B>,
    variant: &str,
    before_load: Option<u64>,
    workspace: u64,
    budget: u64,
    probes: &mut Vec<CapacityProbe>,
) -> (Option<usize>, bool) {
    let mut probe = |seq: usize| -> bool {
        let p = probe_once(
            model,
            cfg,
            s,
            ctx,
            variant,
            seq,
            before_load,
            workspace,
            budget,
        );
        let fits = p.fits;
        crate::monitor::progress::trace(format!(
            "{variant}: capacity probe {seq} tokens: total {:?} bytes, fits {fits} {}",
            p.total_bytes, p.note
        ));
        probes.push(p);
        fits
    };
    let (min, max) = (s.capacity.min_seq, s.capacity.max_seq);
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
        return (Some(lo), true); // fits at max_seq: a lower bound
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

#[allow(clippy::too_many_arguments)]
fn probe_once<B: Backend>(
    model: &Decoder<B>,
    cfg: &DecoderConfig,
    s: &MlaScenario,
    ctx: &BackendContext<B>,
    variant: &str,
    seq: usize,
    before_load: Option<u64>,
    workspace: u64,
    budget: u64,
) -> CapacityProbe {
    let dev = &ctx.device;
    let batch = s.run.batch;
    let steps = s.capacity.probe_decode_tokens;
    let eb = s.run.dtype.bytes();
    let analytic = cfg.kv_cache_bytes(batch, seq + steps, eb) + (cfg.params() * eb) as u64;
    if analytic > budget.saturating_mul(2) {
        // never provoke a real out-of-memory: clearly too big, by the analytic size alone
        return CapacityProbe {
            variant: variant.into(),
            seq,
            measured_peak_bytes: None,
            total_bytes: None,
            fits: false,
            note: format!(
                "not run: weights + cache alone are {analytic} bytes, over twice the budget"
            ),
        };
    }
    B::sync(dev).ok();
    alloc::reset_peak();
    let mut pool_peak: Option<u64> = None;
    let sample = |pool_peak: &mut Option<u64>| {
        B::sync(dev).ok();
        if let Some(p) = ctx.pool.as_ref().and_then(|p| p()) {
            *pool_peak = Some(pool_peak.unwrap_or(0).max(p.in_use));
        }
    };
    {
        let mut cache = model.new_cache(batch, seq + steps);
        cache.fill_synthetic(seq, 0.01);
        sample(&mut pool_peak);
        let mut next = crate::bench::token_tensor::<B>(batch, 1, cfg.vocab_size, 3, dev);
        for _ in 0..steps {
            let l = model.decode_step(next, &mut cache);
            next = l.argmax(2).reshape([batch, 1]);
            sample(&mut pool_peak);
        }
    }
    let peak = if ctx.pool.is_some() {
        pool_peak
    } else {
        alloc::peak()
    };
    let measured = peak.zip(before_load).map(|(p, b)| p.saturating_sub(b));
    let total = measured.map(|m| m + workspace);
    CapacityProbe {
        variant: variant.into(),
        seq,
        measured_peak_bytes: measured,
        total_bytes: total,
        fits: total.is_some_and(|t| t <= budget),
        note: if total.is_none() {
            "memory not measurable on this backend".into()
        } else {
            String::new()
        },
    }
}
