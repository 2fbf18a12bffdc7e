//! `dsopt bench`: one scenario on one backend (overrides, the monitor, the report files).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use dsopt::backend::{BackendContext, BackendJob, SelectedBackend};
use dsopt::bench::{self, RunOutput};
use dsopt::config::{Overrides, Scenario};
use dsopt::error::DsoptError;
use dsopt::monitor::{progress, MonitorConfig};
use dsopt::report::{self, Report};

use dsopt::report::export::{Exporter, Json, TerminalTable};

use super::commands::log;
use super::{dispatch::dispatch, Format, OverrideArgs, RunArgs};

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
        prompts: o.prompts.clone(),
        prompt_text: o.prompt_text.clone(),
        force: o.force,
    })
}

/// The swept parameter and its values when `--seq` or `--batch` has several values.
pub(super) fn sweep_of(o: &OverrideArgs) -> Result<Option<(&'static str, Vec<usize>)>, DsoptError> {
    match (o.seq.len() > 1, o.batch.len() > 1) {
        (true, true) => Err(DsoptError::Usage(
            "sweep one parameter at a time: give --seq or --batch a list, not both".into(),
        )),
        (true, false) => Ok(Some(("seq", o.seq.clone()))),
        (false, true) => Ok(Some(("batch", o.batch.clone()))),
        (false, false) => Ok(None),
    }
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

/// With `--model`, the largest variant's weights plus the capacity budget must fit this
/// machine's memory before anything is built (exit 3 with the bytes and `--layers` as the fix).
fn check_fits_in_memory(s: &Scenario) -> Result<(), DsoptError> {
    if let Scenario::Moe(m) = s {
        return check_moe_fits(m);
    }
    if let Scenario::Model(m) = s {
        return check_model_fits(m);
    }
    let Scenario::Mla(m) = s else { return Ok(()) };
    let Some(origin) = &m.model_origin else {
        return Ok(());
    };
    let elem = m.run.dtype.bytes() as u64;
    let bytes_at = |layers: usize| -> u64 {
        let mut m = m.clone();
        m.model.n_layers = layers;
        m.attention
            .variants
            .iter()
            .map(|&v| m.decoder_config(v).params() as u64 * elem)
            .max()
            .unwrap_or(0)
    };
    let weights = bytes_at(m.model.n_layers);
    let budget = (m.capacity.memory_budget_gib * (1u64 << 30) as f64) as u64;
    let ram = dsopt::backend::machine::MachineInfo::capture().ram_bytes;
    if ram == 0 || weights + budget <= ram {
        return Ok(());
    }
    let per_layer = bytes_at(2).saturating_sub(bytes_at(1)).max(1);
    let fit = (ram.saturating_sub(budget + bytes_at(1))) / per_layer + 1;
    Err(DsoptError::CannotRun(format!(
        "--model {} with {} of {} layers: the largest variant's weights need {} in {} plus \
         the {} capacity budget, but this machine has {} of memory\n  fix: --layers {} or \
         fewer (each layer adds {})",
        origin.model,
        m.model.n_layers,
        origin.total_layers,
        report::write::bytes_h(Some(weights)),
        m.run.dtype.as_str(),
        report::write::bytes_h(Some(budget)),
        report::write::bytes_h(Some(ram)),
        fit.max(1),
        report::write::bytes_h(Some(per_layer)),
    )))
}

/// `bench model --model`: the model (with its MTP modules) in the run's dtype and 1 GiB for
/// the rest must fit this machine's memory (exit 3 with the bytes and `--layers`).
fn check_model_fits(m: &dsopt::config::ModelScenario) -> Result<(), DsoptError> {
    let Some(origin) = &m.model_origin else {
        return Ok(());
    };
    let o = &m.optimization;
    let bytes_at = |layers: usize| -> u128 {
        let mut shape = m.model.clone();
        shape.n_layers = layers;
        let cfg = o.decoder_config(&shape);
        let mtp = dsopt::nn::mtp::MtpPredictor::<burn::backend::Flex>::params(&cfg, o.mtp_depth());
        (cfg.params() + mtp) as u128 * o.dtype.bytes() as u128 + (1 << 30)
    };
    let ram = dsopt::backend::machine::MachineInfo::capture().ram_bytes as u128;
    let need = bytes_at(m.model.n_layers);
    if ram == 0 || need <= ram {
        return Ok(());
    }
    let first = match o.ffn {
        dsopt::config::FfnKind::Moe => o.moe.first_k_dense_replace + 1,
        dsopt::config::FfnKind::Dense => 1,
    };
    let fix = match (first..m.model.n_layers)
        .rev()
        .find(|&n| bytes_at(n) <= ram)
    {
        Some(n) => format!("--layers {n} (or fewer)"),
        None => "a machine with more memory".into(),
    };
    let gib = |b: u128| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    Err(DsoptError::CannotRun(format!(
        "--model {} with {} of {} layers: the model's parameters need {} in {} plus 1 GiB, but \
         this machine has {}\n  fix: {fix}",
        origin.model,
        m.model.n_layers,
        origin.total_layers,
        gib(need - (1 << 30)),
        o.dtype.as_str(),
        gib(ram)
    )))
}

/// `bench moe --model`: the three variants are resident together (measured interleaved), so
/// their weights add up; exit 3 with the bytes and a `--layers` that fits when they exceed this
/// machine's memory (one GiB kept for activations and the rest of the process).
fn check_moe_fits(m: &dsopt::config::scenario::MoeScenario) -> Result<(), DsoptError> {
    use dsopt::config::MoeVariant;
    let Some(origin) = &m.model_origin else {
        return Ok(());
    };
    if m.offload.as_ref().is_some_and(|o| o.only) {
        return Ok(()); // SC-003b alone: its runner checks the resident twin against memory
    }
    let elem = m.run.dtype.bytes() as u128;
    // u128: a config.json within the parser's limits can exceed u64 here
    let bytes_at = |layers: usize| -> u128 {
        let mut m = m.clone();
        m.model.n_layers = layers;
        MoeVariant::ALL
            .iter()
            .map(|&v| m.decoder_config(v).params() as u128 * elem)
            .sum::<u128>()
            + (1 << 30)
    };
    let ram = dsopt::backend::machine::MachineInfo::capture().ram_bytes as u128;
    let need = bytes_at(m.model.n_layers);
    if ram == 0 || need <= ram {
        return Ok(());
    }
    // an MoE layer must be kept: at least first_k_dense_replace + 1 layers
    let first = m.moe.first_k_dense_replace + 1;
    let fix = match (first..=origin.total_layers)
        .rev()
        .find(|&n| bytes_at(n) <= ram)
    {
        Some(n) => format!("--layers {n} or fewer (at least {first}: the first MoE layer)"),
        None => format!(
            "no --layers fits: the smallest choice ({first} layers) needs {} (half of it in bf16); \
             use a machine with more memory",
            bytes_h(bytes_at(first))
        ),
    };
    Err(DsoptError::CannotRun(format!(
        "--model {} with {} of {} layers: the three variants' weights (MoE, dense of equal total \
         and of equal active size, resident together) need {} in {} plus 1 GiB, but this machine \
         has {}\n  fix: {fix}",
        origin.model,
        m.model.n_layers,
        origin.total_layers,
        bytes_h(need - (1 << 30)),
        m.run.dtype.as_str(),
        bytes_h(ram),
    )))
}

fn bytes_h(b: u128) -> String {
    report::write::bytes_h(Some(b.min(u64::MAX as u128) as u64))
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
    dsopt::checkpoint::apply_model_source(&mut s, o.model.as_deref(), o.layers, file)?;
    s.apply(&overrides(o)?, Path::new(file))?;
    check_fits_in_memory(&s)?;
    dsopt::checkpoint::add_weights_to_budget(&mut s);
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
        Format::Json => print!("{}", Json.render(&report)?),
        Format::Table => print!("{}", TerminalTable.render(&report)?),
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
