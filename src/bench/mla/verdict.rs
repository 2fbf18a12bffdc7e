//! SC-001 的判定：吸收 MLA 与朴素 MLA 的等价性（同一权重），以及由测量值计算的各项标准。

use super::VariantRun;
use crate::config::{Dtype, MlaScenario, MlaVariant};
use crate::report::{CapacityProbe, Comparison, Criterion, Equivalence};

/// What SC-001's criteria are computed from: typed figures taken from the measured runs, so
/// the arithmetic ([`sc001_criteria`]) is a pure function with its own tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Sc001Figures {
    /// Runtime peak (measured peak minus the weights-loaded baseline) of MHA, absorbed MLA.
    pub runtime_peak: [Option<u64>; 2],
    /// Total peak (weights included) of MHA, absorbed MLA.
    pub total_peak: [Option<u64>; 2],
    /// Capacity under the budget (tokens) of MHA, absorbed MLA.
    pub capacity: [Option<usize>; 2],
    /// Decode tokens/s of MHA, absorbed MLA.
    pub decode_tps: [Option<f64>; 2],
    /// Absorbed MLA still fit where its capacity search stops: its capacity is a lower bound.
    pub mla_capped: bool,
    /// max |absorbed − naive| of the last prefill logits, and its tolerance.
    pub eq_diff: Option<f64>,
    /// The tolerance of `eq_diff`.
    pub eq_tolerance: f64,
    /// The fraction of identical greedy tokens, absorbed vs naive.
    pub same_fraction: Option<f64>,
}

impl Sc001Figures {
    /// 1 − runtime peak(absorbed) / runtime peak(mha).
    pub fn runtime_reduction(&self) -> Option<f64> {
        reduction(self.runtime_peak)
    }
    /// 1 − total peak(absorbed) / total peak(mha).
    pub fn total_reduction(&self) -> Option<f64> {
        reduction(self.total_peak)
    }
    /// capacity(absorbed) / capacity(mha).
    pub fn capacity_ratio(&self) -> Option<f64> {
        let [h, l] = self.capacity;
        Some(l? as f64 / h? as f64).filter(|r| r.is_finite())
    }
    /// decode tokens/s, absorbed over mha.
    pub fn decode_ratio(&self) -> Option<f64> {
        let [h, l] = self.decode_tps;
        Some(l? / h?).filter(|r| r.is_finite())
    }
}

/// 1 − b/a for `[a (mha), b (absorbed)]`; `None` unless both are measured and a > 0.
fn reduction([mha, mla]: [Option<u64>; 2]) -> Option<f64> {
    let (a, b) = (mha? as f64, mla? as f64);
    (a > 0.0).then(|| 1.0 - b / a)
}

/// Checks absorbed against naive MLA on the same weights (a failed check fails the absorbed
/// variant) and returns (max |Δ| of the last prefill logits, its tolerance, the fraction of
/// identical greedy tokens).
fn check_equivalence(s: &MlaScenario, runs: &mut [VariantRun]) -> (Option<f64>, f64, Option<f64>) {
    // equivalence: absorbed vs naive on the same weights (last-token logits and decoded tokens);
    // validation guarantees both ran or were attempted. A criterion of its own (SC-001-eq), so
    // the gate recomputes it; a failed check also fails the absorbed variant.
    let naive = runs.iter().position(|r| r.variant == MlaVariant::MlaNaive);
    let absorbed = runs
        .iter()
        .position(|r| r.variant == MlaVariant::MlaAbsorbed);
    let half = s.run.dtype != Dtype::F32;
    let mut eq_diff = None;
    let mut eq_tol = 1e-3;
    let mut same_fraction = None;
    if let (Some(n), Some(a)) = (naive, absorbed) {
        let eq = match (&runs[n].prefill_logits, &runs[a].prefill_logits) {
            (Some(x), Some(y)) => {
                let tol = crate::bench::equivalence_tolerance(s.run.dtype, 1e-3, x);
                let d = crate::report::max_abs_diff(x, y);
                let same = match (&runs[n].decoded, &runs[a].decoded) {
                    (Some(p), Some(q)) if p.len() == q.len() && !p.is_empty() => Some(
                        p.iter().zip(q).filter(|(u, v)| u == v).count() as f64 / p.len() as f64,
                    ),
                    _ => None,
                };
                (eq_diff, eq_tol, same_fraction) = (Some(d), tol, same);
                Equivalence {
                    checked: true,
                    reference: Some(
                        "mla_naive (same weights): last prefill logits and greedy tokens".into(),
                    ),
                    max_abs_diff: Some(d),
                    tolerance: Some(tol),
                    passed: Some(d <= tol && same.is_some_and(|f| f >= token_floor(half))),
                }
            }
            _ => Equivalence {
                checked: false,
                ..Default::default()
            },
        };
        if eq.passed != Some(true) {
            runs[a].report.fail(if eq.checked {
                "output differs from mla_naive on the same weights"
            } else {
                "not checked against mla_naive (a variant failed): its figures cannot count"
            });
        }
        runs[a].report.equivalence = eq;
    }
    (eq_diff, eq_tol, same_fraction)
}

/// Checks absorbed against naive MLA (a failed check fails the absorbed variant), puts the
/// comparison figures into the absorbed variant's metrics, adds the notes, and returns the
/// SC-001 criteria computed from the measured runs.
pub(super) fn criteria(
    s: &MlaScenario,
    runs: &mut [VariantRun],
    probes: &[CapacityProbe],
    source: &str,
    notes: &mut Vec<String>,
) -> Vec<Criterion> {
    let (eq_diff, eq_tolerance, same_fraction) = check_equivalence(s, runs);
    let f = figures(runs, eq_diff, eq_tolerance, same_fraction);
    for r in runs
        .iter_mut()
        .filter(|r| r.variant == MlaVariant::MlaAbsorbed)
    {
        for (k, v) in [
            ("runtime_peak_reduction_vs_mha", f.runtime_reduction()),
            ("total_peak_reduction_vs_mha", f.total_reduction()),
            ("decode_speedup_vs_mha", f.decode_ratio()),
            ("capacity_ratio_vs_mha", f.capacity_ratio()),
        ] {
            r.report.metrics.insert(k.into(), v);
        }
    }
    let mla_workspace = runs
        .iter()
        .find(|r| r.variant == MlaVariant::MlaAbsorbed && r.report.error.is_none())
        .and_then(|r| r.workspace);
    run_notes(s, &f, mla_workspace, probes, notes);
    sc001_criteria(s, &f, source, probes.iter().any(|p| p.real_prefill))
}

/// The typed figures of the runs that did not fail.
fn figures(
    runs: &[VariantRun],
    eq_diff: Option<f64>,
    eq_tolerance: f64,
    same_fraction: Option<f64>,
) -> Sc001Figures {
    let get = |variant: MlaVariant| {
        runs.iter()
            .find(|r| r.variant == variant && r.report.error.is_none())
    };
    let both = [get(MlaVariant::Mha), get(MlaVariant::MlaAbsorbed)];
    let tps = |r: &VariantRun| {
        r.report
            .metrics
            .get("decode_tokens_per_s")
            .copied()
            .flatten()
    };
    Sc001Figures {
        runtime_peak: both.map(|r| r.and_then(|r| r.runtime_peak)),
        total_peak: both.map(|r| r.and_then(|r| r.total_peak)),
        capacity: both.map(|r| r.and_then(|r| r.capacity)),
        decode_tps: both.map(|r| r.and_then(tps)),
        mla_capped: both[1].is_some_and(|r| r.capped),
        eq_diff,
        eq_tolerance,
        same_fraction,
    }
}

/// The run-level notes of SC-001: total-peak reduction, decode ratio, the lower bound, the
/// workspace, pool granularity, and the capacity probes.
fn run_notes(
    s: &MlaScenario,
    f: &Sc001Figures,
    mla_workspace: Option<u64>,
    probes: &[CapacityProbe],
    notes: &mut Vec<String>,
) {
    let seq = s.run.seq;
    notes.push(format!(
        "total-peak reduction (weights included), MLA absorbed vs MHA: {} — a separate figure from SC-001a, which excludes the weights",
        f.total_reduction().map(|x| format!("{:.1} %", x * 100.0)).unwrap_or("not measured".into())
    ));
    notes.push(format!(
        "decode at {seq} context, MLA absorbed / MHA tokens/s: {}",
        f.decode_ratio()
            .map(|x| format!("{x:.2}x"))
            .unwrap_or("not measured".into())
    ));
    let ceiling = super::capacity::search_ceiling(s, MlaVariant::MlaAbsorbed.as_str());
    if f.mla_capped {
        notes.push(format!(
            "MLA absorbed still fit at {ceiling} tokens, where its search stops: its capacity \
             (and the ratio) is a lower bound"
        ));
    }
    if let Some(w) = mla_workspace {
        notes.push(format!(
            "MLA absorbed measured prefill workspace: {} bytes",
            w
        ));
    }
    let fitting = |v: &str| probes.iter().filter(|p| p.variant == v && p.fits).count();
    // on a pool backend a budget below one pool page fits nothing at all: say so, with the fix
    // (the bytes in use would have fit, the pages reserved for them do not)
    let budget = (s.capacity.memory_budget_gib * 1073741824.0) as u64;
    for v in &s.attention.variants {
        let first = probes.iter().find(|p| p.variant == v.as_str());
        let granular =
            first.filter(|p| !p.fits && p.measured_peak_bytes.is_some_and(|m| m <= budget));
        if let Some((r, m)) =
            granular.and_then(|p| p.reserved_peak_bytes.zip(p.measured_peak_bytes))
        {
            notes.push(format!(
                "{}: even {} tokens reserve {:.1} MiB of device-pool pages ({:.2} MiB in use), \
                 over the {:.2} MiB budget: the budget is below this backend's allocation \
                 granularity (fix: a larger capacity.memory_budget_gib; \
                 scenarios/gpu/sc001-mla-pool-smoke.toml is the smoke for pool backends)",
                v.as_str(),
                s.capacity.min_seq,
                r as f64 / 1048576.0,
                m as f64 / 1048576.0,
                budget as f64 / 1048576.0
            ));
        }
    }
    let confirms = probes.iter().filter(|p| p.real_prefill).count();
    if confirms > 0 {
        notes.push(format!(
            "capacity on the device pool: every probe decided on the pool's reserved bytes; each \
             length found was then run as one real chunked prefill ({confirms} such probe(s), \
             `real_prefill: true` in series.capacity_probes)"
        ));
    }
    notes.push(format!(
        "capacity probes (budget {} GiB): {} in all, listed in series.capacity_probes \
         (fitting: {})",
        s.capacity.memory_budget_gib,
        probes.len(),
        s.attention
            .variants
            .iter()
            .map(|v| format!("{v} {}", fitting(v.as_str())))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

/// SC-001's four criteria from the typed figures (a pure function: no I/O, no measurement).
pub(super) fn sc001_criteria(
    s: &MlaScenario,
    f: &Sc001Figures,
    source: &str,
    real_prefill: bool,
) -> Vec<Criterion> {
    let (batch, seq) = (s.run.batch, s.run.seq);
    let half = s.run.dtype != Dtype::F32;
    let ceiling = super::capacity::search_ceiling(s, MlaVariant::MlaAbsorbed.as_str());
    vec![
        Criterion::evaluate(
            "SC-001a",
            "runtime_peak_reduction_mla_absorbed_vs_mha",
            Comparison::AtLeast,
            s.thresholds.runtime_peak_reduction,
            f.runtime_reduction(),
            format!(
                "runtime peak = measured peak minus the weights-loaded baseline ({source}); seq {seq}, batch {batch}; \
                 baseline MHA with {} KV heads",
                s.model.n_heads
            ),
        ),
        Criterion::evaluate(
            "SC-001b",
            "capacity_ratio_mla_absorbed_vs_mha",
            Comparison::AtLeast,
            s.thresholds.capacity_ratio,
            f.capacity_ratio(),
            format!(
                "longest context under {:.2} GiB by measured probes (doubling, then bisection), {} decode steps each, \
                 plus the measured prefill workspace; {}{}",
                s.capacity.memory_budget_gib,
                s.capacity.probe_decode_tokens,
                if real_prefill {
                    "decided on the device pool's reserved bytes (the conservative figure), the \
                     length found confirmed by one real chunked prefill (stepping down by 1/32 \
                     until one fits)"
                } else {
                    "decided on the measured peak"
                },
                if f.mla_capped {
                    format!("; MLA absorbed still fit at {ceiling} tokens (a lower bound)")
                } else {
                    String::new()
                }
            ),
        )
        .with_lower_bound(f.mla_capped),
        Criterion::evaluate(
            "SC-001-eq",
            "max_abs_diff_mla_absorbed_vs_naive",
            Comparison::AtMost,
            f.eq_tolerance,
            f.eq_diff,
            format!(
                "last-position prefill logits of mla_absorbed vs mla_naive on the same weights \
                 ({}; NaN fails)",
                if half {
                    "half precision: 16 machine epsilons x the largest |logit|"
                } else {
                    "f32"
                }
            ),
        ),
        Criterion::evaluate(
            "SC-001-eq-tokens",
            "identical_greedy_token_fraction_mla_absorbed_vs_naive",
            Comparison::AtLeast,
            token_floor(half),
            f.same_fraction,
            format!(
                "greedy choices at every timed decode step, mla_absorbed (teacher-forced on \
                 mla_naive's tokens, so one flip does not cascade) vs mla_naive ({})",
                if half {
                    "half precision: a near-tie may round either way, at least 90 % must agree"
                } else {
                    "f32: every token must agree"
                }
            ),
        ),
    ]
}

/// The identical-greedy-token fraction absorbed MLA must reach against naive MLA: all of them in
/// f32, 90 % in half precision (a near-tie may round either way).
fn token_floor(half: bool) -> f64 {
    if half {
        0.9
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scenario;
    use crate::report::Outcome;

    fn scenario() -> MlaScenario {
        match Scenario::builtin(crate::config::ScenarioKind::Mla) {
            Scenario::Mla(s) => s,
            _ => unreachable!(),
        }
    }

    fn figures() -> Sc001Figures {
        Sc001Figures {
            runtime_peak: [Some(1000), Some(550)],
            total_peak: [Some(2000), Some(1500)],
            capacity: [Some(50_000), Some(125_000)],
            decode_tps: [Some(100.0), Some(150.0)],
            mla_capped: false,
            eq_diff: Some(2e-7),
            eq_tolerance: 1e-3,
            same_fraction: Some(1.0),
        }
    }

    fn by_id<'a>(c: &'a [Criterion], id: &str) -> &'a Criterion {
        c.iter().find(|c| c.id == id).unwrap()
    }

    #[test]
    fn sc001_arithmetic_on_fixed_figures() {
        let s = scenario();
        let f = figures();
        let c = sc001_criteria(&s, &f, "host allocator", false);
        // SC-001a = 1 - runtime peak(absorbed) / runtime peak(mha) = 1 - 550/1000
        let a = by_id(&c, "SC-001a");
        assert!((a.measured.unwrap() - 0.45).abs() < 1e-12 && a.passed);
        // SC-001b = capacity(absorbed) / capacity(mha) = 125000 / 50000
        let b = by_id(&c, "SC-001b");
        assert!((b.measured.unwrap() - 2.5).abs() < 1e-12 && b.passed && !b.lower_bound);
        assert!((f.total_reduction().unwrap() - 0.25).abs() < 1e-12);
        assert!((f.decode_ratio().unwrap() - 1.5).abs() < 1e-12);
        assert!(by_id(&c, "SC-001-eq").passed && by_id(&c, "SC-001-eq-tokens").passed);
        // the scenario's thresholds are used: 0.45 fails a 0.5 threshold
        let mut strict = s.clone();
        strict.thresholds.runtime_peak_reduction = 0.5;
        assert!(!by_id(&sc001_criteria(&strict, &f, "", false), "SC-001a").passed);
    }

    #[test]
    fn unmeasured_figures_give_unmeasured_criteria() {
        let s = scenario();
        let f = Sc001Figures {
            runtime_peak: [None, Some(550)],
            capacity: [Some(50_000), None],
            eq_diff: None,
            same_fraction: None,
            ..figures()
        };
        let c = sc001_criteria(&s, &f, "", false);
        assert!(c.iter().all(|c| c.measured.is_none() && !c.passed), "{c:?}");
        // a zero MHA peak is no ratio at all, not an infinite reduction
        let f = Sc001Figures {
            runtime_peak: [Some(0), Some(10)],
            capacity: [Some(0), Some(10)],
            ..figures()
        };
        assert_eq!(f.runtime_reduction(), None);
        assert_eq!(f.capacity_ratio(), None);
    }

    #[test]
    fn a_capped_capacity_is_a_lower_bound() {
        let s = scenario();
        let capped = |mla: usize| Sc001Figures {
            capacity: [Some(100_000), Some(mla)],
            mla_capped: true,
            ..figures()
        };
        // 1.14 at the ceiling: inconclusive, not a failure
        let c = sc001_criteria(&s, &capped(114_000), "", false);
        let b = by_id(&c, "SC-001b");
        assert!(b.lower_bound && !b.passed);
        assert_eq!(b.outcome(), Outcome::Inconclusive);
        assert!(b.note.contains("lower bound"), "{}", b.note);
        // a lower bound that clears the threshold passes
        let c = sc001_criteria(&s, &capped(300_000), "", false);
        assert_eq!(by_id(&c, "SC-001b").outcome(), Outcome::Pass);
    }

    #[test]
    fn half_precision_accepts_near_ties_in_tokens() {
        let mut s = scenario();
        s.run.dtype = Dtype::Bf16;
        let f = Sc001Figures {
            same_fraction: Some(0.95),
            ..figures()
        };
        assert!(by_id(&sc001_criteria(&s, &f, "", false), "SC-001-eq-tokens").passed);
        s.run.dtype = Dtype::F32;
        assert!(!by_id(&sc001_criteria(&s, &f, "", false), "SC-001-eq-tokens").passed);
    }
}
