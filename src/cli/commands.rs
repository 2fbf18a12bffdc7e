//! The subcommands. Answers go to stdout; progress and logs to stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use dsopt::backend::machine::{MachineInfo, ToolInfo};
use dsopt::backend::{self, BackendContext, BackendJob, SelectedBackend};
use dsopt::bench::{self, RunOutput};
use dsopt::config::{Overrides, Scenario, ScenarioKind};
use dsopt::error::{DsoptError, EXIT_BAD_INPUT, EXIT_PASS};
use dsopt::monitor::{progress, MonitorConfig};
use dsopt::report::{self, gate, Report, Verdict};

use super::multi::{compare_cmd, sweep_cmd};
use super::{dispatch::dispatch, Cli, Command, Format, OverrideArgs, RunArgs};

/// Runs the parsed command; returns the exit code.
pub fn run(cli: &Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Info { json } => info(*json, cli.quiet),
        Command::Bench {
            kind,
            scenario,
            run,
            overrides,
        } => {
            let (file, s) = match scenario {
                Some(path) => (path.display().to_string(), Scenario::load(path)?),
                None => (
                    kind.default_scenario().0.to_string(),
                    Scenario::builtin(*kind),
                ),
            };
            if s.kind() != *kind {
                return Err(DsoptError::Usage(format!(
                    "{file} is a `{}` scenario, but `dsopt bench {}` was asked for; use `dsopt \
                     bench {}` or `dsopt run {file}`",
                    s.kind().as_str(),
                    kind.as_str(),
                    s.kind().as_str()
                ))
                .into());
            }
            let selected = backend::select(run.backend)?;
            if let Some((param, values)) = sweep_of(overrides)? {
                return sweep_cmd(
                    s, &file, overrides, run, &selected, param, &values, cli.quiet,
                );
            }
            let (report, _) = bench_one(s, &file, overrides, run, &selected, cli.quiet)?;
            Ok(report.verdict.exit_code())
        }
        Command::Compare {
            backends,
            target,
            out,
            format,
            overrides,
        } => compare_cmd(backends, target, out, *format, overrides, cli.quiet),
        Command::Run {
            paths,
            run,
            overrides,
        } => run_many(paths, run, overrides, cli.quiet),
        Command::Gate {
            reports,
            baseline,
            noise,
            require,
            allow_different_machine,
        } => gate_cmd(
            reports,
            baseline.as_deref(),
            gate::GateOptions {
                require: require.clone(),
                noise: *noise,
                allow_different_machine: *allow_different_machine,
            },
        ),
        Command::Validate { paths } => validate(paths),
        Command::Train {
            scenario,
            cache_dir,
            force,
            overrides: o,
        } => train_cmd(
            scenario.as_deref(),
            cache_dir.as_deref(),
            *force,
            o,
            cli.quiet,
        ),
    }
}

pub(super) fn log(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", msg.as_ref());
    }
}

#[derive(Serialize)]
struct InfoOut {
    tool: ToolInfo,
    backends: Vec<backend::BackendStatus>,
    default_backend: Option<String>,
    machine: MachineInfo,
}

fn info(json: bool, quiet: bool) -> anyhow::Result<i32> {
    let spin = progress::spinner(!quiet, "probing backends and devices…");
    let backends = backend::probe_all();
    let default_backend = backend::select(backend::BackendChoice::Auto)
        .ok()
        .map(|s| format!("{} ({})", s.kind, s.device));
    let machine = MachineInfo::capture();
    spin.finish_and_clear();
    let out = InfoOut {
        tool: ToolInfo::current(),
        backends,
        default_backend,
        machine,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(EXIT_PASS);
    }
    let t = &out.tool;
    println!(
        "{} {} (git {})",
        t.name,
        t.version,
        t.git_commit.as_deref().unwrap_or("unknown")
    );
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec![
            "backend",
            "compiled",
            "usable",
            "features",
            "devices / reason",
        ]);
    for b in &out.backends {
        let detail = if b.usable {
            b.devices.join("\n")
        } else {
            b.reason.clone().unwrap_or_default()
        };
        table.add_row(vec![
            b.kind.to_string(),
            if b.compiled { "yes" } else { "no" }.to_string(),
            if b.usable { "yes" } else { "no" }.to_string(),
            b.features.join(", "),
            detail,
        ]);
    }
    println!("{table}");
    println!(
        "default backend (--backend auto): {}",
        out.default_backend.as_deref().unwrap_or("none")
    );
    let m = &out.machine;
    println!(
        "machine: {} · {} cores · {} RAM · {}",
        m.cpu,
        m.cores,
        report::write::bytes_h(Some(m.ram_bytes)),
        m.os
    );
    if m.gpus.is_empty() {
        println!("GPUs: none found (NVML absent, no hardware wgpu adapter)");
    }
    for g in &m.gpus {
        println!(
            "GPU: {} · driver {} · memory {} total, {} used · via {}",
            g.name,
            g.driver.as_deref().unwrap_or("?"),
            report::write::bytes_h(g.memory_bytes),
            report::write::bytes_h(g.used_bytes),
            g.source
        );
    }
    Ok(EXIT_PASS)
}

/// The scenario overrides of one run; a list of values (a sweep) is refused here.
pub(super) fn overrides(o: &OverrideArgs) -> Result<Overrides, DsoptError> {
    let one = |flag: &str, v: &[usize]| match v {
        [] => Ok(None),
        [x] => Ok(Some(*x)),
        _ => Err(DsoptError::Usage(format!(
            "--{flag} takes one value here; a list of values (a sweep) is for `dsopt bench`"
        ))),
    };
    Ok(Overrides {
        seq: one("seq", &o.seq)?,
        batch: one("batch", &o.batch)?,
        warmup: o.warmup,
        repetitions: o.repetitions,
        corpus: o.corpus.clone(),
        train_steps: o.train_steps,
        checkpoint: o.checkpoint.clone(),
        config: o.config.clone(),
        dtype: o.dtype,
    })
}

/// The swept parameter and its values when `--seq` or `--batch` has several values.
fn sweep_of(o: &OverrideArgs) -> Result<Option<(&'static str, Vec<usize>)>, DsoptError> {
    match (o.seq.len() > 1, o.batch.len() > 1) {
        (true, true) => Err(DsoptError::Usage(
            "sweep one parameter at a time: give --seq or --batch a list, not both".into(),
        )),
        (true, false) => Ok(Some(("seq", o.seq.clone()))),
        (false, true) => Ok(Some(("batch", o.batch.clone()))),
        (false, false) => Ok(None),
    }
}

/// `dsopt train`: trains (or reuses, unless `force`) the checkpoint of an MTP scenario.
fn train_cmd(
    scenario: Option<&Path>,
    cache_dir: Option<&Path>,
    force: bool,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let (file, mut s) = match scenario {
        Some(p) => (p.display().to_string(), Scenario::load(p)?),
        None => (
            ScenarioKind::Mtp.default_scenario().0.to_string(),
            Scenario::builtin(ScenarioKind::Mtp),
        ),
    };
    s.apply(&overrides(o)?, Path::new(&file))?;
    let Scenario::Mtp(s) = s else {
        return Err(DsoptError::Usage(format!(
            "{file} is a `{}` scenario; `dsopt train` needs an `mtp` scenario",
            s.kind().as_str()
        ))
        .into());
    };
    let corpus = dsopt::train::corpus::load(
        s.train.corpus.as_deref(),
        s.train.holdout_fraction,
        dsopt::train::MAX_CORPUS_BYTES,
    )
    .map_err(|e| DsoptError::Usage(format!("{e:#}")))?;
    log(
        quiet,
        format!("dsopt train: {file}; corpus: {}", corpus.description),
    );
    let dir = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(dsopt::train::default_cache_dir);
    if force {
        let key = dsopt::train::checkpoint_key(
            &dsopt::train::model_config(&s),
            dsopt::train::trained_depth(&s),
            &s.train,
            &corpus.description,
        );
        let old = dir.join(format!("mtp-{key}")).join("config.json");
        if old.exists() {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let (ckpt, meta, trained) = dsopt::train::ensure_checkpoint(&s, &dir, &corpus, !quiet)?;
    let sm = &meta.summary;
    println!(
        "checkpoint: {} ({})",
        ckpt.display(),
        if trained {
            "trained now"
        } else {
            "already trained; use --force to train again"
        }
    );
    println!(
        "training: {} steps, {} tokens in {:.1} s ({:.0} tokens/s) on {}; loss {:.4} -> {:.4}",
        sm.steps, sm.tokens, sm.wall_s, sm.tokens_per_s, sm.backend, sm.first_loss, sm.last_loss
    );
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "held-out",
        "loss before",
        "loss after",
        "accuracy before",
        "accuracy after",
    ]);
    t.add_row(vec![
        "main (next token)".to_string(),
        format!("{:.4}", sm.before.main_loss),
        format!("{:.4}", sm.after.main_loss),
        format!("{:.4}", sm.before.main_accuracy),
        format!("{:.4}", sm.after.main_accuracy),
    ]);
    for k in 0..meta.depth {
        t.add_row(vec![
            format!("MTP depth {} (token +{})", k + 1, k + 2),
            format!(
                "{:.4}",
                sm.before.depth_losses.get(k).copied().unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.after.depth_losses.get(k).copied().unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.before
                    .depth_accuracies
                    .get(k)
                    .copied()
                    .unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.after
                    .depth_accuracies
                    .get(k)
                    .copied()
                    .unwrap_or(f64::NAN)
            ),
        ]);
    }
    println!("{t}");
    Ok(EXIT_PASS)
}

fn monitor_config(s: &Scenario, quiet: bool) -> MonitorConfig {
    let (warmup, repetitions) = match s {
        Scenario::Mla(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Mtp(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Moe(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Model(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Calibrate(s) => (s.run.warmup, s.run.repetitions),
    };
    MonitorConfig {
        warmup,
        repetitions,
        progress: !quiet,
        ..Default::default()
    }
}

/// The generic job run at the dispatch point.
struct BenchJob<'a> {
    scenario: &'a Scenario,
    monitor: MonitorConfig,
}

impl BackendJob for BenchJob<'_> {
    type Output = anyhow::Result<RunOutput>;
    fn run<B: burn::tensor::backend::Backend>(self, ctx: BackendContext<B>) -> Self::Output {
        bench::run_scenario(self.scenario, &ctx, self.monitor)
    }
}

/// Loads overrides, runs one scenario, writes the report files, prints the verdict; returns
/// the report and the path of its JSON file.
pub(super) fn bench_one(
    mut s: Scenario,
    file: &str,
    o: &OverrideArgs,
    run: &RunArgs,
    selected: &SelectedBackend,
    quiet: bool,
) -> anyhow::Result<(Report, PathBuf)> {
    s.apply(&overrides(o)?, Path::new(file))?;
    let started = Instant::now();
    log(
        quiet,
        format!(
            "dsopt: {} `{}` on {} ({})",
            s.id(),
            s.title(),
            selected.kind,
            selected.device
        ),
    );
    progress::trace(format!("{}: start on {}", s.id(), selected.kind));
    let job = BenchJob {
        scenario: &s,
        monitor: monitor_config(&s, quiet),
    };
    let out = dispatch(selected, job)??;
    let report = bench::assemble(&s, file, selected, started, out);
    let stem = report::write::unique_stem(
        &run.out,
        &report::write::file_stem(&report, report::timefmt::now_secs()),
    );
    let files = report::write::write_all(&report, &run.out, &stem)
        .with_context(|| format!("writing the report into {}", run.out.display()))?;
    match run.format {
        Format::Json => print!("{}", report::write::to_json(&report)?),
        Format::Table => print!("{}", report::table::render(&report)),
        Format::Silent => {}
    }
    log(
        quiet,
        format!(
            "report: {} (+ .csv, -memory.csv, .md, {} chart(s)) in {:.1} s",
            files.json.display(),
            files.charts.len(),
            report.wall_time_s
        ),
    );
    Ok((report, files.json))
}

/// Expands directories into their `*.toml` files (sorted).
fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    out
}

#[derive(Serialize)]
struct SummaryEntry {
    scenario_file: String,
    id: Option<String>,
    verdict: Option<Verdict>,
    report: Option<String>,
    exit_code: i32,
    error: Option<String>,
    criteria: Vec<report::Criterion>,
}

#[derive(Serialize)]
struct Summary {
    schema_version: u32,
    kind: &'static str,
    tool: ToolInfo,
    created_at: String,
    backend: Option<report::BackendReport>,
    scenarios: Vec<SummaryEntry>,
    verdict: Verdict,
    exit_code: i32,
}

fn run_many(
    paths: &[PathBuf],
    run: &RunArgs,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let files = expand(paths);
    if files.is_empty() {
        return Err(DsoptError::Usage(
            "no scenario files found (a directory is searched for *.toml)".into(),
        )
        .into());
    }
    overrides(o)?; // a list of values (a sweep) is refused once, before anything runs
    let selected = backend::select(run.backend)?;
    let mut entries = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let result = Scenario::load(f)
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                // --config replaces the [optimization] section of `model` scenarios only
                let mut o = o.clone();
                if o.config.is_some() && s.kind() != ScenarioKind::Model {
                    o.config = None;
                }
                let o = &o;
                let quiet_table = RunArgs {
                    // JSON mode: stdout holds the summary only
                    format: if run.format == Format::Json {
                        Format::Silent
                    } else {
                        Format::Table
                    },
                    ..run.clone()
                };
                bench_one(s, &name, o, &quiet_table, &selected, quiet)
            });
        let entry = match result {
            Ok((r, path)) => SummaryEntry {
                scenario_file: name,
                id: r.scenario["id"].as_str().map(String::from),
                verdict: Some(r.verdict),
                report: Some(path.display().to_string()),
                exit_code: r.verdict.exit_code(),
                error: None,
                criteria: r.criteria.clone(),
            },
            Err(e) => {
                eprintln!("error: {e:#}");
                SummaryEntry {
                    scenario_file: name,
                    id: None,
                    verdict: None,
                    report: None,
                    exit_code: dsopt::error::exit_code_of(&e),
                    error: Some(format!("{e:#}")),
                    criteria: vec![],
                }
            }
        };
        entries.push(entry);
    }
    let code = dsopt::error::most_severe(entries.iter().map(|e| e.exit_code));
    let all: Vec<report::Criterion> = entries.iter().flat_map(|e| e.criteria.clone()).collect();
    let verdict = if entries.iter().any(|e| e.verdict.is_none()) {
        Verdict::Error
    } else {
        Verdict::of(&all)
    };
    let now = report::timefmt::now_secs();
    let summary = Summary {
        schema_version: report::SCHEMA_VERSION,
        kind: "summary",
        tool: ToolInfo::current(),
        created_at: report::timefmt::rfc3339(now),
        backend: Some(bench::backend_report(&selected)),
        scenarios: entries,
        verdict,
        exit_code: code,
    };
    let stem = report::write::unique_stem(
        &run.out,
        &format!("{}-summary", report::timefmt::compact(now)),
    );
    let json_path = run.out.join(format!("{stem}.json"));
    report::write::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let md_path = run.out.join(format!("{stem}.md"));
    report::write::write_atomic(&md_path, summary_markdown(&summary).as_bytes())?;
    if run.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
            .set_header(vec!["scenario", "id", "verdict", "exit", "error"]);
        for e in &summary.scenarios {
            t.add_row(vec![
                e.scenario_file.clone(),
                e.id.clone().unwrap_or_default(),
                e.verdict
                    .map(|v| v.as_str().to_string())
                    .unwrap_or("—".into()),
                e.exit_code.to_string(),
                e.error.clone().unwrap_or_default(),
            ]);
        }
        println!("{t}\noverall: {} (exit {code})", summary.verdict.as_str());
    }
    log(quiet, format!("summary: {}", json_path.display()));
    Ok(code)
}

fn summary_markdown(s: &Summary) -> String {
    let mut m = format!(
        "# dsopt 汇总报告\n\n- 时间：{}\n- 后端：{}\n- 总判定：**{}**（退出码 {}）\n\n## 场景\n\n| 场景文件 | 编号 | 判定 | 退出码 | 错误 |\n|---|---|---|---|---|\n",
        s.created_at,
        s.backend.as_ref().map(|b| format!("{} ({})", b.name, b.device)).unwrap_or_default(),
        s.verdict.as_str(),
        s.exit_code
    );
    for e in &s.scenarios {
        m.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            e.scenario_file,
            e.id.as_deref().unwrap_or("—"),
            e.verdict.map(|v| v.as_str()).unwrap_or("—"),
            e.exit_code,
            e.error
                .as_deref()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " ")
        ));
    }
    m.push_str("\n## 验收标准\n\n| 编号 | 指标 | 阈值 | 测量值 | 结果 |\n|---|---|---|---|---|\n");
    for e in &s.scenarios {
        for c in &e.criteria {
            m.push_str(&format!(
                "| {} | {} | {} {} | {} | {} |\n",
                c.id,
                c.metric,
                c.comparison.symbol(),
                c.threshold,
                report::write::num_h(c.measured),
                if c.passed { "通过" } else { "未通过" }
            ));
        }
    }
    m
}

fn gate_cmd(
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
    println!("{}", gate::table(&outcome));
    for n in &outcome.not_checked {
        println!("not checked (left out by --require): {n}");
    }
    for r in &outcome.regressions {
        println!("regression: {r}");
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

fn validate(paths: &[PathBuf]) -> anyhow::Result<i32> {
    let files = expand(paths);
    if files.is_empty() {
        return Err(DsoptError::Usage("no scenario files found".into()).into());
    }
    let mut code = EXIT_PASS;
    for f in files {
        match Scenario::load(&f) {
            Ok(s) => println!("ok    {} ({} {})", f.display(), s.id(), s.kind().as_str()),
            Err(e) => {
                println!("error {e}");
                code = EXIT_BAD_INPUT;
            }
        }
    }
    Ok(code)
}
