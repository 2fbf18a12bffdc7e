//! 训练语料：字节级分词（vocab 256），离线可得。
//!
//! 默认语料是本机 cargo 注册表里 dsopt 自己依赖（`Cargo.lock` 钉住版本）的 Rust 源码：凡是
//! 编译过 dsopt 的机器都有，不需要下载。用户可用 `--corpus` 指向任意文件或目录。按文件划分
//! 训练集与留出集（由路径的哈希决定，可复现），评估只用留出集。

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The lock file dsopt was built with: names and versions of the default corpus crates.
const CARGO_LOCK: &str = include_str!("../../Cargo.lock");

/// Bytes read from one crate at most (the corpus samples many crates, not the first few).
const PER_CRATE_BYTES: usize = 256 * 1024;

/// 语料：训练与留出两部分的字节，以及它的来源说明。
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Training bytes (files concatenated, each followed by a newline).
    pub train: Vec<u8>,
    /// Held-out bytes (files never seen in training).
    pub heldout: Vec<u8>,
    /// Where it came from, for reports.
    pub description: String,
    /// Files read.
    pub files: usize,
}

/// `$CARGO_HOME/registry/src` (or `~/.cargo/registry/src`).
fn registry_src() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("registry").join("src");
    p.is_dir().then_some(p)
}

/// `name-version` of every registry package in the embedded `Cargo.lock`.
fn locked_packages() -> Vec<String> {
    let mut out = Vec::new();
    let mut name = None;
    for line in CARGO_LOCK.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ") {
            if let Some(n) = name.take() {
                out.push(format!("{n}-{}", v.trim_matches('"')));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Text files under `dir` (`.rs` only when `rust_only`), sorted, recursively.
fn files_under(dir: &Path, rust_only: bool, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, rust_only, out);
        } else if !rust_only || p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// FNV-1a of a path: decides the held-out split, stable across machines for the same layout.
fn path_hash(p: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.to_string_lossy().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Loads a corpus of at most `max_bytes`: `path` (a file or folder, every text file in it), or
/// by default the Rust sources of dsopt's locked dependencies in the cargo registry.
pub fn load(
    path: Option<&Path>,
    holdout_fraction: f64,
    max_bytes: usize,
) -> anyhow::Result<Corpus> {
    let mut files = Vec::new();
    let mut per_crate = usize::MAX;
    let mut root = PathBuf::new();
    let description;
    match path {
        Some(p) if p.is_file() => {
            files.push((0, p.to_path_buf()));
            description = format!("file {}", p.display());
        }
        Some(p) if p.is_dir() => {
            let mut found = Vec::new();
            files_under(p, false, &mut found);
            files.extend(found.into_iter().map(|f| (0, f)));
            root = p.to_path_buf();
            description = format!("folder {}", p.display());
        }
        Some(p) => bail!(
            "corpus {} does not exist — pass --corpus with an existing file or folder",
            p.display()
        ),
        None => {
            let Some(src) = registry_src() else {
                bail!(
                    "no cargo registry sources found under $CARGO_HOME/registry/src — build dsopt \
                     with cargo first (it fetches them) or pass --corpus DIR"
                );
            };
            let mut crates = 0;
            let mut regs: Vec<PathBuf> = std::fs::read_dir(&src)
                .with_context(|| format!("reading {}", src.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            regs.sort();
            for pkg in locked_packages() {
                if let Some(dir) = regs.iter().map(|r| r.join(&pkg)).find(|d| d.is_dir()) {
                    let mut found = Vec::new();
                    files_under(&dir, true, &mut found);
                    crates += usize::from(!found.is_empty());
                    files.extend(found.into_iter().map(|f| (crates, f)));
                }
            }
            per_crate = PER_CRATE_BYTES;
            root = src.clone();
            description = format!(
                "Rust sources of {crates} crates pinned by dsopt's Cargo.lock in {} (at most {} KiB per crate)",
                src.display(),
                PER_CRATE_BYTES / 1024
            );
        }
    }
    let every = if holdout_fraction > 0.0 {
        (1.0 / holdout_fraction).round().max(2.0) as u64
    } else {
        u64::MAX
    };
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    let mut used = 0;
    let mut crate_bytes = std::collections::HashMap::<usize, usize>::new();
    for (group, f) in &files {
        if train.len() + heldout.len() >= max_bytes {
            break;
        }
        let taken = crate_bytes.entry(*group).or_default();
        if *taken >= per_crate {
            continue;
        }
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        if bytes.is_empty() || std::str::from_utf8(&bytes).is_err() {
            continue; // binary files are not text
        }
        *taken += bytes.len();
        used += 1;
        // split by the path below the corpus root: the same on every machine
        let dst = if path_hash(f.strip_prefix(&root).unwrap_or(f)).is_multiple_of(every) {
            &mut heldout
        } else {
            &mut train
        };
        dst.extend_from_slice(&bytes);
        dst.push(b'\n');
    }
    if train.is_empty() || heldout.is_empty() {
        bail!(
            "corpus ({description}) gave {} training and {} held-out bytes: it needs text files in \
             both splits — point --corpus at a larger folder or raise holdout_fraction",
            train.len(),
            heldout.len()
        );
    }
    Ok(Corpus {
        description: format!(
            "{description}: {used} files, {} bytes for training, {} held out",
            train.len(),
            heldout.len()
        ),
        train,
        heldout,
        files: used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_lists_burn() {
        assert!(locked_packages()
            .iter()
            .any(|p| p.starts_with("burn-tensor-")));
    }

    #[test]
    fn a_folder_splits_by_file_and_respects_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(
                dir.path().join(format!("f{i:02}.txt")),
                format!("file {i}\n"),
            )
            .unwrap();
        }
        let c = load(Some(dir.path()), 0.2, 1 << 20).unwrap();
        assert!(!c.train.is_empty() && !c.heldout.is_empty());
        assert_eq!(c.files, 40);
        let capped = load(Some(dir.path()), 0.2, 50).unwrap_or_else(|e| panic!("{e}"));
        assert!(capped.train.len() + capped.heldout.len() < 80);
    }

    #[test]
    fn a_missing_corpus_names_the_fix() {
        let e = load(Some(Path::new("/no/such/corpus")), 0.1, 100).unwrap_err();
        assert!(e.to_string().contains("--corpus"), "{e}");
    }
}
