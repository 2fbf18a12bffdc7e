//! safetensors 文件的读取：先完整检查头部（长度、偏移、重叠、dtype 与形状对字节数），
//! 再从文件的只读内存映射（映射不了时用定位读取 `read_exact_at`）按需取出单个张量——不把整个文件
//! 读进内存，也不按头部声明的尺寸预先分配。FP8 e4m3 权重按 `weight_scale_inv` 的 128×128 块缩放反量化。
//!
//! Tensors are read out of a read-only memory map of the file (no read buffer in between: a
//! transposed linear weight is rearranged straight out of the page cache); positioned reads
//! (`read_exact_at`) serve the small reads and the rare case where a file cannot be mapped.
//! A file truncated by another process while dsopt reads it, or a read error of the disk or a
//! network file system (EIO), ends the process with SIGBUS instead of an exit-2 error, as it
//! does every mapped safetensors reader (Hugging Face's `safe_open` maps too).
//!
//! Format: 8 bytes little-endian header length N, N bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the
//! data; offsets are relative to the end of the header.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

use crate::error::DsoptError;

/// The largest header accepted (the format's own reference reader refuses more than 100 MB).
pub const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Element types dsopt reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// FP8 e4m3 (weights of DeepSeek-V3's published checkpoint).
    F8E4M3,
    /// 64-bit integer (the reference's `input_ids`).
    I64,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "F8_E4M3" => StDtype::F8E4M3,
            "I64" => StDtype::I64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
            StDtype::F8E4M3 => 1,
            StDtype::I64 => 8,
        }
    }

    /// The name the format uses.
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::F8E4M3 => "F8_E4M3",
            StDtype::I64 => "I64",
        }
    }
}

/// One tensor's entry in a header (offsets absolute in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open safetensors file whose header has been checked.
#[derive(Debug)]
pub struct SafeFile {
    path: PathBuf,
    file: File,
    map: Option<memmap2::Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

fn bad(path: &Path, key: Option<&str>, message: String) -> DsoptError {
    DsoptError::Model {
        source_name: path.display().to_string(),
        key: key.map(str::to_string),
        message,
        fix: "the file is not a valid safetensors file: write it again (for example with \
              `save_pretrained(..., safe_serialization=True)`)"
            .into(),
    }
}

impl SafeFile {
    /// Opens `path` and checks its header; nothing the header declares is allocated.
    pub fn open(path: &Path) -> Result<SafeFile, DsoptError> {
        let file = File::open(path).map_err(|e| DsoptError::Model {
            source_name: path.display().to_string(),
            key: None,
            message: format!("cannot be opened: {e}"),
            fix: "check the path and the file's permissions".into(),
        })?;
        let len = file
            .metadata()
            .map_err(|e| bad(path, None, format!("cannot be read: {e}")))?
            .len();
        if len < 8 {
            return Err(bad(
                path,
                None,
                format!("has {len} bytes, fewer than the 8 of a header length"),
            ));
        }
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|e| bad(path, None, format!("cannot be read: {e}")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || n > len - 8 {
            return Err(bad(
                path,
                None,
                format!(
                    "declares a header of {n} bytes; the file has {len} bytes and headers are \
                     limited to {MAX_HEADER}"
                ),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(path, None, format!("cannot be read: {e}")))?;
        let json: Value = serde_json::from_slice(&header)
            .map_err(|e| bad(path, None, format!("has a header that is not JSON: {e}")))?;
        let data_start = 8 + n;
        let (tensors, metadata) = parse_header(path, &json, len - data_start, data_start)?;
        // SAFETY: a read-only (shared) map of a file opened read-only; its bytes are only read
        // through `mapped`, in ranges `parse_header` checked against the file's length (and
        // `get` against the map's). Another process truncating the file while it is mapped can
        // raise SIGBUS (module docs).
        let map = unsafe { memmap2::Mmap::map(&file) }.ok();
        Ok(SafeFile {
            path: path.to_path_buf(),
            file,
            map,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// One tensor's entry.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor `name`'s bytes in the file's memory map (`None` when the file could not be
    /// mapped or has no such tensor).
    pub fn mapped(&self, name: &str) -> Option<&[u8]> {
        let info = self.info(name)?;
        let map = self.map.as_ref()?;
        map.get(info.start as usize..info.end as usize)
    }

    /// Drops bytes `offset..offset + len` of tensor `name` from this process's map once they
    /// have been read (the page cache keeps them), so that the process's resident size holds the
    /// loaded model and not the file beside it. Does nothing for a range outside the tensor or
    /// the map.
    pub fn release_range(&self, name: &str, offset: u64, len: u64) {
        let (Some(info), Some(map)) = (self.info(name), self.map.as_ref()) else {
            return;
        };
        let start = info.start + offset;
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| info.start + end <= info.end);
        if !inside || len == 0 || map.get(start as usize..(start + len) as usize).is_none() {
            return;
        }
        // SAFETY: the map is read-only (a shared map of a file opened read-only) and the range
        // lies inside it (checked above; the kernel widens it to whole pages, still inside the
        // map): MADV_DONTNEED only drops this process's page-table entries, and the next access
        // reads the same file bytes back, so a slice still borrowed from `mapped` keeps its
        // contents.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start as usize,
                len as usize,
            )
        };
    }

    /// The raw bytes of tensor `name` (one positioned read of exactly its size).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>, DsoptError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        let mut buf = vec![0u8; (info.end - info.start) as usize];
        self.file
            .read_exact_at(&mut buf, info.start)
            .map_err(|e| bad(&self.path, Some(name), format!("cannot be read: {e}")))?;
        Ok(buf)
    }

    /// Bytes `offset..offset + buf.len()` of tensor `name` (a positioned read; `offset` counts
    /// from the tensor's first byte).
    ///
    /// # Panics
    /// When the range is not inside the tensor.
    pub fn read_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), DsoptError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        assert!(
            info.start + offset + buf.len() as u64 <= info.end,
            "range outside {name}"
        );
        self.file
            .read_exact_at(buf, info.start + offset)
            .map_err(|e| bad(&self.path, Some(name), format!("cannot be read: {e}")))
    }

    /// Tensor `name` widened to f32 (F32, F16, BF16; FP8 needs its scales: see
    /// [`dequantize_fp8`]).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, DsoptError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?.clone();
        let bytes = self.read_bytes(name)?;
        to_f32(&bytes, info.dtype).ok_or_else(|| {
            bad(
                &self.path,
                Some(name),
                format!(
                    "is {}, not a float type dsopt widens here",
                    info.dtype.name()
                ),
            )
        })
    }

    /// Tensor `name` as i64 (I64 only).
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>, DsoptError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?.clone();
        if info.dtype != StDtype::I64 {
            return Err(bad(
                &self.path,
                Some(name),
                format!("is {}, expected I64", info.dtype.name()),
            ));
        }
        Ok(self
            .read_bytes(name)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn missing(&self, name: &str) -> DsoptError {
        DsoptError::Model {
            source_name: self.path.display().to_string(),
            key: Some(name.to_string()),
            message: "is not in this file".into(),
            fix: "the checkpoint is incomplete or of another architecture: download the file again"
                .into(),
        }
    }
}

/// Checks every entry of a header against the data size (`data_len` bytes from `data_start`).
type Parsed = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);
fn parse_header(
    path: &Path,
    json: &Value,
    data_len: u64,
    data_start: u64,
) -> Result<Parsed, DsoptError> {
    let obj = json
        .as_object()
        .ok_or_else(|| bad(path, None, "has a header that is not a JSON object".into()))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            for (k, v) in v.as_object().into_iter().flatten() {
                if let Some(s) = v.as_str() {
                    metadata.insert(k.clone(), s.to_string());
                }
            }
            continue;
        }
        let fail = |m: String| bad(path, Some(name), m);
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("has no dtype".into()))?;
        let dtype = StDtype::parse(dtype_s).ok_or_else(|| {
            fail(format!(
                "has dtype {dtype_s}; dsopt reads F32, F16, BF16, F8_E4M3 and I64"
            ))
        })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("has no shape".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| fail("has a shape that is not a list of sizes".into()))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| fail("has no data_offsets [begin, end]".into()))?;
        let (b, e) = offs;
        if b > e || e > data_len {
            return Err(fail(format!(
                "has data_offsets [{b}, {e}] outside the file's {data_len} data bytes"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if bytes != Some(e - b) {
            return Err(fail(format!(
                "is {dtype_s} of shape {shape:?}, which is not the {} bytes of its data_offsets",
                e - b
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start: data_start + b,
                end: data_start + e,
            },
        );
    }
    let mut spans: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
    spans.sort_by_key(|(_, t)| (t.start, t.end));
    for w in spans.windows(2) {
        if w[1].1.start < w[0].1.end {
            return Err(bad(
                path,
                Some(w[1].0),
                format!("overlaps tensor `{}`", w[0].0),
            ));
        }
    }
    Ok((tensors, metadata))
}

/// Little-endian elements of `dtype` widened to f32 (`None` for FP8 and integers).
pub fn to_f32(bytes: &[u8], dtype: StDtype) -> Option<Vec<f32>> {
    Some(match dtype {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F8E4M3 | StDtype::I64 => return None,
    })
}

/// One FP8 e4m3 byte (the `fn` variant: no infinities, 0x7f/0xff are NaN) as f32.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = (b >> 3) & 0x0f;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp as i32 - 7)
    }
}

/// FP8 weights `[rows, cols]` times their block scales `scale_inv` `[ceil(rows/bs), ceil(cols/bs)]`
/// (DeepSeek-V3's `weight_dequant`: each `bs`×`bs` block, the last ones cropped, is multiplied by
/// its one scale).
pub fn dequantize_fp8(
    q: &[u8],
    rows: usize,
    cols: usize,
    scale_inv: &[f32],
    bs: usize,
) -> Vec<f32> {
    let bc = cols.div_ceil(bs);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scale_inv[(r / bs) * bc..(r / bs + 1) * bc];
        for (c, &b) in q[r * cols..(r + 1) * cols].iter().enumerate() {
            out.push(e4m3_to_f32(b) * srow[c / bs]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A safetensors file from a raw header and data.
    pub(crate) fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
    }

    fn err(path: &Path) -> String {
        match SafeFile::open(path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} was accepted", path.display()),
        }
    }

    #[test]
    fn reads_f32_bf16_and_i64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let mut data = Vec::new();
        data.extend(1.5f32.to_le_bytes());
        data.extend((-2.0f32).to_le_bytes());
        data.extend(bf16::from_f32(0.25).to_le_bytes());
        data.extend(bf16::from_f32(3.0).to_le_bytes());
        data.extend(7i64.to_le_bytes());
        write_raw(
            &p,
            r#"{"__metadata__":{"layers":"2"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
               "b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]},
               "i":{"dtype":"I64","shape":[1],"data_offsets":[12,20]}}"#,
            &data,
        );
        let f = SafeFile::open(&p).unwrap();
        assert_eq!(f.read_f32("a").unwrap(), vec![1.5, -2.0]);
        assert_eq!(f.read_f32("b").unwrap(), vec![0.25, 3.0]);
        assert_eq!(f.read_i64("i").unwrap(), vec![7]);
        assert_eq!(f.metadata()["layers"], "2");
        assert!(f
            .read_f32("c")
            .unwrap_err()
            .to_string()
            .contains("not in this file"));
    }

    #[test]
    fn hostile_headers_are_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        // a header length of 2^62 bytes: refused before any allocation
        std::fs::write(&p, [0, 0, 0, 0, 0, 0, 0, 0x40, b'{', b'}']).unwrap();
        assert!(err(&p).contains("declares a header of"), "{}", err(&p));
        // offsets past the end of the data
        write_raw(
            &p,
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        );
        assert!(err(&p).contains("outside the file"), "{}", err(&p));
        // two tensors over the same bytes
        write_raw(
            &p,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        );
        assert!(err(&p).contains("overlaps"), "{}", err(&p));
        // a shape that disagrees with the byte count, and one whose size overflows
        write_raw(
            &p,
            r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(err(&p).contains("not the 8 bytes"), "{}", err(&p));
        write_raw(
            &p,
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(err(&p).contains("not the 8 bytes"), "{}", err(&p));
        // an unknown dtype, a header that is not JSON, a file too short
        write_raw(
            &p,
            r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(err(&p).contains("dtype C64"), "{}", err(&p));
        write_raw(&p, "{not json", &[]);
        assert!(err(&p).contains("not JSON"), "{}", err(&p));
        std::fs::write(&p, [1, 2, 3]).unwrap();
        assert!(err(&p).contains("fewer than the 8"), "{}", err(&p));
    }

    #[test]
    fn e4m3_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn fp8_blocks_dequantised_with_a_cropped_edge() {
        // 3 x 5 weights in blocks of 2 x 2: scale blocks [2, 3], the last row and column cropped
        let q: Vec<u8> = vec![0x38; 15]; // every weight 1.0
        let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = dequantize_fp8(&q, 3, 5, &s, 2);
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0,
        ];
        assert_eq!(w, want);
    }
}
