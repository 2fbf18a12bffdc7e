//! clap definitions and the entry point of the binary.

mod bench;
mod commands;
mod compare;
mod dispatch;
mod gate;
mod info;
mod run;
mod sweep;
mod train;
mod validate;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use dsopt::backend::BackendChoice;
use dsopt::config::ScenarioKind;

/// dsopt — 在 Burn 中验证 DeepSeek 推理优化（MLA、MTP、MoE）的真实收益。
#[derive(Parser, Debug)]
#[command(name = "dsopt", version, about, long_about = None)]
pub struct Cli {
    /// No progress bars or logs on stderr (errors are still printed).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the version, compiled-in backends, usable devices and this machine.
    Info {
        /// Print JSON on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one benchmark kind (its shipped scenario, or --scenario FILE) and write a report.
    Bench {
        /// mla (SC-001), mtp (SC-002), moe (SC-003), model (FR-004: MLA/MoE/MTP combined by an
        /// OptimizationConfig) or calibrate.
        kind: ScenarioKind,
        /// Scenario file (default: the shipped scenario of the kind).
        #[arg(long, value_name = "FILE")]
        scenario: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Run every scenario given (a directory means all its *.toml), one report each, plus a summary.
    Run {
        /// Scenario files or directories.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Run one scenario on several backends and compare them side by side (time, memory per
    /// source, criteria). A backend that is not usable here is a row saying why.
    Compare {
        /// Backends, comma-separated: flex,wgpu,cuda (auto is allowed too).
        #[arg(long, value_enum, value_delimiter = ',', required = true)]
        backends: Vec<BackendChoice>,
        /// A scenario file, or a kind (mla, mtp, moe, model, calibrate) for its shipped scenario.
        #[arg(value_name = "SCENARIO|KIND")]
        target: String,
        /// Output folder for the reports.
        #[arg(long, value_name = "DIR", default_value = "reports")]
        out: PathBuf,
        /// What goes to stdout: the side-by-side tables, or the comparison JSON only.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Check reports for CI: exit 0 every expected criterion measured and passed; 1 one failed,
    /// is missing or not applicable, a stored verdict disagrees with its values, or a regression
    /// against --baseline; 2 a report or baseline is missing, unreadable, of an unknown kind or
    /// measured under other conditions.
    Gate {
        /// Report JSON files.
        #[arg(required = true, value_name = "REPORT.json")]
        reports: Vec<PathBuf>,
        /// A baseline report for every report given: fail on a regression beyond --noise and the
        /// measured spread. It must come from the same scenario, backend, device and machine
        /// (else exit 2; see --allow-different-machine).
        #[arg(long, value_name = "REPORT.json")]
        baseline: Option<PathBuf>,
        /// Relative noise threshold for regressions (0.05 = 5 %).
        #[arg(long, default_value_t = 0.05)]
        noise: f64,
        /// Gate only these criteria (comma-separated ids, e.g. SC-003a-prefill,SC-003a-decode);
        /// by default every criterion the scenario kind must contain is required. The criteria
        /// left out are printed as not checked.
        #[arg(long, value_delimiter = ',', value_name = "ID,...")]
        require: Option<Vec<String>>,
        /// Accept a baseline measured on another machine, backend, device or with other scenario
        /// settings (refused by default: exit 2 naming the field that differs).
        #[arg(long)]
        allow_different_machine: bool,
        /// Gate reports measured off the spec's operating point (another batch, sequence or
        /// active fraction, a weakened threshold, a smoke scenario, a version-1 report): their
        /// deviations are printed and their `<id>@<tag>` criteria gated as measured. Refused by
        /// default (exit 1 naming each deviation).
        #[arg(long)]
        allow_off_spec: bool,
        /// Also fail marginal passes (a timing criterion closer to its threshold than twice the
        /// larger CV of its two medians).
        #[arg(long)]
        strict: bool,
    },
    /// Train the MTP model of an SC-002 scenario (main model + D modules) and save a checkpoint.
    Train {
        /// MTP scenario file (default: the shipped SC-002 scenario).
        #[arg(long, value_name = "FILE")]
        scenario: Option<PathBuf>,
        /// Checkpoint cache folder (default: $DSOPT_CACHE, else ~/.cache/dsopt).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Check a DeepSeek checkpoint against reference logits made with transformers
    /// (scripts/make_reference.py): naive and absorbed MLA, full forward and cached decode.
    /// Exit 0 every path within tolerance, 1 one is not, 2 bad input.
    Verify {
        /// Checkpoint folder (config.json + model.safetensors or shards with their index).
        #[arg(long, value_name = "DIR")]
        model: String,
        /// Reference file: input_ids [B, S] (int64) and logits [B, S, V] (float32).
        #[arg(long, value_name = "FILE")]
        reference: PathBuf,
        /// Keep the first N layers (default: the layers the reference was made with).
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// Numeric type of the run (default: the checkpoint's, else f32).
        #[arg(long, value_enum)]
        dtype: Option<dsopt::config::Dtype>,
        /// Backend (default flex: the CPU).
        #[arg(long, value_enum, default_value_t = BackendChoice::Flex)]
        backend: BackendChoice,
        /// What goes to stdout: a table, or JSON.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Parse and validate scenario files without running them.
    Validate {
        /// Scenario files or directories.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
    },
}

/// Options shared by `bench` and `run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Backend: auto picks CUDA, else a wgpu hardware adapter, else flex (CPU).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Output folder for reports.
    #[arg(long, value_name = "DIR", default_value = "reports")]
    pub out: PathBuf,
    /// What goes to stdout: the verdict table, or JSON only (the report; for `run` the summary,
    /// for a sweep the sweep).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Scenario overrides from the command line.
#[derive(Args, Debug, Clone, Default)]
pub struct OverrideArgs {
    /// Sequence length (MLA run.seq, MTP and model run.new_tokens, MoE run.prefill_seq,
    /// calibrate size).
    /// `dsopt bench` sweeps a comma-separated list: --seq 1024,2048,4096,8192.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub seq: Vec<usize>,
    /// Batch size (MLA/MTP/model run.batch, MoE run.decode_batch, calibrate batch).
    /// `dsopt bench` sweeps a comma-separated list: --batch 1,8,32.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub batch: Vec<usize>,
    /// Warm-up runs.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed repetitions.
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// MTP training corpus: a file or folder of text (default: the Rust sources of dsopt's
    /// locked dependencies in the cargo registry).
    #[arg(long, value_name = "PATH")]
    pub corpus: Option<PathBuf>,
    /// MTP training steps.
    #[arg(long, value_name = "N")]
    pub train_steps: Option<usize>,
    /// An MTP checkpoint folder to use as is (no training, no corpus needed).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Numeric type of the run (parameters, KV cache, activations): f32 everywhere; f16 on the
    /// CPU backend (flex), on wgpu adapters with SHADER_F16 and on CUDA; bf16 on flex and CUDA.
    /// Replaces the scenario's `run.dtype` (`optimization.dtype` for model scenarios). Softmax
    /// statistics stay f32.
    #[arg(long, value_enum)]
    pub dtype: Option<dsopt::config::Dtype>,
    /// An OptimizationConfig file (an `[optimization]` table, or its bare keys) that replaces
    /// the `[optimization]` section of a `model` scenario.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A DeepSeek model: a built-in preset (deepseek-v2-lite, deepseek-v2, deepseek-v3,
    /// moonlight-16b-a3b; `dsopt info` lists them) or a checkpoint folder (config.json, and
    /// safetensors for its weights). `mla`: its dimensions, random weights; `moe`: the
    /// checkpoint's own MoE model when the folder has weights, else random; `mtp`: a checkpoint
    /// with an MTP layer (its weights). Replaces the scenario's own `[model] preset` / `path`.
    #[arg(long, value_name = "NAME|DIR")]
    pub model: Option<String>,
    /// Prompt token ids for `bench mtp --model DIR` (one prompt per line, ids separated by
    /// spaces or commas, or a JSON array of arrays); without it the prompts are random ids.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt_text")]
    pub prompts: Option<PathBuf>,
    /// Prompts as text for `bench mtp|moe --model DIR`: one prompt per non-empty line, made into
    /// token ids by the checkpoint's own tokenizer.json (as transformers' tokenizer does, BOS
    /// included).
    #[arg(long, value_name = "FILE")]
    pub prompt_text: Option<PathBuf>,
    /// Keep the first N layers of the model (--model, or the scenario's [model] preset/path);
    /// the dense layers stay first.
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// Rebuild a cached artefact even when a matching one exists: `train` trains the MTP
    /// checkpoint again; `bench moe` (and `run`) on the CPU rewrites the expert file of
    /// SC-003b's storage offload.
    #[arg(long)]
    pub force: bool,
}

/// stdout format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A verdict table.
    Table,
    /// The report JSON only.
    Json,
    /// Nothing on stdout (used inside compare and sweeps, which print their own tables).
    #[value(skip)]
    Silent,
}

/// Parses the command line, runs it, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // a DSOPT_SIMD the CPU cannot run is a usage error before any kernel runs
    if let Err(e) = dsopt::kernels::Level::from_env() {
        eprintln!("error: {e}");
        return 2;
    }
    match commands::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            dsopt::error::exit_code_of(&e)
        }
    }
}
