//! `dsopt gate`: recomputes the verdicts of stored reports (optionally against a baseline).

use std::path::{Path, PathBuf};

use dsopt::error::{DsoptError, EXIT_PASS};
use dsopt::report::gate;

pub(super) fn gate_cmd(
    paths: &[PathBuf],
    baseline: Option<&Path>,
    opts: gate::GateOptions,
) -> anyhow::Result<i32> {
    let noise = opts.noise;
    if !(0.0..1.0).contains(&noise) {
        return Err(DsoptError::Usage(format!(
            "--noise {noise} must be a fraction in [0, 1), e.g. 0.05 for 5 %"
        ))
        .into());
    }
    let mut reports = Vec::new();
    for p in paths {
        // summaries, comparisons and sweeps list single-run reports (which a glob such as
        // reports/*-SC-*.json also picks up): they are skipped, not refused
        if let Some(kind) = gate::aggregate_kind(p) {
            eprintln!(
                "gate: skipping {} (a {kind} file; the single-run reports it lists are gated)",
                p.display()
            );
            continue;
        }
        reports.push((p.clone(), gate::load(p)?));
    }
    if reports.is_empty() {
        return Err(DsoptError::Usage(
            "no single-run report to gate (only summary/compare/sweep files were given)".into(),
        )
        .into());
    }
    let base = baseline.map(gate::load).transpose()?;
    let outcome = gate::gate(&reports, base.as_ref(), &opts)?;
    for a in &outcome.added {
        eprintln!("gate: {a}");
    }
    for d in &outcome.off_spec_allowed {
        println!("off the spec's operating point (allowed by --allow-off-spec): {d}");
    }
    println!("{}", gate::table(&outcome));
    for n in &outcome.not_checked {
        println!("not checked: {n}");
    }
    for r in &outcome.regressions {
        println!("regression: {r}");
    }
    if outcome.rows.iter().any(|r| r.id == "off-spec" && !r.passed) {
        println!(
            "off-spec: a report measured off the spec's operating point does not gate as the \
             spec's claim; run the scenario at the spec's point, or pass --allow-off-spec to \
             gate its `@` criteria as measured"
        );
    }
    println!(
        "gate: {}",
        if outcome.exit_code == EXIT_PASS {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(outcome.exit_code)
}
