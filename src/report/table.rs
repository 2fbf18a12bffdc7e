//! The terminal verdict table (comfy-table), printed to stderr or stdout by the caller.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Color, Table};

use super::schema::*;
use super::write::{bytes_h, num_h, secs_h};

fn verdict_cell(passed: bool) -> Cell {
    if passed {
        Cell::new("PASS").fg(Color::Green)
    } else {
        Cell::new("FAIL").fg(Color::Red)
    }
}

/// Variants: time and memory per source.
pub fn variants_table(r: &Report) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "variant",
        "status",
        "median",
        "cv",
        "host peak",
        "device peak",
        "nvml peak",
        "equivalent",
        "speed (roofline)",
    ]);
    for v in &r.variants {
        let (med, cv) = v
            .timings
            .as_ref()
            .map(|t| {
                let cv = t.cv.map(|cv| format!("{:.1}%", cv * 100.0));
                (secs_h(t.median_s), cv.unwrap_or_else(|| "—".into()))
            })
            .unwrap_or(("—".into(), "—".into()));
        let m = &v.memory.measured;
        let eq = match v.equivalence.passed {
            None => "—".to_string(),
            Some(true) => "yes".into(),
            Some(false) => "NO".into(),
        };
        let status = match v.status {
            VariantStatus::Ok => "ok".to_string(),
            VariantStatus::Failed => format!("failed: {}", v.error.as_deref().unwrap_or("")),
            VariantStatus::Skipped => format!("skipped: {}", v.error.as_deref().unwrap_or("")),
        };
        t.add_row(vec![
            v.name.clone(),
            status,
            med,
            cv,
            bytes_h(m.host_peak_bytes),
            bytes_h(m.device_peak_bytes),
            bytes_h(m.nvml_peak_bytes),
            eq,
            key_figures(v).join("\n"),
        ]);
    }
    t
}

/// A variant's speeds beside the limits they run against: decode tokens/s with the fraction of
/// the measured read bandwidth, prefill tokens/s with the fraction of the measured GEMM
/// throughput (only the figures the variant has).
pub fn key_figures(v: &VariantReport) -> Vec<String> {
    let get = |k: &str| v.metrics.get(k).copied().flatten();
    let pct = |x: Option<f64>, what: &str| super::write::fraction_text(x, what);
    let mut out = Vec::new();
    if let Some(t) = get("decode_tokens_per_s") {
        out.push(format!(
            "decode {t:.1} tok/s{}",
            pct(get("decode_read_bandwidth_fraction"), "of read BW")
        ));
    }
    if let Some(t) = get("prefill_tokens_per_s") {
        out.push(format!(
            "prefill {t:.1} tok/s{}",
            pct(get("prefill_gemm_fraction"), "of GEMM")
        ));
    }
    // MTP: what the draft buys (tokens per verify step, first-draft acceptance) and the sweep
    if let Some(t) = get("mean_accepted_length") {
        let d1 = get("acceptance_conditional_d1")
            .map(|a| format!(" · d1 accepted {:.0} %", a * 100.0))
            .unwrap_or_default();
        out.push(format!("{t:.2} tokens/step{d1}"));
    }
    if let Some(x) = get("speedup") {
        out.push(format!("speedup {x:.2}x"));
    }
    if out.is_empty() {
        out.push("—".into());
    }
    out
}

/// Criteria with their verdicts.
pub fn criteria_table(r: &Report) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "criterion",
        "metric",
        "threshold",
        "measured",
        "verdict",
    ]);
    for c in &r.criteria {
        t.add_row(vec![
            Cell::new(&c.id),
            Cell::new(&c.metric),
            Cell::new(format!("{} {}", c.comparison.symbol(), c.threshold)),
            Cell::new(num_h(c.measured)),
            match c.outcome() {
                Outcome::NotApplicable => Cell::new("N/A").fg(Color::Yellow),
                // unmeasured is not a failed measurement: the verdict is ERROR, not FAIL
                Outcome::NotMeasured => Cell::new("NOT MEASURED").fg(Color::Yellow),
                Outcome::Marginal if c.passed => Cell::new("PASS (marginal)").fg(Color::Yellow),
                Outcome::Inconclusive => Cell::new("INCONCLUSIVE").fg(Color::Yellow),
                _ => verdict_cell(c.passed),
            },
        ]);
    }
    t
}

/// The full terminal summary of one report.
pub fn render(r: &Report) -> String {
    let id = r.scenario["id"].as_str().unwrap_or("?");
    let spec = match &r.spec {
        Some(st) if !st.conformant => format!(
            "NOT the spec's operating point (criteria carry `@` ids): {}\n",
            st.deviations.join("; ")
        ),
        _ => String::new(),
    };
    format!(
        "{id} on {} ({}) — verdict: {}\n{spec}{}\n{}\n",
        r.backend.name,
        r.backend.device,
        r.verdict.as_str().to_uppercase(),
        variants_table(r),
        criteria_table(r)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(metrics: &[(&str, f64)]) -> VariantReport {
        VariantReport {
            name: "v".into(),
            status: VariantStatus::Ok,
            error: None,
            timings: None,
            memory: Default::default(),
            metrics: metrics
                .iter()
                .map(|(k, x)| (k.to_string(), Some(*x)))
                .collect(),
            equivalence: Default::default(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn key_figures_show_each_kinds_figures_and_a_dash_otherwise() {
        let mla = variant(&[
            ("decode_tokens_per_s", 156.3),
            ("decode_read_bandwidth_fraction", 0.46),
        ]);
        assert_eq!(key_figures(&mla), ["decode 156.3 tok/s · 46 % of read BW"]);
        let mtp = variant(&[
            ("decode_tokens_per_s", 5808.7),
            ("mean_accepted_length", 3.378),
            ("acceptance_conditional_d1", 0.875),
        ]);
        assert_eq!(
            key_figures(&mtp),
            ["decode 5808.7 tok/s", "3.38 tokens/step · d1 accepted 88 %"]
        );
        assert_eq!(
            key_figures(&variant(&[("speedup", 1.371)])),
            ["speedup 1.37x"]
        );
        assert_eq!(key_figures(&variant(&[])), ["—"]);
    }
}
