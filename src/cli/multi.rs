//! Commands that run one scenario several times: `dsopt compare` (several backends) and
//! `dsopt bench --seq a,b,c` / `--batch a,b,c` (a sweep of one parameter).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ValueEnum;

use dsopt::backend::{self, BackendChoice, SelectedBackend};
use dsopt::config::{Scenario, ScenarioKind};
use dsopt::error::{exit_code_of, DsoptError};
use dsopt::report::{
    self,
    chart::write_svg,
    compare::{BackendEntry, CompareReport},
    sweep::{scenario_budget_bytes, SweepPoint, SweepReport},
};

use super::commands::{bench_one, log, overrides};
use super::{Format, OverrideArgs, RunArgs};

/// A scenario file, or the name of a kind for its shipped scenario.
fn resolve_target(target: &str) -> anyhow::Result<(String, Scenario)> {
    let path = Path::new(target);
    if path.exists() {
        return Ok((target.to_string(), Scenario::load(path)?));
    }
    match ScenarioKind::from_str(target, true) {
        Ok(kind) => Ok((
            kind.default_scenario().0.to_string(),
            Scenario::builtin(kind),
        )),
        Err(_) => Err(DsoptError::Usage(format!(
            "`{target}` is neither a scenario file nor a kind (mla, mtp, moe, calibrate, …)"
        ))
        .into()),
    }
}

fn choice_name(c: BackendChoice) -> String {
    c.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{c:?}").to_lowercase())
}

/// Writes `text` as `<stem>.json` / `.md` style files into `out` (atomic).
fn write_pair(out: &Path, stem: &str, json: &str, md: &str) -> anyhow::Result<PathBuf> {
    let stem = report::write::unique_stem(out, stem);
    let json_path = out.join(format!("{stem}.json"));
    report::write::write_atomic(&json_path, json.as_bytes())?;
    report::write::write_atomic(&out.join(format!("{stem}.md")), md.as_bytes())?;
    Ok(json_path)
}

/// `dsopt compare --backends a,b,c SCENARIO`.
pub(super) fn compare_cmd(
    backends: &[BackendChoice],
    target: &str,
    out: &Path,
    format: Format,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let (file, scenario) = resolve_target(target)?;
    let mut rows = Vec::new();
    for &choice in backends {
        let name = choice_name(choice);
        let selected = match backend::select(choice) {
            Ok(sel) => sel,
            Err(e) => {
                log(
                    quiet,
                    format!("compare: backend {name} is not usable here: {e}"),
                );
                rows.push(BackendEntry::not_run(
                    &name,
                    true,
                    e.to_string(),
                    dsopt::error::EXIT_CANNOT_RUN,
                ));
                continue;
            }
        };
        let run = RunArgs {
            backend: choice,
            out: out.to_path_buf(),
            format: Format::Silent,
        };
        match bench_one(scenario.clone(), &file, o, &run, &selected, quiet) {
            Ok((r, path)) => rows.push(BackendEntry::ran(
                &name,
                &r,
                Some(path.display().to_string()),
            )),
            Err(e) => {
                let code = exit_code_of(&e);
                if code == dsopt::error::EXIT_BAD_INPUT {
                    return Err(e); // the same bad input on every backend: stop at once
                }
                eprintln!("error: backend {name}: {e:#}");
                rows.push(BackendEntry::not_run(&name, false, format!("{e:#}"), code));
            }
        }
    }
    let now = report::timefmt::now_secs();
    let cmp = CompareReport::new(&file, scenario.id(), rows, report::timefmt::rfc3339(now));
    let stem = format!(
        "{}-{}-compare",
        report::timefmt::compact(now),
        scenario.id()
    );
    let json = serde_json::to_string_pretty(&cmp)?;
    let path = write_pair(out, &stem, &json, &cmp.to_markdown())?;
    match format {
        Format::Json => println!("{json}"),
        _ => print!("{}", cmp.render()),
    }
    log(quiet, format!("comparison: {} (+ .md)", path.display()));
    Ok(cmp.exit_code)
}

/// The scenario key a sweep flag sets for a kind.
fn swept_key(kind: ScenarioKind, param: &str) -> &'static str {
    match (kind, param) {
        (ScenarioKind::Mla, "seq") => "run.seq",
        (ScenarioKind::Mtp, "seq") => "run.new_tokens",
        (ScenarioKind::Moe, "seq") => "run.prefill_seq",
        (ScenarioKind::Calibrate, "seq") => "workload.size",
        (ScenarioKind::Moe, _) => "run.decode_batch",
        (ScenarioKind::Calibrate, _) => "workload.batch",
        (_, "seq") => "run.new_tokens",
        _ => "run.batch",
    }
}

/// `dsopt bench KIND --seq a,b,c` (or `--batch`): one report per value, then the sweep report
/// and its charts.
#[allow(clippy::too_many_arguments)]
pub(super) fn sweep_cmd(
    scenario: Scenario,
    file: &str,
    o: &OverrideArgs,
    run: &RunArgs,
    selected: &SelectedBackend,
    param: &'static str,
    values: &[usize],
    quiet: bool,
) -> anyhow::Result<i32> {
    let mut points = Vec::new();
    let mut budget = None;
    let point_run = RunArgs {
        format: if run.format == Format::Json {
            Format::Silent
        } else {
            run.format
        },
        ..run.clone()
    };
    // every value is checked before the first point runs: bad input fails at once
    let one_value = |v: usize| {
        let mut one = o.clone();
        if param == "seq" {
            one.seq = vec![v];
        } else {
            one.batch = vec![v];
        }
        one
    };
    for &v in values {
        scenario
            .clone()
            .apply(&overrides(&one_value(v))?, Path::new(file))
            .with_context(|| format!("sweep point {param} = {v}"))?;
    }
    for (i, &v) in values.iter().enumerate() {
        log(
            quiet,
            format!("sweep {param} = {v} ({}/{})", i + 1, values.len()),
        );
        let one = one_value(v);
        match bench_one(scenario.clone(), file, &one, &point_run, selected, quiet) {
            Ok((r, path)) => {
                budget = budget.or_else(|| scenario_budget_bytes(&r));
                points.push(SweepPoint::ran(v, &r, Some(path.display().to_string())));
            }
            Err(e) => {
                let code = exit_code_of(&e);
                if code == dsopt::error::EXIT_BAD_INPUT {
                    return Err(e.context(format!("sweep point {param} = {v}")));
                }
                eprintln!("error: sweep point {param} = {v}: {e:#}");
                points.push(SweepPoint::failed(v, format!("{e:#}"), code));
            }
        }
    }
    let now = report::timefmt::now_secs();
    let mut sweep = SweepReport::new(
        file,
        scenario.id(),
        param,
        swept_key(scenario.kind(), param),
        Some(dsopt::bench::backend_report(selected)),
        budget,
        points,
        report::timefmt::rfc3339(now),
    );
    let stem = report::write::unique_stem(
        &run.out,
        &format!(
            "{}-{}-sweep-{param}",
            report::timefmt::compact(now),
            scenario.id()
        ),
    );
    for (suffix, chart) in sweep.charts() {
        let name = format!("{stem}-{suffix}.svg");
        match write_svg(&chart, &run.out.join(&name)) {
            Ok(()) => sweep.charts.push(name),
            Err(e) => eprintln!("warning: chart {name} not written: {e:#}"),
        }
    }
    let json = serde_json::to_string_pretty(&sweep)?;
    let path = write_pair(&run.out, &stem, &json, &sweep.to_markdown())?;
    match run.format {
        Format::Json => println!("{json}"),
        _ => print!("{}", sweep.render()),
    }
    log(
        quiet,
        format!(
            "sweep: {} (+ .md, {} chart(s))",
            path.display(),
            sweep.charts.len()
        ),
    );
    Ok(sweep.exit_code)
}
