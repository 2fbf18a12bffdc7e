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
