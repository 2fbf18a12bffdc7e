//! 路由专家放在存储上（CPU 上的 SC-003b）：专家权重写进一个 safetensors 格式的文件，运行时按需用
//! 定位读（Linux 上 O_DIRECT，绕过页缓存）读进一个容量由预算决定的缓存（按层的循环淘汰：先丢下一次用到最晚的那一层已用完的专家，同层按 LRU）；每个专家的字节带
//! CRC32 校验，读入时验证。预取模式下，读在后台线程上进行：本层要用而不在缓存里的专家按使用顺序
//! 先排队，接着是用下一个 MoE 层的门控在本层输入上猜出的专家（与设备卸载同一个预门控），读与本层
//! 计算重叠。缓存、预取只改变哪些专家在内存里、何时读入，不改变计算：每个专家在内核模块里按专家
//! 序号依次算它的那几行并累加（[`crate::kernels::moe::expert_rows`] / `accumulate`），与全部驻留的
//! 孪生模型逐位相同。
//!
//! # File
//! A safetensors file written by dsopt (`experts-<key>.safetensors` in the cache folder): for each
//! MoE layer `l` (the model's layer index) and routed expert `e`, three tensors
//! `experts.<l>.<e>.w1|w2|w3` in Burn's `[d_in, d_out]` layout (`w1`, `w3` `[hidden, inter]`,
//! `w2` `[inter, hidden]`), one expert's three contiguous, in that order; the metadata holds the
//! format tag, the model key, and one CRC32 per expert. The header is padded with spaces so the
//! data starts on a 4096-byte boundary. The layout is dsopt's own (what the CPU kernel reads
//! without a transposed copy), named so that no one mistakes it for a Hugging Face checkpoint.
//! Written to `<name>.partial` and renamed when complete (checksums in place, synced), under an
//! exclusive lock on `<name>.lock`: an interrupted write never leaves a file a later run trusts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use half::{bf16, f16};
use serde_json::{json, Value};

use crate::config::Dtype;
use crate::error::DsoptError;
use crate::kernels::convert::Elems;
use crate::kernels::moe::Expert;

/// The format tag in the file's metadata.
pub const FORMAT: &str = "dsopt-experts/1";
/// The data starts on a multiple of this (O_DIRECT's alignment on Linux block devices).
pub const ALIGN: usize = 4096;

/// What an expert file holds: the MoE layers (model layer indices), routed experts per layer,
/// their shape and dtype, and the seed their random weights were drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertFileSpec {
    /// The model's layer indices that have routed experts.
    pub layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Hidden size.
    pub dim: usize,
    /// An expert's intermediate size.
    pub inter: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Seed of the weights (random ones, when `origin` is `None`).
    pub seed: u64,
    /// Where the weights come from when they are not random: a checkpoint's identity (its
    /// folder and every file's name, size and modification time), part of the file's key.
    pub origin: Option<String>,
}

impl ExpertFileSpec {
    /// Elements of one of an expert's three matrices.
    fn matrix_elems(&self) -> usize {
        self.dim * self.inter
    }

    /// Bytes of one expert (three matrices).
    pub fn expert_bytes(&self) -> u64 {
        (3 * self.matrix_elems() * self.dtype.bytes()) as u64
    }

    /// Bytes of every routed expert.
    pub fn data_bytes(&self) -> u64 {
        self.expert_bytes() * (self.layers.len() * self.n_experts) as u64
    }

    /// A hash of everything the weights depend on (FNV-1a over the description).
    pub fn key(&self) -> String {
        let mut text = format!(
            "{FORMAT}|{:?}|{}|{}|{}|{}|{}",
            self.layers,
            self.n_experts,
            self.dim,
            self.inter,
            self.dtype.as_str(),
            self.seed
        );
        if let Some(o) = &self.origin {
            text.push_str(&format!("|from {o}"));
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The file's name in the cache folder.
    pub fn file_name(&self) -> String {
        format!("experts-{}.safetensors", self.key())
    }

    /// The index of model layer `layer` among the MoE layers.
    fn slot(&self, layer: usize) -> Option<usize> {
        self.layers.iter().position(|&l| l == layer)
    }

    /// The header JSON with the given checksums (hex, 8 characters per expert, layer-major),
    /// padded with spaces so that 8 + its length is a multiple of [`ALIGN`].
    fn header(&self, crcs: &str) -> Vec<u8> {
        let st = match self.dtype {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
        };
        let mut map = serde_json::Map::new();
        map.insert(
            "__metadata__".into(),
            json!({
                "format": FORMAT,
                "key": self.key(),
                "layout": "burn [d_in, d_out]: w1, w3 [hidden, inter]; w2 [inter, hidden]",
                "crc32": crcs,
            }),
        );
        let m = (self.matrix_elems() * self.dtype.bytes()) as u64;
        let mut at = 0u64;
        for &l in &self.layers {
            for e in 0..self.n_experts {
                for (w, shape) in [
                    ("w1", [self.dim, self.inter]),
                    ("w2", [self.inter, self.dim]),
                    ("w3", [self.dim, self.inter]),
                ] {
                    map.insert(
                        format!("experts.{l}.{e}.{w}"),
                        json!({"dtype": st, "shape": shape, "data_offsets": [at, at + m]}),
                    );
                    at += m;
                }
            }
        }
        let mut text = serde_json::to_vec(&Value::Object(map)).expect("JSON of plain values");
        let pad = (ALIGN - (8 + text.len()) % ALIGN) % ALIGN;
        text.resize(text.len() + pad, b' ');
        text
    }

    /// Expert `(slot, e)`'s weights as stored: `w1`, `w2`, `w3` drawn from [`crate::rng::uniform`]
    /// scaled by `1/sqrt(d_in)` (the bound of Burn's default `Linear` initialisation), in the
    /// file's dtype, little-endian.
    pub fn expert_bytes_of(&self, slot: usize, e: usize) -> Vec<u8> {
        let n = self.matrix_elems();
        let base = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(((slot * self.n_experts + e) as u64) * 3);
        let mut out = Vec::with_capacity(self.expert_bytes() as usize);
        for (i, fan_in) in [self.dim, self.inter, self.dim].into_iter().enumerate() {
            let scale = 1.0 / (fan_in as f32).sqrt();
            let v = crate::rng::uniform(n, base.wrapping_add(i as u64));
            match self.dtype {
                Dtype::F32 => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&(x * scale).to_le_bytes())),
                Dtype::F16 => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&f16::from_f32(x * scale).to_le_bytes())),
                Dtype::Bf16 => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&bf16::from_f32(x * scale).to_le_bytes())),
            }
        }
        out
    }
}

/// How long writing the file took, and its size.
#[derive(Debug, Clone, Copy)]
pub struct WriteSummary {
    /// Bytes written.
    pub bytes: u64,
    /// Seconds.
    pub seconds: f64,
}

/// A file that is truncated, foreign, or fails a checksum: bad input (exit 2), naming the file,
/// what is wrong and what to do.
fn bad(path: &Path, message: impl Into<String>) -> DsoptError {
    DsoptError::Model {
        source_name: format!("expert file {}", path.display()),
        key: None,
        message: message.into(),
        fix: "delete it (the next run writes it again) or rerun with --force".into(),
    }
}

/// Free bytes on the file system holding `dir` (`None` where it cannot be asked).
pub fn free_disk_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type; statvfs
        // writes it completely when it returns 0, and we read it only then.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: rc == 0, so statvfs filled the structure.
        let st = unsafe { st.assume_init() };
        // the field types differ between platforms (u32 on some 32-bit ones)
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// An exclusive lock on `path` (created if missing), held until dropped; released by the OS if
/// the process dies, so a crashed run never leaves a lock behind.
struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    fn acquire(path: &Path) -> anyhow::Result<FileLock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("creating the lock file {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                bail!(
                    "locking {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(FileLock(f))
    }
}

/// The expert file for `spec` in `dir`: opened when a valid one is there (unless `force`),
/// else written first (progress on stderr when `progress`), under a lock so that two runs never
/// write it at once. Returns the open file and, when it was written in this call, how long that
/// took. A file at the path that is not valid is an error (never silently rewritten, never
/// trusted) unless `force`.
pub fn ensure(
    dir: &Path,
    spec: &ExpertFileSpec,
    force: bool,
    progress: bool,
) -> anyhow::Result<(ExpertFile, Option<WriteSummary>)> {
    ensure_with(dir, spec, force, progress, &|s, e| {
        Ok(spec.expert_bytes_of(s, e))
    })
}

/// Expert `(slot, e)`'s bytes as the file stores them ([`ExpertFileSpec::expert_bytes_of`]'s
/// layout): what a file is written from.
pub type ExpertBytes<'a> = dyn Fn(usize, usize) -> anyhow::Result<Vec<u8>> + Sync + 'a;

/// [`ensure`] with the experts' bytes from `experts` (a checkpoint's, say) when the file is
/// written.
pub fn ensure_with(
    dir: &Path,
    spec: &ExpertFileSpec,
    force: bool,
    progress: bool,
    experts: &ExpertBytes<'_>,
) -> anyhow::Result<(ExpertFile, Option<WriteSummary>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(spec.file_name());
    let _lock = FileLock::acquire(&dir.join(format!("{}.lock", spec.file_name())))?;
    if path.exists() && !force {
        return Ok((ExpertFile::open(&path, spec)?, None));
    }
    let need = spec.data_bytes()
        + spec
            .header(&"0".repeat(8 * spec.layers.len() * spec.n_experts))
            .len() as u64
        + 8;
    if let Some(free) = free_disk_bytes(dir) {
        if free < need + (64 << 20) {
            return Err(DsoptError::CannotRun(format!(
                "the expert file {} needs {need} bytes ({:.2} GiB) and {} has {free} bytes free \
                 (plus a 64 MiB margin): free space there or set DSOPT_CACHE to a folder on a \
                 larger disk",
                path.display(),
                need as f64 / (1u64 << 30) as f64,
                dir.display()
            ))
            .into());
        }
    }
    let summary = write(&path, spec, progress, experts)?;
    Ok((ExpertFile::open(&path, spec)?, Some(summary)))
}

/// Writes the expert file for `spec` at `path` (through `<path>.partial`, renamed when complete;
/// the partial file is removed on any error, a full disk included).
pub fn write(
    path: &Path,
    spec: &ExpertFileSpec,
    progress: bool,
    experts: &ExpertBytes<'_>,
) -> anyhow::Result<WriteSummary> {
    let tmp = path.with_extension("safetensors.partial");
    let t0 = Instant::now();
    let r = write_to(&tmp, spec, progress, experts);
    let r = r.and_then(|bytes| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(bytes)
    });
    match r {
        Ok(bytes) => Ok(WriteSummary {
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let full = e
                .chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(|io| io.raw_os_error() == Some(28)); // ENOSPC
            if full {
                Err(DsoptError::CannotRun(format!(
                    "no space left writing the expert file {} ({} bytes); the partial file was \
                     removed: free space or set DSOPT_CACHE to a folder on a larger disk",
                    path.display(),
                    spec.data_bytes()
                ))
                .into())
            } else {
                Err(e)
            }
        }
    }
}

fn write_to(
    tmp: &Path,
    spec: &ExpertFileSpec,
    progress: bool,
    experts: &ExpertBytes<'_>,
) -> anyhow::Result<u64> {
    use rayon::prelude::*;
    let n = spec.layers.len() * spec.n_experts;
    let mut f = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let header = spec.header(&"0".repeat(8 * n));
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(&header)?;
    let bar = crate::monitor::progress::bar(progress, spec.data_bytes(), "writing experts");
    let mut crcs = String::with_capacity(8 * n);
    let chunk = 2 * rayon::current_num_threads().max(1);
    let all: Vec<(usize, usize)> = (0..spec.layers.len())
        .flat_map(|s| (0..spec.n_experts).map(move |e| (s, e)))
        .collect();
    let mut out = std::io::BufWriter::with_capacity(8 << 20, f);
    for part in all.chunks(chunk) {
        let bufs: Vec<Vec<u8>> = part
            .par_iter()
            .map(|&(s, e)| {
                let b = experts(s, e)?;
                anyhow::ensure!(
                    b.len() as u64 == spec.expert_bytes(),
                    "expert {e} of layer {}: {} bytes where the file stores {}",
                    spec.layers[s],
                    b.len(),
                    spec.expert_bytes()
                );
                Ok(b)
            })
            .collect::<anyhow::Result<_>>()?;
        for b in &bufs {
            crcs.push_str(&format!("{:08x}", crc32fast::hash(b)));
            out.write_all(b)
                .with_context(|| format!("writing {}", tmp.display()))?;
            bar.inc(b.len() as u64);
        }
    }
    bar.finish_and_clear();
    let mut f = out
        .into_inner()
        .map_err(|e| anyhow!("writing {}: {}", tmp.display(), e.error()))?;
    let real = spec.header(&crcs);
    assert_eq!(real.len(), header.len(), "fixed-width checksums");
    f.seek(SeekFrom::Start(8))?;
    f.write_all(&real)?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    Ok(8 + header.len() as u64 + spec.data_bytes())
}

/// An open expert file: its layout checked against the spec, its per-expert checksums, and a
/// read handle that bypasses the page cache where the file system allows it.
#[derive(Debug)]
pub struct ExpertFile {
    path: PathBuf,
    spec: ExpertFileSpec,
    file: File,
    direct: bool,
    data_start: u64,
    crcs: Vec<u32>,
}

impl ExpertFile {
    /// Opens and checks `path` against `spec`: a dsopt expert file, made for this model (key),
    /// with the expected tensors, and exactly as long as its header says (a truncated or foreign
    /// file is bad input, exit 2).
    pub fn open(path: &Path, spec: &ExpertFileSpec) -> anyhow::Result<ExpertFile> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len();
        let mut n8 = [0u8; 8];
        std::io::Read::read_exact(&mut f, &mut n8).map_err(|_| {
            bad(
                path,
                format!("{len} bytes: too short for a safetensors header"),
            )
        })?;
        let hlen = u64::from_le_bytes(n8);
        if hlen > len.saturating_sub(8) || hlen > (1 << 30) {
            return Err(bad(
                path,
                format!("header length {hlen} does not fit a file of {len} bytes"),
            )
            .into());
        }
        let mut h = vec![0u8; hlen as usize];
        std::io::Read::read_exact(&mut f, &mut h)?;
        let mut got: Value = serde_json::from_slice(&h)
            .map_err(|e| bad(path, format!("the header is not JSON: {e}")))?;
        let meta = got.get("__metadata__").cloned().unwrap_or(Value::Null);
        if meta.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(bad(
                path,
                format!(
                    "not a dsopt expert file (format {:?}, expected {FORMAT})",
                    meta.get("format")
                ),
            )
            .into());
        }
        let key = meta.get("key").and_then(Value::as_str).unwrap_or("");
        if key != spec.key() {
            return Err(bad(
                path,
                format!(
                    "made for another model (key {key}, this run's model has {})",
                    spec.key()
                ),
            )
            .into());
        }
        let n = spec.layers.len() * spec.n_experts;
        let crc_text = meta
            .get("crc32")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let want: Value = serde_json::from_slice(&spec.header(&crc_text)).expect("own header");
        if let Some(m) = got.get_mut("__metadata__") {
            m["crc32"] = Value::String(crc_text.clone());
        }
        if got != want || crc_text.len() != 8 * n || h.len() != spec.header(&crc_text).len() {
            return Err(bad(path, "its tensors are not the layout this model needs").into());
        }
        let crcs = (0..n)
            .map(|i| u32::from_str_radix(&crc_text[8 * i..8 * i + 8], 16))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| bad(path, "a checksum in the header is not hexadecimal"))?;
        let data_start = 8 + hlen;
        let expected = data_start + spec.data_bytes();
        if len != expected {
            return Err(bad(
                path,
                format!(
                    "{len} bytes where its header describes {expected}: truncated or appended to"
                ),
            )
            .into());
        }
        let (file, direct) = open_direct(path)?;
        Ok(ExpertFile {
            path: path.to_path_buf(),
            spec: spec.clone(),
            file,
            direct,
            data_start,
            crcs,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it holds.
    pub fn spec(&self) -> &ExpertFileSpec {
        &self.spec
    }

    /// Whether reads bypass the page cache (O_DIRECT); `false` where the file system refused it
    /// (tmpfs, other systems): reads then may come from the page cache, and the report says so.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Reads expert `e` of model layer `layer`, verifying its checksum.
    pub fn read(&self, layer: usize, e: usize) -> anyhow::Result<ExpertBuf> {
        let s = &self.spec;
        let slot = s.slot(layer).filter(|_| e < s.n_experts).ok_or_else(|| {
            anyhow!(
                "expert {e} of layer {layer} is not in {}",
                self.path.display()
            )
        })?;
        let i = slot * s.n_experts + e;
        let at = self.data_start + i as u64 * s.expert_bytes();
        let buf = self.read_span(at, s.expert_bytes() as usize)?;
        let crc = crc32fast::hash(buf.bytes());
        if crc != self.crcs[i] {
            return Err(bad(
                &self.path,
                format!(
                    "expert {e} of layer {layer} fails its checksum (crc32 {crc:08x}, header \
                     {:08x}): the file is corrupt",
                    self.crcs[i]
                ),
            )
            .into());
        }
        Ok(ExpertBuf {
            span: buf,
            dtype: s.dtype,
            dim: s.dim,
            inter: s.inter,
        })
    }

    /// `len` bytes at `at`: an aligned read covering them (O_DIRECT needs offset, length and
    /// buffer on [`ALIGN`] boundaries), into a buffer whose bytes `at..at + len` are returned.
    fn read_span(&self, at: u64, len: usize) -> anyhow::Result<Span> {
        let a0 = at / ALIGN as u64 * ALIGN as u64;
        let end = at + len as u64;
        let a1 = end.div_ceil(ALIGN as u64) * ALIGN as u64;
        let n = (a1 - a0) as usize;
        let mut raw = vec![0u8; n + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        let dst = &mut raw[off..off + n];
        let mut done = 0usize;
        while done < n {
            let got = read_at(&self.file, &mut dst[done..], a0 + done as u64)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if got == 0 {
                break; // end of file (the last block is short)
            }
            done += got;
        }
        if (done as u64) < end - a0 {
            return Err(bad(
                &self.path,
                format!(
                    "ended at byte {} while reading {len} bytes at {at}: truncated",
                    a0 + done as u64
                ),
            )
            .into());
        }
        Ok(Span {
            raw,
            at: off + (at - a0) as usize,
            len,
        })
    }

    /// A sequential read of up to `max` bytes of the file's data in 4 MiB requests, the same kind
    /// of reads as the experts' (page-cache-bypassing where [`ExpertFile::direct`]): the storage
    /// read rate (bytes/s) that the offloaded run is set against.
    pub fn sequential_read_rate(&self, max: u64) -> anyhow::Result<f64> {
        let chunk = 4usize << 20;
        let total = self.spec.data_bytes().min(max);
        let t0 = Instant::now();
        let mut at = self.data_start;
        let mut read = 0u64;
        while read < total {
            let n = chunk.min((total - read) as usize);
            let s = self.read_span(at, n)?;
            std::hint::black_box(s.bytes()[0]);
            at += n as u64;
            read += n as u64;
        }
        Ok(read as f64 / t0.elapsed().as_secs_f64().max(1e-9))
    }
}

/// Opens `path` for reading with O_DIRECT where the OS and file system allow it.
fn open_direct(path: &Path) -> anyhow::Result<(File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            // some file systems accept the flag at open and refuse the read: try one block
            let mut probe = vec![0u8; 2 * ALIGN];
            let off = probe.as_ptr().align_offset(ALIGN);
            if read_at(&f, &mut probe[off..off + ALIGN], 0).is_ok() {
                return Ok((f, true));
            }
        }
    }
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok((f, false))
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, at)
}

#[cfg(windows)]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(f, buf, at)
}

/// Bytes read into an aligned buffer.
#[derive(Debug)]
struct Span {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl Span {
    fn bytes(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
}

/// One expert's weights in memory, as read from the file.
#[derive(Debug)]
pub struct ExpertBuf {
    span: Span,
    dtype: Dtype,
    dim: usize,
    inter: usize,
}

impl ExpertBuf {
    /// Bytes held (the aligned buffer).
    pub fn held_bytes(&self) -> usize {
        self.span.raw.len()
    }

    /// The weights as the kernel reads them.
    pub fn expert(&self) -> Expert<'_> {
        let m = self.dim * self.inter * self.dtype.bytes();
        let b = self.span.bytes();
        let view = |i: usize| -> Elems<'_> {
            let s = &b[i * m..(i + 1) * m];
            match self.dtype {
                Dtype::F32 => Elems::F32(bytemuck::cast_slice(s)),
                Dtype::F16 => Elems::F16(bytemuck::cast_slice(s)),
                Dtype::Bf16 => Elems::Bf16(bytemuck::cast_slice(s)),
            }
        };
        Expert {
            w1: view(0),
            w2: view(1),
            w3: view(2),
        }
    }

    /// The three matrices as f32 values (tests, and the resident twin's Burn model).
    pub fn to_f32(&self) -> [Vec<f32>; 3] {
        let e = self.expert();
        [e.w1, e.w2, e.w3].map(|w| match w {
            Elems::F32(s) => s.to_vec(),
            Elems::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
            Elems::Bf16(s) => s.iter().map(|x| x.to_f32()).collect(),
        })
    }
}

/// Where a streamed MoE layer gets its routed experts: from storage through a cache
/// ([`StreamedExperts`]), or all in memory ([`ResidentExperts`], the twin).
pub trait ExpertSource {
    /// A layer starts: `order` are the experts it will use, in that order; `next` the following
    /// MoE layer and its experts predicted from this layer's input (read ahead when prefetching).
    fn begin_layer(&mut self, layer: usize, order: &[usize], next: Option<(usize, Vec<usize>)>);
    /// Expert `e` of model layer `layer`.
    fn get(&mut self, layer: usize, e: usize) -> anyhow::Result<Arc<ExpertBuf>>;
    /// Whether this source reads ahead (then the layer computes the next layer's prediction).
    fn prefetching(&self) -> bool;
}

/// Every routed expert in memory: the resident twin of a streamed model.
#[derive(Debug)]
pub struct ResidentExperts {
    layers: HashMap<usize, Vec<Arc<ExpertBuf>>>,
}

impl ResidentExperts {
    /// Reads every expert of `file` into memory.
    pub fn load(file: &ExpertFile) -> anyhow::Result<ResidentExperts> {
        let s = file.spec();
        let mut layers = HashMap::new();
        for &l in &s.layers {
            let v = (0..s.n_experts)
                .map(|e| file.read(l, e).map(Arc::new))
                .collect::<anyhow::Result<Vec<_>>>()?;
            layers.insert(l, v);
        }
        Ok(ResidentExperts { layers })
    }
}

impl ExpertSource for ResidentExperts {
    fn begin_layer(&mut self, _: usize, _: &[usize], _: Option<(usize, Vec<usize>)>) {}

    fn get(&mut self, layer: usize, e: usize) -> anyhow::Result<Arc<ExpertBuf>> {
        self.layers
            .get(&layer)
            .and_then(|v| v.get(e))
            .cloned()
            .ok_or_else(|| anyhow!("no expert {e} in layer {layer}"))
    }

    fn prefetching(&self) -> bool {
        false
    }
}

/// Statistics of a streamed run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamStats {
    /// Experts found in memory when asked for.
    pub hits: u64,
    /// Experts that had to be read for their use (on demand, or read ahead for it).
    pub misses: u64,
    /// Lookups that waited for a read (on demand, or a read ahead not finished yet).
    pub waits: u64,
    /// Experts dropped from the cache to make room.
    pub evictions: u64,
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Seconds the reader thread spent reading and verifying.
    pub read_seconds: f64,
    /// Seconds the compute waited for reads.
    pub wait_seconds: f64,
    /// Experts read ahead on the next layer's prediction.
    pub prefetched: u64,
    /// Of those, used before being evicted.
    pub prefetch_used: u64,
    /// Most experts held at once (cache and reads in flight).
    pub max_resident: usize,
}

impl StreamStats {
    /// Hits over lookups.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }

    /// Prefetched experts used before eviction, over all prefetched.
    pub fn prefetch_accuracy(&self) -> Option<f64> {
        (self.prefetched > 0).then(|| self.prefetch_used as f64 / self.prefetched as f64)
    }
}

type Key = (usize, usize);
type ReadResult = (Key, anyhow::Result<ExpertBuf>, Duration);

#[derive(Debug)]
enum Slot {
    Ready {
        buf: Arc<ExpertBuf>,
        used: u64,
        /// read on the next layer's prediction, not used yet
        guess: bool,
        /// read for a use the layer announced (read ahead or on demand), not used yet: that
        /// use is a miss (it needed a read), though it may not wait
        fresh: bool,
    },
    Pending {
        guess: bool,
    },
}

/// Routed experts streamed from an [`ExpertFile`] through a cache of `capacity` experts (evicting
/// by [`StreamedExperts::victim`]: the layer that comes back last first, then LRU)
/// (reads in flight count against it), read by one background thread. Without prefetching each
/// miss is read when asked for; with it, a layer's misses are queued in the order the layer uses
/// them, then the next layer's predicted experts, so that reading overlaps computing.
pub struct StreamedExperts {
    file: Arc<ExpertFile>,
    capacity: usize,
    prefetch: bool,
    slots: HashMap<Key, Slot>,
    want: VecDeque<(Key, bool)>,
    pinned: HashSet<Key>,
    requests: Option<mpsc::Sender<Key>>,
    results: mpsc::Receiver<ReadResult>,
    reader: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
    tick: u64,
    /// The layer being computed (the last `begin_layer`).
    current: Option<usize>,
    /// Statistics since the last [`StreamedExperts::reset`].
    pub stats: StreamStats,
}

impl std::fmt::Debug for StreamedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedExperts")
            .field("file", &self.file.path())
            .field("capacity", &self.capacity)
            .field("prefetch", &self.prefetch)
            .field("stats", &self.stats)
            .finish()
    }
}

impl StreamedExperts {
    /// A cache of `capacity` experts (at least one) over `file`.
    pub fn new(file: Arc<ExpertFile>, capacity: usize, prefetch: bool) -> StreamedExperts {
        assert!(capacity > 0, "the expert cache needs room for one expert");
        let (tx, rx) = mpsc::channel::<Key>();
        let (rtx, rrx) = mpsc::channel::<ReadResult>();
        let f = file.clone();
        let reader = std::thread::Builder::new()
            .name("dsopt-expert-reader".into())
            .spawn(move || {
                for key in rx {
                    let t0 = Instant::now();
                    let r = f.read(key.0, key.1);
                    if rtx.send((key, r, t0.elapsed())).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the expert reader thread");
        StreamedExperts {
            file,
            capacity,
            prefetch,
            slots: HashMap::new(),
            want: VecDeque::new(),
            pinned: HashSet::new(),
            requests: Some(tx),
            results: rrx,
            reader: Some(reader),
            in_flight: 0,
            tick: 0,
            current: None,
            stats: StreamStats::default(),
        }
    }

    /// The file it reads.
    pub fn file(&self) -> &ExpertFile {
        &self.file
    }

    /// Experts in memory or being read now.
    pub fn resident(&self) -> usize {
        self.slots.len()
    }

    /// Empties the cache (waiting for reads in flight) and zeroes the statistics: a cold start.
    pub fn reset(&mut self) {
        let _ = self.drain();

        self.slots.clear();
        self.want.clear();
        self.pinned.clear();
        self.current = None;
        self.stats = StreamStats::default();
    }

    /// Waits for every read in flight to finish and files them (the first read error, if any).
    pub fn drain(&mut self) -> anyhow::Result<()> {
        let mut first = Ok(());
        while self.in_flight > 0 {
            if let Err(e) = self.receive() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Waits for one read to finish and files it.
    fn receive(&mut self) -> anyhow::Result<Key> {
        let t0 = Instant::now();
        let (key, r, took) = self
            .results
            .recv()
            .map_err(|_| anyhow!("the expert reader thread stopped"))?;
        self.stats.wait_seconds += t0.elapsed().as_secs_f64();
        self.in_flight -= 1;
        self.stats.read_seconds += took.as_secs_f64();
        let buf = match r {
            Ok(b) => b,
            Err(e) => {
                self.slots.remove(&key);
                return Err(e);
            }
        };
        self.stats.bytes_read += self.file.spec().expert_bytes();
        let guess = matches!(self.slots.get(&key), Some(Slot::Pending { guess: true }));
        self.tick += 1;
        self.slots.insert(
            key,
            Slot::Ready {
                buf: Arc::new(buf),
                used: self.tick,
                guess,
                fresh: !guess,
            },
        );
        Ok(key)
    }

    /// How many MoE layers ahead of the current one layer `l` comes next (decode steps visit the
    /// layers in a cycle): 1 for the next layer, the number of MoE layers for the current one
    /// (its experts that are not still needed come back only a whole step later).
    fn layers_until(&self, l: usize) -> usize {
        let layers = &self.file.spec().layers;
        let n = layers.len().max(1);
        let pos = |x: usize| layers.iter().position(|&y| y == x).unwrap_or(0);
        match self.current {
            Some(cur) => match (pos(l) + n - pos(cur)) % n {
                0 => n,
                d => d,
            },
            None => n,
        }
    }

    /// The expert to drop first, among ready experts the current layer does not still need: not
    /// an unused prediction; then the one whose layer comes back last (decode steps cycle through
    /// the layers, so plain LRU would drop exactly the experts the next layers are about to use
    /// whenever a step touches more experts than the cache holds); then the least recently used.
    fn victim(&self) -> Option<Key> {
        self.slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { used, guess, .. } if !self.pinned.contains(k) => Some((
                    (*guess, std::cmp::Reverse(self.layers_until(k.0)), *used),
                    *k,
                )),
                _ => None,
            })
            .min()
            .map(|(_, k)| k)
    }

    /// Frees one slot: [`StreamedExperts::victim`], else the needed expert used last in the
    /// layer's order. `false` when every slot is a read in flight.
    fn evict_one(&mut self, order: &[usize]) -> bool {
        let victim = self.victim().or_else(|| {
            self.slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready { .. }))
                .max_by_key(|(k, _)| order.iter().position(|&e| e == k.1))
                .map(|(k, _)| *k)
        });
        match victim {
            Some(k) => {
                self.slots.remove(&k);
                self.stats.evictions += 1;
                true
            }
            None => false,
        }
    }

    /// Issues queued reads while there is room (without evicting experts the layer still needs).
    fn issue(&mut self) {
        while let Some(&(key, guess)) = self.want.front() {
            if self.slots.contains_key(&key) {
                self.want.pop_front();
                continue;
            }
            if self.slots.len() >= self.capacity {
                match self.victim() {
                    Some(k) => {
                        self.slots.remove(&k);
                        self.stats.evictions += 1;
                    }
                    None => break,
                }
            }
            self.want.pop_front();
            self.request(key, guess);
        }
    }

    fn request(&mut self, key: Key, guess: bool) {
        self.slots.insert(key, Slot::Pending { guess });
        self.in_flight += 1;
        if guess {
            self.stats.prefetched += 1;
        }
        self.stats.max_resident = self.stats.max_resident.max(self.slots.len());
        if let Some(tx) = &self.requests {
            tx.send(key).expect("the expert reader thread is running");
        }
    }
}

impl ExpertSource for StreamedExperts {
    fn begin_layer(&mut self, layer: usize, order: &[usize], next: Option<(usize, Vec<usize>)>) {
        self.current = Some(layer);
        self.pinned = order.iter().map(|&e| (layer, e)).collect();
        // this layer's predictions that it does not use were wrong: ordinary cache entries now
        for (k, s) in self.slots.iter_mut() {
            if let Slot::Ready { guess, .. } = s {
                if k.0 == layer && !self.pinned.contains(k) {
                    *guess = false;
                }
            }
        }
        self.want.clear();
        if !self.prefetch {
            return;
        }
        self.want.extend(order.iter().map(|&e| ((layer, e), false)));
        if let Some((nl, guess)) = next {
            self.want.extend(guess.into_iter().map(|e| ((nl, e), true)));
        }
        self.issue();
    }

    fn get(&mut self, layer: usize, e: usize) -> anyhow::Result<Arc<ExpertBuf>> {
        let key = (layer, e);
        match self.slots.get(&key) {
            // read ahead for this use: a miss that did not wait
            Some(Slot::Ready { fresh: true, .. }) => self.stats.misses += 1,
            // in memory from an earlier use, or read on the next layer's prediction (a hit, as
            // on the device path)
            Some(Slot::Ready { .. }) => self.stats.hits += 1,
            Some(Slot::Pending { .. }) => {
                self.stats.misses += 1;
                self.stats.waits += 1;
                while !matches!(self.slots.get(&key), Some(Slot::Ready { .. })) {
                    self.receive()?;
                }
            }
            None => {
                self.stats.misses += 1;
                self.stats.waits += 1;
                // the layer's experts still to come, in order (the last resort of eviction)
                let mut order: Vec<usize> = self
                    .pinned
                    .iter()
                    .filter(|k| k.0 == layer)
                    .map(|k| k.1)
                    .collect();
                order.sort_unstable();
                while self.slots.len() >= self.capacity {
                    if !self.evict_one(&order) {
                        self.receive()?;
                    }
                }
                self.request(key, false);
                while !matches!(self.slots.get(&key), Some(Slot::Ready { .. })) {
                    self.receive()?;
                }
            }
        }
        self.tick += 1;
        let tick = self.tick;
        let buf = match self.slots.get_mut(&key) {
            Some(Slot::Ready {
                buf,
                used,
                guess,
                fresh,
            }) => {
                *used = tick;
                *fresh = false;
                if std::mem::take(guess) {
                    self.stats.prefetch_used += 1;
                }
                buf.clone()
            }
            _ => unreachable!("filed as ready above"),
        };
        self.pinned.remove(&key);
        self.issue();
        Ok(buf)
    }

    fn prefetching(&self) -> bool {
        self.prefetch
    }
}

impl Drop for StreamedExperts {
    fn drop(&mut self) {
        self.requests = None; // the reader's loop ends
        while self.in_flight > 0 && self.results.recv().is_ok() {
            self.in_flight -= 1;
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// A sorted map of the experts each token uses, as `(expert, [(token, weight)])` groups in
/// expert order: the kernel's unit of work (shared with `nn::moe::cpu`).
pub fn groups(experts: &[Vec<usize>], weights: &[Vec<f32>]) -> Vec<(usize, Vec<(usize, f32)>)> {
    let mut g: BTreeMap<usize, Vec<(usize, f32)>> = BTreeMap::new();
    for (tok, (es, ws)) in experts.iter().zip(weights).enumerate() {
        for (&e, &w) in es.iter().zip(ws) {
            g.entry(e).or_default().push((tok, w));
        }
    }
    g.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: Dtype, seed: u64) -> ExpertFileSpec {
        // shapes that are not multiples of a vector width
        ExpertFileSpec {
            layers: vec![1, 2],
            n_experts: 5,
            dim: 24,
            inter: 20,
            dtype,
            seed,
            origin: None,
        }
    }

    fn err_text(r: anyhow::Result<impl std::fmt::Debug>) -> (String, i32) {
        let e = r.expect_err("an error");
        (format!("{e:#}"), crate::error::exit_code_of(&e))
    }

    #[test]
    fn every_expert_reads_back_as_written_and_a_second_run_reuses_the_file() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let dir = tempfile::tempdir().unwrap();
            let s = spec(dtype, 1);
            let (f, w) = ensure(dir.path(), &s, false, false).unwrap();
            let w = w.expect("written");
            assert_eq!(w.bytes, std::fs::metadata(f.path()).unwrap().len());
            assert_eq!(f.data_start % ALIGN as u64, 0);
            for (slot, &l) in s.layers.iter().enumerate() {
                for e in 0..s.n_experts {
                    let b = f.read(l, e).unwrap();
                    assert_eq!(
                        b.span.bytes(),
                        &s.expert_bytes_of(slot, e)[..],
                        "{dtype:?} {l} {e}"
                    );
                    let [w1, w2, w3] = b.to_f32();
                    assert_eq!((w1.len(), w2.len(), w3.len()), (480, 480, 480));
                    assert!(w1.iter().all(|x| x.abs() <= 1.0 / 24f32.sqrt() + 1e-6));
                }
            }
            assert!(f.read(0, 0).is_err(), "layer 0 has no routed experts");
            assert!(f.read(1, 5).is_err());
            // no partial file or lock left that a later run would trust; the next run reuses it
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
            let (_, again) = ensure(dir.path(), &s, false, false).unwrap();
            assert!(again.is_none(), "reused");
            let (_, forced) = ensure(dir.path(), &s, true, false).unwrap();
            assert!(forced.is_some(), "--force rewrites");
        }
    }

    #[test]
    fn a_corrupt_truncated_or_foreign_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(Dtype::F32, 1);
        let (f, _) = ensure(dir.path(), &s, false, false).unwrap();
        let path = f.path().to_path_buf();
        drop(f);
        let good = std::fs::read(&path).unwrap();
        // one flipped byte inside expert 3 of layer 2 (slot 1): that expert fails its checksum
        let mut bytes = good.clone();
        let at = 8
            + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
            + (s.n_experts + 3) * s.expert_bytes() as usize
            + 17;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let f = ExpertFile::open(&path, &s).unwrap();
        assert!(f.read(2, 2).is_ok() && f.read(1, 3).is_ok());
        let (msg, code) = err_text(f.read(2, 3));
        assert!(msg.contains("checksum") && msg.contains("--force"), "{msg}");
        assert_eq!(code, crate::error::EXIT_BAD_INPUT);
        // truncated by one byte
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        let (msg, code) = err_text(ExpertFile::open(&path, &s));
        assert!(msg.contains("truncated"), "{msg}");
        assert_eq!(code, crate::error::EXIT_BAD_INPUT);
        // cut inside the header
        std::fs::write(&path, &good[..100]).unwrap();
        assert!(ExpertFile::open(&path, &s).is_err());
        // made for another model (another seed), and not an expert file at all
        std::fs::write(&path, &good).unwrap();
        let (msg, _) = err_text(ExpertFile::open(&path, &spec(Dtype::F32, 2)));
        assert!(msg.contains("another model"), "{msg}");
        std::fs::write(&path, b"\x10\0\0\0\0\0\0\0{\"a\":1}         ").unwrap();
        let (msg, code) = err_text(ExpertFile::open(&path, &s));
        assert!(msg.contains("not a dsopt expert file"), "{msg}");
        assert_eq!(code, crate::error::EXIT_BAD_INPUT);
        // the cache path itself: a broken file there is an error, not silently trusted
        let (msg, _) = err_text(ensure(dir.path(), &s, false, false));
        assert!(msg.contains("expert file"), "{msg}");
        assert!(
            ensure(dir.path(), &s, true, false).is_ok(),
            "--force rewrites it"
        );
    }

    #[test]
    fn a_cache_smaller_than_a_step_keeps_the_experts_that_come_back_soonest() {
        // two MoE layers, each step uses experts 0 and 1 of both: 4 per step, 3 slots. LRU would
        // drop each expert just before its next use (0 hits in 16 lookups); dropping first the
        // finished experts of the layer that comes back last keeps two of the four across each
        // step (3 hits in the second step, 2 in each later one).
        let dir = tempfile::tempdir().unwrap();
        let s = spec(Dtype::F32, 2);
        let (f, _) = ensure(dir.path(), &s, false, false).unwrap();
        let mut st = StreamedExperts::new(Arc::new(f), 3, false);
        for _ in 0..4 {
            for l in [1, 2] {
                st.begin_layer(l, &[0, 1], None);
                for e in [0, 1] {
                    st.get(l, e).unwrap();
                    assert!(st.resident() <= 3);
                }
            }
        }
        assert_eq!((st.stats.hits, st.stats.misses), (7, 9), "{:?}", st.stats);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_counts_reads() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(Dtype::Bf16, 4);
        let (f, _) = ensure(dir.path(), &s, false, false).unwrap();
        let f = Arc::new(f);
        for prefetch in [false, true] {
            let mut st = StreamedExperts::new(f.clone(), 3, prefetch);
            // layer 1 uses 0..5 (more than the cache holds), layer 2 is predicted {4, 0}
            let order = [0, 1, 2, 3, 4];
            st.begin_layer(1, &order, Some((2, vec![4, 0])));
            for &e in &order {
                let b = st.get(1, e).unwrap();
                assert_eq!(b.span.bytes(), &s.expert_bytes_of(0, e)[..]);
                assert!(st.resident() <= 3);
            }
            st.drain().unwrap(); // the predicted experts are in before layer 2 asks for them
            st.begin_layer(2, &[0, 4], None);
            for e in [0, 4] {
                st.get(2, e).unwrap();
            }
            let x = &st.stats;
            assert!(x.max_resident <= 3, "{x:?}");
            assert_eq!(x.hits + x.misses, 7);
            assert!(x.evictions >= 2, "{x:?}");
            if prefetch {
                // the predicted experts are hits when used; the layer's own read-ahead is not
                assert_eq!((x.prefetched, x.prefetch_used, x.hits), (2, 2, 2), "{x:?}");
            } else {
                assert_eq!((x.prefetched, x.hits), (0, 0), "{x:?}");
                assert_eq!(x.waits, x.misses, "every read on demand is waited for");
            }
            // layer 1 again: expert 4 was used last there, still in the cache
            st.begin_layer(1, &[4], None);
            let h = st.stats.hits;
            st.get(1, 4).unwrap();
            assert_eq!(st.stats.hits, h + 1);
            st.reset();
            assert_eq!((st.resident(), st.stats.hits), (0, 0));
        }
    }
}
