//! Timing statistics: mean, median, spread, percentiles and outliers (median/MAD).

use serde::{Deserialize, Serialize};

/// 一组计时样本的统计量（秒）。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// 每次重复的耗时（秒），按测量顺序。
    pub samples_s: Vec<f64>,
    /// 预热运行的耗时（秒），不计入统计。
    #[serde(default)]
    pub warmup_s: Vec<f64>,
    /// 均值。
    pub mean_s: f64,
    /// 中位数。
    pub median_s: f64,
    /// 样本标准差（n-1）；少于 2 个样本时为 null（无法估计离散程度，不写 0）。
    pub stddev_s: Option<f64>,
    /// 变异系数 stddev/mean；少于 2 个样本时为 null。
    pub cv: Option<f64>,
    /// 最小值。
    pub min_s: f64,
    /// 最大值。
    pub max_s: f64,
    /// 第 90 百分位（线性插值）；少于 2 个样本时为 null。
    pub p90_s: Option<f64>,
    /// 离群样本的下标（修正 z 分数 > 3.5，基于中位数/MAD）。
    #[serde(default)]
    pub outliers: Vec<usize>,
}

impl Timings {
    /// Statistics of `samples` (must be non-empty and finite); `warmup` is kept as given.
    pub fn from_samples(samples: Vec<f64>, warmup: Vec<f64>) -> Option<Timings> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let spread = samples.len() > 1;
        let stddev = spread
            .then(|| (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        let mut sorted = samples.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        Some(Timings {
            mean_s: mean,
            median_s: percentile(&sorted, 50.0),
            stddev_s: stddev,
            cv: stddev.filter(|_| mean > 0.0).map(|sd| sd / mean),
            min_s: sorted[0],
            max_s: sorted[sorted.len() - 1],
            p90_s: spread.then(|| percentile(&sorted, 90.0)),
            outliers: mad_outliers(&samples),
            samples_s: samples,
            warmup_s: warmup,
        })
    }
}

/// The median of `xs` (the mean of the two middle values for an even count), as every figure
/// in a report uses it; `None` for no samples or a non-finite one.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(percentile(&sorted, 50.0))
}

/// Percentile `p` (0..=100) of sorted data, linear interpolation between closest ranks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Indices of outliers by the modified z-score (Iglewicz & Hoaglin): |0.6745 (x - median) / MAD| > 3.5.
/// With MAD = 0 (most samples identical) any sample different from the median is an outlier.
pub fn mad_outliers(samples: &[f64]) -> Vec<usize> {
    if samples.len() < 3 {
        return vec![];
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&sorted, 50.0);
    let mut dev: Vec<f64> = samples.iter().map(|s| (s - median).abs()).collect();
    dev.sort_by(|a, b| a.total_cmp(b));
    let mad = percentile(&dev, 50.0);
    samples
        .iter()
        .enumerate()
        .filter(|(_, &s)| {
            if mad == 0.0 {
                (s - median).abs() > 1e-12 * median.abs().max(1e-30)
            } else {
                (0.6745 * (s - median) / mad).abs() > 3.5
            }
        })
        .map(|(i, _)| i)
        .collect()
}

/// 测量质量警告；文字告诉用户该怎么做。
#[derive(Debug, Clone, PartialEq)]
pub enum TimingWarning {
    /// 变异系数过高。
    HighVariation { cv: f64 },
    /// 第一次运行明显更慢（自动调优/内核编译）。
    SlowFirstRun { ratio: f64 },
    /// 有离群样本。
    Outliers { count: usize, total: usize },
    /// 样本太少，统计量不可靠。
    FewSamples { n: usize },
}

/// CV above which a warning is issued.
pub const HIGH_CV: f64 = 0.10;
/// A first run slower than this multiple of the median is flagged.
pub const SLOW_FIRST_RATIO: f64 = 3.0;

impl std::fmt::Display for TimingWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimingWarning::HighVariation { cv } => write!(
                f,
                "high variation (CV {:.1} %): close other programs, or raise --repetitions",
                cv * 100.0
            ),
            TimingWarning::SlowFirstRun { ratio } => write!(
                f,
                "the first run was {ratio:.1}x slower than the median (kernel compilation or \
                 autotune): raise --warmup so it is not measured"
            ),
            TimingWarning::Outliers { count, total } => write!(
                f,
                "{count} of {total} samples are outliers (median/MAD): the machine was busy; \
                 rerun or raise --repetitions"
            ),
            TimingWarning::FewSamples { n } => write!(
                f,
                "only {n} sample(s): spread and outliers cannot be judged; raise --repetitions"
            ),
        }
    }
}

/// Warnings for a set of timings. `first_run_s` is the first run ever made (warm-up or not).
pub fn warnings(t: &Timings, first_run_s: Option<f64>) -> Vec<TimingWarning> {
    let mut w = Vec::new();
    if t.samples_s.len() < 3 {
        w.push(TimingWarning::FewSamples {
            n: t.samples_s.len(),
        });
    }
    if let Some(cv) = t.cv.filter(|cv| *cv > HIGH_CV) {
        w.push(TimingWarning::HighVariation { cv });
    }
    if !t.outliers.is_empty() {
        w.push(TimingWarning::Outliers {
            count: t.outliers.len(),
            total: t.samples_s.len(),
        });
    }
    if let Some(first) = first_run_s {
        if t.median_s > 0.0 && first / t.median_s > SLOW_FIRST_RATIO && t.warmup_s.is_empty() {
            w.push(TimingWarning::SlowFirstRun {
                ratio: first / t.median_s,
            });
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
        let t = Timings::from_samples(vec![4.0, 1.0, 3.0, 2.0], vec![]).unwrap();
        assert_eq!(Some(t.median_s), median(&t.samples_s));
    }

    #[test]
    fn hand_computed_statistics() {
        // samples 1..=5: mean 3, median 3, sample variance 2.5, p90 = 4.6
        let t = Timings::from_samples(vec![5.0, 1.0, 4.0, 2.0, 3.0], vec![9.0]).unwrap();
        assert!(close(t.mean_s, 3.0));
        assert!(close(t.median_s, 3.0));
        assert!(close(t.stddev_s.unwrap(), 2.5f64.sqrt()));
        assert!(close(t.cv.unwrap(), 2.5f64.sqrt() / 3.0));
        assert!(close(t.min_s, 1.0) && close(t.max_s, 5.0));
        assert!(close(t.p90_s.unwrap(), 4.6));
        assert_eq!(t.samples_s, vec![5.0, 1.0, 4.0, 2.0, 3.0], "order kept");
        assert_eq!(t.warmup_s, vec![9.0]);
        assert!(t.outliers.is_empty());
    }

    #[test]
    fn even_count_median_and_single_sample() {
        let t = Timings::from_samples(vec![4.0, 1.0, 3.0, 2.0], vec![]).unwrap();
        assert!(close(t.median_s, 2.5));
        let one = Timings::from_samples(vec![0.5], vec![]).unwrap();
        // one sample: no spread to estimate; null, never 0
        assert!(one.stddev_s.is_none() && one.p90_s.is_none() && one.cv.is_none());
        let v = serde_json::to_value(&one).unwrap();
        assert!(v["stddev_s"].is_null() && v["cv"].is_null() && v["p90_s"].is_null());
        assert!(Timings::from_samples(vec![], vec![]).is_none());
        assert!(Timings::from_samples(vec![1.0, f64::NAN], vec![]).is_none());
    }

    #[test]
    fn planted_outliers_are_found() {
        let mut s = vec![1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 0.99];
        s.push(2.5); // index 8
        s.insert(2, 0.2); // index 2, shifts the 2.5 to index 9
        let out = mad_outliers(&s);
        assert_eq!(out, vec![2, 9]);
        let t = Timings::from_samples(s, vec![]).unwrap();
        assert!(warnings(&t, None)
            .iter()
            .any(|w| matches!(w, TimingWarning::Outliers { count: 2, .. })));
    }

    #[test]
    fn no_outliers_in_tight_data_and_identical_data() {
        assert!(mad_outliers(&[1.0, 1.1, 0.9, 1.05, 0.95]).is_empty());
        assert!(mad_outliers(&[2.0, 2.0, 2.0]).is_empty());
        assert_eq!(mad_outliers(&[2.0, 2.0, 2.0, 3.0]), vec![3]);
    }

    #[test]
    fn warnings_for_variation_and_slow_first_run() {
        let t = Timings::from_samples(vec![1.0, 2.0, 1.0, 2.0], vec![]).unwrap();
        let w = warnings(&t, Some(10.0));
        assert!(w
            .iter()
            .any(|w| matches!(w, TimingWarning::HighVariation { .. })));
        assert!(w
            .iter()
            .any(|w| matches!(w, TimingWarning::SlowFirstRun { .. })));
        assert!(w.iter().all(|w| !w.to_string().is_empty()));
        // a warm-up absorbs the slow first run: no warning then
        let warmed = Timings::from_samples(vec![1.0, 1.0, 1.0], vec![10.0]).unwrap();
        assert!(warnings(&warmed, Some(10.0)).is_empty());
        let few = Timings::from_samples(vec![1.0], vec![]).unwrap();
        assert_eq!(
            warnings(&few, None),
            vec![TimingWarning::FewSamples { n: 1 }]
        );
    }
}
