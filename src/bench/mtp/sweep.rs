//! SC-002 的 D × 批大小扫描：每个点上贪心与投机解码交替计时（中位数），输出类型化的扫描点。

use super::*;

/// Timed runs per point of the D x batch sweep.
const SWEEP_REPS: usize = 3;

/// The D x batch sweep, greedy and speculative interleaved at every point (medians of
/// [`SWEEP_REPS`] runs), reported as typed points (`points`, read by the charts), as variants
/// `sweep_d{D}_b{B}` with every figure, and as a table in the notes for people.
#[allow(clippy::too_many_arguments)]
pub(super) fn sweep<B: Backend>(
    s: &MtpScenario,
    main: &crate::nn::Decoder<B>,
    full: &MtpModel<B>,
    heldout: &[u8],
    sw: &crate::config::scenario::MtpSweep,
    dev: &B::Device,
    variants: &mut Vec<VariantReport>,
    notes: &mut Vec<String>,
    points: &mut Vec<crate::report::MtpSweepPoint>,
) {
    let n = s.run.new_tokens;
    let reps = SWEEP_REPS;
    let mut rows = vec![format!(
        "sweep (per point: greedy and speculative alternated, {reps} timed runs each after one \
         warm-up of both at the same shape; medians): D, batch, greedy tok/s, speculative tok/s, \
         speedup, mean tokens/step, identical"
    )];
    let timed = |f: &mut dyn FnMut()| {
        B::sync(dev).ok();
        let t = Instant::now();
        f();
        B::sync(dev).ok();
        t.elapsed().as_secs_f64()
    };
    let median = |xs: Vec<f64>| crate::monitor::stats::median(&xs).unwrap_or(f64::NAN);
    for &b in &sw.batches {
        let prompts = train::heldout_prompts(heldout, b, s.run.prompt_len);
        let g = decode::greedy(main, &prompts, n, PREFILL_CHUNK);
        for &d in &sw.depths {
            let mtp = full.mtp.clone().truncated(d);
            let drafter = Drafter::Mtp(&mtp);
            let _ = decode::speculative(main, &drafter, &prompts, n.min(8), PREFILL_CHUNK);
            let (mut tgs, mut tss) = (Vec::new(), Vec::new());
            let mut last = None;
            for _ in 0..reps {
                tgs.push(timed(&mut || {
                    let _ = decode::greedy(main, &prompts, n, PREFILL_CHUNK);
                }));
                tss.push(timed(&mut || {
                    last = Some(decode::speculative(
                        main,
                        &drafter,
                        &prompts,
                        n,
                        PREFILL_CHUNK,
                    ));
                }));
            }
            let (o, st) = last.expect("at least one repetition");
            let (tg, ts) = (median(tgs), median(tss));
            let same = o == g;
            let mut v = VariantReport {
                name: format!("sweep_d{d}_b{b}"),
                status: crate::report::VariantStatus::Ok,
                error: None,
                timings: None,
                memory: Default::default(),
                metrics: Default::default(),
                equivalence: Equivalence {
                    checked: true,
                    reference: Some("greedy at the same batch".into()),
                    max_abs_diff: None,
                    tolerance: Some(0.0),
                    passed: Some(same),
                },
                warnings: Vec::new(),
            };
            let gt = (b * n) as f64 / tg;
            let stp = (b * n) as f64 / ts;
            v.metrics.insert("greedy_tokens_per_s".into(), Some(gt));
            v.metrics
                .insert("speculative_tokens_per_s".into(), Some(stp));
            v.metrics.insert("speedup".into(), Some(stp / gt));
            v.metrics
                .insert("mean_accepted_length".into(), st.mean_accepted_length());
            if !same {
                v.fail("speculative output differs from greedy");
            }
            points.push(crate::report::MtpSweepPoint {
                depth: d,
                batch: b,
                greedy_tokens_per_s: Some(gt),
                speculative_tokens_per_s: Some(stp),
                tokens_per_step: st.mean_accepted_length(),
                identical: same,
            });
            rows.push(format!(
                "D={d} batch={b}: {gt:.1} / {stp:.1} tok/s, {:.2}x, {} tokens/step, {}",
                stp / gt,
                crate::bench::fmt_opt(st.mean_accepted_length(), 2),
                if same { "identical" } else { "DIFFERENT" }
            ));
            variants.push(v);
        }
    }
    notes.push(rows.join("\n"));
}
