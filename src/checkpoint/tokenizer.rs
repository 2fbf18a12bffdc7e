//! 检查点自己的分词器（`tokenizer.json`，Hugging Face tokenizers 库读）：把文本提示变成 token id，
//! 与 transformers 的快速分词器 `tok(text)["input_ids"]` 相同（含 BOS 等后处理加的特殊 token）。
//!
//! `--prompt-text FILE`: one prompt per non-empty line of FILE (UTF-8), each line as written
//! (not trimmed: with a byte-level tokenizer its leading spaces are tokens, as `tok(line)` makes
//! them), encoded with the
//! special tokens the tokenizer's post-processor adds; the first `batch` lines are used, each cut
//! to its first `len` ids. A missing or unreadable `tokenizer.json`, a line shorter than `len`
//! tokens, too few lines, or an id outside the model's vocabulary exit 2 naming the file and the
//! line.

use std::path::Path;

use crate::error::DsoptError;

/// The largest `tokenizer.json` read (DeepSeek-V3's is 7.8 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// The largest prompt text file read.
const MAX_TEXT_BYTES: u64 = 64 << 20;

/// The prompts of text file `file` as token ids of the tokenizer in `model_dir`.
pub fn text_prompts(
    model_dir: &Path,
    file: &Path,
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<Vec<Vec<u32>>, DsoptError> {
    let tok = load(model_dir)?;
    let bad = |m: String| {
        DsoptError::Usage(format!(
            "--prompt-text {}: {m}; write one prompt per line, at least {batch} lines of {len} \
             tokens each",
            file.display()
        ))
    };
    let size = std::fs::metadata(file)
        .map_err(|e| bad(format!("cannot read it: {e}")))?
        .len();
    if size > MAX_TEXT_BYTES {
        return Err(bad(format!(
            "{size} bytes, more than the {MAX_TEXT_BYTES} read for prompts"
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .take(batch)
        .collect();
    if lines.len() < batch {
        return Err(bad(format!(
            "{} non-empty line(s), but the run's batch is {batch}",
            lines.len()
        )));
    }
    lines
        .into_iter()
        .map(|(i, line)| {
            let enc = tok
                .encode(line, true)
                .map_err(|e| bad(format!("line {}: the tokenizer failed: {e}", i + 1)))?;
            let ids = enc.get_ids();
            if ids.len() < len {
                return Err(bad(format!(
                    "line {} is {} tokens, fewer than the {len} the run needs",
                    i + 1,
                    ids.len()
                )));
            }
            if let Some(t) = ids[..len].iter().find(|&&t| t as usize >= vocab) {
                return Err(bad(format!(
                    "line {}: the tokenizer gave id {t}, outside the model's vocabulary of \
                     {vocab} (is tokenizer.json this checkpoint's?)",
                    i + 1
                )));
            }
            Ok(ids[..len].to_vec())
        })
        .collect()
}

/// The tokenizer of `model_dir/tokenizer.json`.
fn load(model_dir: &Path) -> Result<tokenizers::Tokenizer, DsoptError> {
    let path = model_dir.join("tokenizer.json");
    let err = |m: String, fix: &str| DsoptError::Model {
        source_name: path.display().to_string(),
        key: None,
        message: m,
        fix: fix.into(),
    };
    let size = std::fs::metadata(&path)
        .map_err(|e| {
            err(
                format!("cannot read it: {e}"),
                "copy the checkpoint's tokenizer.json into the folder, or give token ids with \
                 --prompts FILE",
            )
        })?
        .len();
    if size > MAX_TOKENIZER_BYTES {
        return Err(err(
            format!("{size} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer.json may have"),
            "use the checkpoint's own tokenizer.json",
        ));
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        err(
            format!("not a tokenizer the tokenizers library reads: {e}"),
            "use the checkpoint's own tokenizer.json (as transformers saves it), or give token \
             ids with --prompts FILE",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-level tokenizer of `tests/fixtures/tokenizer` copied into `dir`: `<s>` (id 0)
    /// before every text, words split on whitespace, unknown words `<unk>` (id 1).
    fn write_tokenizer(dir: &Path) {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tokenizer.json");
        std::fs::copy(src, dir.join("tokenizer.json")).unwrap();
    }

    #[test]
    fn text_lines_become_the_tokenizers_ids_with_its_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path());
        let f = dir.path().join("p.txt");
        std::fs::write(
            &f,
            "the cat sat on the mat\n\n  a dog sat on a cat  \nthe end\n",
        )
        .unwrap();
        let rows = text_prompts(dir.path(), &f, 2, 4, 20).unwrap();
        // <s> first (the post-processor), then the words' ids
        assert_eq!(rows, vec![vec![0, 2, 3, 4], vec![0, 7, 8, 4]]);
        let err = |batch, len, vocab| {
            text_prompts(dir.path(), &f, batch, len, vocab)
                .unwrap_err()
                .to_string()
        };
        // "the end": <s>, the, <unk>
        assert!(
            err(3, 4, 20).contains("line 4 is 3 tokens"),
            "{}",
            err(3, 4, 20)
        );
        assert!(err(4, 2, 20).contains("3 non-empty line(s)"));
        assert!(err(2, 4, 4).contains("outside the model's vocabulary of 4"));
        let e = text_prompts(dir.path(), &dir.path().join("none.txt"), 1, 1, 9).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("cannot read it"));
    }

    #[test]
    fn a_missing_or_broken_tokenizer_is_bad_input_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.txt");
        std::fs::write(&f, "the cat\n").unwrap();
        let e = text_prompts(dir.path(), &f, 1, 1, 9).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        let msg = e.to_string();
        assert!(
            msg.contains("tokenizer.json") && msg.contains("--prompts"),
            "{msg}"
        );
        std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
        let e = text_prompts(dir.path(), &f, 1, 1, 9).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("not a tokenizer"), "{e}");
    }
}
