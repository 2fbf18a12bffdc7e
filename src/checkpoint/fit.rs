//! 内存够不够：每个带 `--model` 的运行在构建任何东西之前都做同一个检查——它要常驻的权重（按运行的
//! 数值类型）加上它留给其余部分的字节，不能超过本机内存；超过时以退出码 3 报出字节数，并给出放得下
//! 的最大 `--layers`（参数量是解析算的，逐个层数试一遍不花时间）。
//!
//! One check for every kind: `bench mla` (the largest variant plus the capacity budget),
//! `bench moe` (the three variants resident together plus 1 GiB), `bench model` (the combined
//! model with its MTP modules plus 1 GiB), `verify` and `bench mtp` on a checkpoint (its
//! parameters, the MTP layer when every layer is kept, plus 1 GiB).

use crate::config::Dtype;
use crate::error::DsoptError;

/// What one run keeps resident, for [`Fit::check`].
pub struct Fit<'a> {
    /// `--model`'s value as given.
    pub model: &'a str,
    /// Layers the run keeps.
    pub layers: usize,
    /// Layers of the whole model.
    pub total_layers: usize,
    /// The fewest layers a run of this kind can keep (an MoE run keeps its first MoE layer).
    pub min_layers: usize,
    /// What the weights are, for the message ("the largest variant's weights").
    pub what: &'a str,
    /// The run's numeric type.
    pub dtype: Dtype,
    /// Bytes the run keeps besides the weights, and what they are for the message.
    pub reserve: (u128, String),
    /// The advice when not even `min_layers` fit (default: a machine with more memory).
    pub none_fits: Option<String>,
}

/// 1 GiB: what a run keeps for activations and the rest of the process besides its weights.
pub const ONE_GIB: u128 = 1 << 30;

impl Fit<'_> {
    /// Exit 3 when `weights(layers)` plus the reserve exceeds this machine's memory, naming the
    /// largest layer count in `min_layers..=total_layers` that fits as `fix(n)` (or a machine
    /// with more memory when none does). Unknown memory: no refusal.
    pub fn check(
        &self,
        weights: impl Fn(usize) -> u128,
        fix: impl Fn(usize) -> String,
    ) -> Result<(), DsoptError> {
        let ram = crate::backend::machine::MachineInfo::capture().ram_bytes as u128;
        self.check_against(ram, weights, fix)
    }

    fn check_against(
        &self,
        ram: u128,
        weights: impl Fn(usize) -> u128,
        fix: impl Fn(usize) -> String,
    ) -> Result<(), DsoptError> {
        let need = |n: usize| weights(n) + self.reserve.0;
        if ram == 0 || need(self.layers) <= ram {
            return Ok(());
        }
        let bytes = |b: u128| crate::report::write::bytes_h(Some(b.min(u64::MAX as u128) as u64));
        let min = self.min_layers.max(1);
        let fix = match (min..=self.total_layers).rev().find(|&n| need(n) <= ram) {
            Some(n) => fix(n),
            None => match &self.none_fits {
                Some(text) => text.clone(),
                None => format!(
                    "no --layers fits (the fewest this run can keep, {min}, need {} with the \
                     reserve): use a machine with more memory",
                    bytes(need(min))
                ),
            },
        };
        Err(DsoptError::CannotRun(format!(
            "--model {} with {} of {} layers: {} need {} in {} plus {}, but this machine has {}\n  \
             fix: {fix}",
            self.model,
            self.layers,
            self.total_layers,
            self.what,
            bytes(weights(self.layers)),
            self.dtype.as_str(),
            self.reserve.1,
            bytes(ram),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(layers: usize, min: usize) -> Fit<'static> {
        Fit {
            model: "m",
            layers,
            total_layers: 10,
            min_layers: min,
            what: "its parameters",
            dtype: Dtype::Bf16,
            reserve: (ONE_GIB, "1 GiB".into()),
            none_fits: None,
        }
    }

    #[test]
    fn the_largest_layer_count_that_fits_is_the_fix() {
        let gib = ONE_GIB;
        // 1 GiB per layer + 1 GiB reserve against 6 GiB: 5 layers fit
        let w = |n: usize| n as u128 * gib;
        let fix = |n: usize| format!("--layers {n} or fewer");
        assert!(fit(5, 1).check_against(6 * gib, w, fix).is_ok());
        assert!(
            fit(10, 1).check_against(0, w, fix).is_ok(),
            "unknown memory"
        );
        let e = fit(10, 1).check_against(6 * gib, w, fix).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_CANNOT_RUN);
        let msg = e.to_string();
        assert!(msg.contains("with 10 of 10 layers"), "{msg}");
        assert!(
            msg.contains("its parameters need 10.00 GiB in bf16 plus 1 GiB"),
            "{msg}"
        );
        assert!(msg.contains("fix: --layers 5 or fewer"), "{msg}");
        // the fewest layers this run can keep already too many
        let msg = fit(10, 6)
            .check_against(6 * gib, w, fix)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("no --layers fits") && msg.contains("6, need 7.00 GiB"),
            "{msg}"
        );
        let own = Fit {
            none_fits: Some("use a bigger machine".into()),
            ..fit(10, 10)
        };
        let msg = own.check_against(6 * gib, w, fix).unwrap_err().to_string();
        assert!(msg.ends_with("fix: use a bigger machine"), "{msg}");
    }
}
