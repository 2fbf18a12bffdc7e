//! Chart tests: rendering, and the charts each kind of report gives.

use super::*;
use crate::backend::machine::{MachineInfo, ToolInfo};
use crate::monitor::MemorySample;
use crate::report::{
    BackendReport, CapacityProbe, Equivalence, MemoryReport, MtpSweepPoint, VariantReport,
    VariantStatus, Verdict,
};

/// The contents of the SVG's `<text>` elements, trimmed.
fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
        .collect()
}

fn two_series() -> Chart {
    Chart {
        title: "capacity".into(),
        x_label: "sequence length".into(),
        y_label: "memory MiB".into(),
        series: vec![
            Series {
                name: "mha".into(),
                points: vec![(1024.0, 100.0), (4096.0, 400.0), (2048.0, 200.0)],
            },
            Series {
                name: "mla_absorbed".into(),
                points: vec![(1024.0, 20.0), (f64::NAN, 5.0), (65536.0, 1300.0)],
            },
        ],
        hlines: vec![("memory budget".into(), 1024.0)],
        log_x: true,
    }
}

#[test]
fn renders_series_axes_and_budget_line() {
    for log_x in [true, false] {
        let c = Chart {
            log_x,
            ..two_series()
        };
        let svg = render_svg(&c).unwrap();
        let t = svg.trim();
        assert!(t.starts_with("<svg") || t.starts_with("<?xml"), "{t}");
        assert!(t.ends_with("</svg>"), "{t}");
        for s in [
            "mha",
            "mla_absorbed",
            "memory budget",
            "sequence length",
            "memory MiB",
            "capacity",
        ] {
            assert!(texts(&svg).contains(&s), "`{s}` missing: {svg}");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        // one marker per finite point (5), plus nothing for the NaN point
        assert_eq!(svg.matches("<circle").count(), 5, "{svg}");
    }
}

#[test]
fn only_nan_points_is_an_error() {
    let c = Chart {
        series: vec![Series {
            name: "x".into(),
            points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
        }],
        hlines: vec![("budget".into(), 1.0)],
        log_x: false,
        ..two_series()
    };
    assert!(render_svg(&c).is_err());
    let none = Chart {
        series: vec![],
        ..two_series()
    };
    assert!(render_svg(&none).is_err());
    // x <= 0 cannot be placed on a log axis
    let log0 = Chart {
        series: vec![Series {
            name: "x".into(),
            points: vec![(0.0, 1.0)],
        }],
        ..two_series()
    };
    assert!(render_svg(&log0).is_err());
}

#[test]
fn single_point_renders() {
    for log_x in [true, false] {
        let c = Chart {
            series: vec![Series {
                name: "one".into(),
                points: vec![(8.0, 0.0)],
            }],
            hlines: vec![],
            log_x,
            ..two_series()
        };
        assert!(texts(&render_svg(&c).unwrap()).contains(&"one"));
    }
}

#[test]
fn write_svg_is_the_rendered_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("c.svg");
    write_svg(&two_series(), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render_svg(&two_series()).unwrap());
    // no temporary file left behind
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn tick_labels() {
    assert_eq!(tick(2048.0), "2048");
    assert_eq!(tick(1.25), "1.25");
    assert_eq!(tick(0.0), "0");
    assert_eq!(tick(1.0 / 3.0), "0.333");
    assert_eq!(tick(2.5e8), "2.50e8");
}

fn variant(name: &str, metrics: &[(&str, f64)]) -> VariantReport {
    VariantReport {
        name: name.into(),
        status: VariantStatus::Ok,
        error: None,
        timings: None,
        memory: MemoryReport::default(),
        metrics: metrics
            .iter()
            .map(|(k, v)| (k.to_string(), Some(*v)))
            .collect(),
        equivalence: Equivalence::default(),
        warnings: vec![],
    }
}

fn report(scenario: serde_json::Value, variants: Vec<VariantReport>) -> Report {
    Report {
        schema_version: 1,
        tool: ToolInfo::current(),
        created_at: "2026-01-01T00:00:00Z".into(),
        wall_time_s: 1.0,
        machine: MachineInfo {
            cpu: "test".into(),
            cores: 1,
            ram_bytes: 1 << 30,
            os: "test".into(),
            gpus: vec![],
            simd: None,
        },
        backend: BackendReport {
            name: "flex".into(),
            device: "cpu".into(),
            features: vec![],
        },
        scenario_file: "s.toml".into(),
        scenario,
        variants,
        criteria: vec![],
        verdict: Verdict::Error,
        notes: vec![],
        memory_series: vec![],
        series: Default::default(),
        spec: None,
    }
}

/// An MLA-like report: typed capacity probes, one of them not run.
fn mla_report() -> Report {
    let mib = 1u64 << 20;
    let probe = |variant: &str, seq: usize, total: Option<u64>| CapacityProbe {
        variant: variant.into(),
        seq,
        measured_peak_bytes: total.map(|t| t - 10 * mib),
        reserved_peak_bytes: None,
        total_bytes: total,
        real_prefill: false,
        fits: total.is_some(),
        note: if total.is_some() { "" } else { "not run" }.into(),
    };
    let mut r = report(
        serde_json::json!({"id": "SC-001", "kind": "mla"}),
        vec![variant("mha", &[]), variant("mla_absorbed", &[])],
    );
    r.notes = vec!["decode at 8192 context".into()];
    r.series.capacity_probes = vec![
        probe("mha", 1024, Some(100 * mib)),
        probe("mha", 2048, Some(200 * mib)),
        probe("mha", 4096, None),
        probe("mla_absorbed", 1024, Some(20 * mib)),
        probe("mla_absorbed", 4096, Some(80 * mib)),
        probe("mla_absorbed", 2048, Some(40 * mib)),
    ];
    r.series.capacity_budget_bytes = Some(256 * mib);
    r
}

#[test]
fn mla_report_gives_memory_vs_seq() {
    let charts = report_charts(&mla_report());
    assert_eq!(charts.len(), 1, "no memory series: only the capacity chart");
    let (suffix, c) = &charts[0];
    assert_eq!(suffix, "memory-vs-seq");
    assert!(c.log_x);
    let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["mha", "mla_absorbed"]);
    // the probe that was not run has no value and no point
    assert_eq!(c.series[0].points, [(1024.0, 100.0), (2048.0, 200.0)]);
    assert_eq!(c.series[1].points.len(), 3);
    assert!(c.series[1].points.contains(&(4096.0, 80.0)));
    assert_eq!(c.hlines.len(), 1);
    assert_eq!(c.hlines[0].1, 256.0);
    render_svg(c).unwrap();
}

#[test]
fn mla_report_without_probes_or_budget() {
    let mut r = mla_report();
    r.series.capacity_budget_bytes = None;
    let charts = report_charts(&r);
    assert!(charts[0].1.hlines.is_empty(), "no budget: no line");
    r.series.capacity_probes.clear();
    assert!(report_charts(&r).is_empty());
}

#[test]
fn mtp_sweep_gives_speedup_per_batch() {
    let sweep = |depth: usize, batch: usize, g: f64, s: f64| MtpSweepPoint {
        depth,
        batch,
        greedy_tokens_per_s: Some(g),
        speculative_tokens_per_s: Some(s),
        tokens_per_step: None,
        identical: true,
    };
    let mut failed = sweep(4, 8, 100.0, 500.0);
    failed.identical = false;
    let mut r = report(
        serde_json::json!({"kind": "mtp", "thresholds": {"throughput_ratio": 1.3, "time_reduction": 0.25}}),
        vec![variant("greedy", &[("tokens_per_s", 100.0)])],
    );
    r.series.mtp_sweep = vec![
        sweep(1, 1, 100.0, 120.0),
        sweep(2, 1, 100.0, 150.0),
        sweep(1, 8, 400.0, 600.0),
        sweep(2, 8, 400.0, 800.0),
        failed,
    ];
    let charts = report_charts(&r);
    assert_eq!(charts.len(), 1);
    let (suffix, c) = &charts[0];
    assert_eq!(suffix, "speedup-vs-depth");
    assert_eq!(c.series.len(), 2);
    assert_eq!(c.series[0].name, "batch 1");
    assert_eq!(c.series[0].points, [(1.0, 1.2), (2.0, 1.5)]);
    assert_eq!(
        c.series[1].points,
        [(1.0, 1.5), (2.0, 2.0)],
        "failed point left out"
    );
    assert_eq!(c.hlines, [("SC-002b threshold (1.3x)".to_string(), 1.3)]);
}

#[test]
fn memory_series_gives_one_line_per_source() {
    let mut r = report(serde_json::json!({"kind": "calibrate"}), vec![]);
    assert!(report_charts(&r).is_empty());
    let sample = |t: f64, source: &str, mib: u64| MemorySample {
        t_s: t,
        variant: "v".into(),
        source: source.into(),
        bytes: mib << 20,
        label: "run_end".into(),
    };
    r.memory_series = vec![
        sample(0.1, "host", 10),
        sample(0.1, "nvml", 30),
        sample(0.2, "host", 12),
    ];
    let charts = report_charts(&r);
    assert_eq!(charts.len(), 1);
    let (suffix, c) = &charts[0];
    assert_eq!(suffix, "memory-over-time");
    assert_eq!(c.series.len(), 2);
    assert_eq!(c.series[0].name, "host");
    assert_eq!(c.series[0].points, [(0.1, 10.0), (0.2, 12.0)]);
    assert_eq!(c.series[1].points, [(0.1, 30.0)]);
}

#[test]
fn write_all_writes_charts_and_links_them() {
    let dir = tempfile::tempdir().unwrap();
    let files = crate::report::write::write_all(&mla_report(), dir.path(), "stem").unwrap();
    let svg = dir.path().join("stem-memory-vs-seq.svg");
    assert_eq!(files.charts, std::slice::from_ref(&svg));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(texts(&text).contains(&"mla_absorbed"), "{text}");
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains("## 图表"), "{md}");
    assert!(md.contains("](stem-memory-vs-seq.svg)"), "{md}");
}
