//! `dsopt bench --seq a,b,c` / `--batch a,b,c`: a sweep of one parameter, one report per value.

use std::path::Path;

use anyhow::Context;

use dsopt::backend::SelectedBackend;
use dsopt::config::{Scenario, ScenarioKind};
use dsopt::error::exit_code_of;
use dsopt::report::{
    self,
    chart::write_svg,
    sweep::{scenario_budget_bytes, SweepPoint, SweepReport},
};

use super::bench::{bench_one, overrides};
use super::commands::log;
use super::{Format, OverrideArgs, RunArgs};

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
    // checked with the model applied (a scenario's [model] preset/path, or --model)
    let mut checked = scenario.clone();
    dsopt::checkpoint::apply_model_source(&mut checked, o.model.as_deref(), o.layers, file)?;
    for &v in values {
        checked
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
    let path =
        report::write::write_json_and_markdown(&run.out, &stem, &json, &sweep.to_markdown())?;
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
