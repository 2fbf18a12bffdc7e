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
    let pct = |x: Option<f64>, what: &str| {
        x.map(|f| format!(" · {:.0} % {what}", f * 100.0))
            .unwrap_or_default()
    };
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
            if c.not_applicable.is_some() {
                Cell::new("N/A").fg(Color::Yellow)
            } else {
                verdict_cell(c.passed)
            },
        ]);
    }
    t
}

/// The full terminal summary of one report.
pub fn render(r: &Report) -> String {
    let id = r.scenario["id"].as_str().unwrap_or("?");
    format!(
        "{id} on {} ({}) — verdict: {}\n{}\n{}\n",
        r.backend.name,
        r.backend.device,
        r.verdict.as_str().to_uppercase(),
        variants_table(r),
        criteria_table(r)
    )
}
