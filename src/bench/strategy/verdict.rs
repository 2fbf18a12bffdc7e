//! FR-004 的判定：由类型化的正确性检查结果（贪心 vs 完整前向、自推测 vs 贪心、oracle 草稿 vs
//! 贪心）推出判据；纯函数，不做 I/O，可对固定结果做单元测试。

use crate::report::{Comparison, Criterion};

/// One token-for-token comparison: the fraction of tokens identical and how many differ.
pub(super) type Agreement = (f64, usize);

/// The correctness checks of one FR-004 run (`None`: the check did not run).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Fr004Figures {
    /// MTP depth (0: no speculative decoder)
    pub depth: usize,
    pub batch: usize,
    pub new_tokens: usize,
    /// cached greedy decoding vs the argmax of one uncached full forward
    pub full_forward: Option<Agreement>,
    /// self-speculative decoding with the MTP drafts vs greedy
    pub speculative: Option<Agreement>,
    /// self-speculative decoding with oracle drafts (every draft accepted) vs greedy
    pub oracle: Option<Agreement>,
    /// mean tokens committed per verify step of the oracle run
    pub oracle_accepted_length: Option<f64>,
}

impl Fr004Figures {
    /// Both speculative runs against greedy: the lower fraction and the differing tokens of both
    /// (None unless both ran).
    pub fn speculative_all(&self) -> Option<Agreement> {
        self.speculative
            .zip(self.oracle)
            .map(|((f, d), (fo, d_or))| (f.min(fo), d + d_or))
    }

    /// Whether greedy equals the full forward (None: not checked).
    pub fn full_forward_ok(&self) -> Option<bool> {
        self.full_forward.map(|(_, d)| d == 0)
    }

    /// The criterion's measured value: with MTP, the lower of the speculative agreement and the
    /// full-forward agreement (so the gate can recompute it); without, the full-forward one.
    pub fn measured(&self) -> Option<f64> {
        if self.depth > 0 {
            self.speculative_all()
                .zip(self.full_forward)
                .map(|(sp, ff)| sp.0.min(ff.0))
        } else {
            self.full_forward.map(|c| c.0)
        }
    }
}

/// FR-004 (`speculative_equals_greedy`, at least 1.0): a correctness check, not a speed claim.
pub(super) fn criterion(f: &Fr004Figures) -> Criterion {
    let (batch, n, depth) = (f.batch, f.new_tokens, f.depth);
    let note = if depth > 0 {
        format!(
            "fraction of the {} generated tokens (batch {batch} x {n}) identical between \
             self-speculative decoding (MTP depth {depth}) and plain greedy decoding, the lower \
             of two runs: the untrained MTP drafts ({}), and oracle drafts that are all accepted \
             ({} tokens per verify step); also requires greedy == argmax of a full forward ({}). \
             A correctness check, not a speed claim",
            batch * n,
            super::super::fmt_opt(f.speculative.map(|c| c.0), 4),
            super::super::fmt_opt(f.oracle_accepted_length, 2),
            match f.full_forward_ok() {
                Some(true) => "it is",
                Some(false) => "it is NOT",
                None => "not checked",
            }
        )
    } else {
        format!(
            "MTP depth 0: no speculative decoder, so the fraction of the {} greedy tokens \
             (batch {batch} x {n}) that equal the argmax of one uncached full forward. A \
             correctness check, not a speed claim",
            batch * n
        )
    };
    Criterion::evaluate(
        "FR-004",
        "speculative_equals_greedy",
        Comparison::AtLeast,
        1.0,
        f.measured(),
        note,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;

    fn figs(depth: usize) -> Fr004Figures {
        Fr004Figures {
            depth,
            batch: 2,
            new_tokens: 5,
            full_forward: Some((1.0, 0)),
            speculative: Some((1.0, 0)),
            oracle: Some((1.0, 0)),
            oracle_accepted_length: Some(4.0),
        }
    }

    #[test]
    fn passes_only_when_every_check_agrees_token_for_token() {
        let c = criterion(&figs(3));
        assert_eq!((c.outcome(), c.measured), (Outcome::Pass, Some(1.0)));
        assert!(c.note.contains("it is") && c.note.contains("10 generated"));
        // one token off in the MTP run, the oracle run, or against the full forward: FAIL,
        // and the measured value is the lowest agreement of the three
        for (sp, or, ff) in [
            ((0.9, 1), (1.0, 0), (1.0, 0)),
            ((1.0, 0), (0.8, 2), (1.0, 0)),
            ((1.0, 0), (1.0, 0), (0.7, 3)),
        ] {
            let f = Fr004Figures {
                speculative: Some(sp),
                oracle: Some(or),
                full_forward: Some(ff),
                ..figs(3)
            };
            let c = criterion(&f);
            assert_eq!(c.outcome(), Outcome::Fail, "{f:?}");
            let lowest = sp.0.min(or.0).min(ff.0);
            assert_eq!(c.measured, Some(lowest));
        }
        let f = Fr004Figures {
            full_forward: Some((0.7, 3)),
            ..figs(3)
        };
        assert!(criterion(&f).note.contains("it is NOT"));
        assert_eq!(f.speculative_all(), Some((1.0, 0)));
    }

    #[test]
    fn a_check_that_did_not_run_is_not_measured() {
        for f in [
            Fr004Figures {
                oracle: None,
                ..figs(3)
            },
            Fr004Figures {
                speculative: None,
                ..figs(3)
            },
            Fr004Figures {
                full_forward: None,
                ..figs(3)
            },
            Fr004Figures {
                full_forward: None,
                ..figs(0)
            },
        ] {
            let c = criterion(&f);
            assert_eq!(c.measured, None, "{f:?}");
            assert_eq!(c.outcome(), Outcome::NotMeasured);
            assert!(!c.passed);
        }
    }

    #[test]
    fn depth_zero_gates_the_full_forward_only() {
        let f = Fr004Figures {
            speculative: None,
            oracle: None,
            oracle_accepted_length: None,
            ..figs(0)
        };
        let c = criterion(&f);
        assert_eq!((c.outcome(), c.measured), (Outcome::Pass, Some(1.0)));
        assert!(c.note.contains("MTP depth 0"));
        let f = Fr004Figures {
            full_forward: Some((0.5, 5)),
            ..f
        };
        assert_eq!(criterion(&f).outcome(), Outcome::Fail);
        assert_eq!(criterion(&f).measured, Some(0.5));
    }
}
