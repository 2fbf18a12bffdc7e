//! `dsopt info`: the tool, the backends compiled in and usable here, the machine.

use serde::Serialize;

use dsopt::backend;
use dsopt::backend::machine::{MachineInfo, ToolInfo};
use dsopt::error::EXIT_PASS;
use dsopt::monitor::progress;
use dsopt::report;

#[derive(Serialize)]
struct InfoOut {
    tool: ToolInfo,
    backends: Vec<backend::BackendStatus>,
    default_backend: Option<String>,
    machine: MachineInfo,
    presets: Vec<PresetOut>,
}

/// One built-in model preset (`--model NAME`), with figures computed from its configuration.
#[derive(Serialize)]
struct PresetOut {
    name: &'static str,
    title: &'static str,
    layers: usize,
    params_total: u128,
    params_active: u128,
    params_mtp: u128,
    weights_bf16_bytes: u128,
    kv_cache_latent_elements_per_token_layer: usize,
    kv_cache_mha_elements_per_token_layer: usize,
}

fn presets() -> Vec<PresetOut> {
    dsopt::checkpoint::PRESETS
        .iter()
        .map(|p| {
            let c = p.config();
            let n = c.param_count();
            PresetOut {
                name: p.name,
                title: p.title,
                layers: c.num_hidden_layers,
                params_total: n.total,
                params_active: n.active,
                params_mtp: n.mtp,
                weights_bf16_bytes: c.weight_bytes(dsopt::config::Dtype::Bf16),
                kv_cache_latent_elements_per_token_layer: c.latent_cache_elements(),
                kv_cache_mha_elements_per_token_layer: c.mha_cache_elements(),
            }
        })
        .collect()
}

/// A condensed terminal table with these column headers.
fn new_table(header: Vec<&str>) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(header);
    t
}

pub(super) fn info(json: bool, quiet: bool) -> anyhow::Result<i32> {
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
        presets: presets(),
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
    let mut table = new_table(vec![
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
        "machine: {} · {} cores · SIMD {} · {} RAM · {}",
        m.cpu,
        m.cores,
        m.simd.as_deref().unwrap_or("?"),
        report::write::bytes_h(Some(m.ram_bytes)),
        m.os
    );
    if m.gpus.is_empty() {
        println!("GPUs: none found (NVML absent, no hardware wgpu adapter)");
    }
    let mut presets = new_table(vec![
        "--model preset",
        "layers",
        "params total / active",
        "bf16 weights",
        "KV per token·layer: latent / MHA",
    ]);
    let b = |x: u128| format!("{:.1}B", x as f64 / 1e9);
    for p in &out.presets {
        presets.add_row(vec![
            format!("{} ({})", p.name, p.title),
            p.layers.to_string(),
            format!("{} / {}", b(p.params_total), b(p.params_active)),
            report::write::bytes_h(Some(p.weights_bf16_bytes as u64)),
            format!(
                "{} / {}",
                p.kv_cache_latent_elements_per_token_layer, p.kv_cache_mha_elements_per_token_layer
            ),
        ]);
    }
    println!("{presets}");
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
