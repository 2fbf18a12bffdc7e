//! f16 on the CPU backend: cached == full forward, absorbed == naive MLA (see `common/half.rs`).

#[path = "common/half.rs"]
mod half;

#[test]
fn f16_cached_equals_full_and_absorbed_equals_naive() {
    half::check(dsopt::config::Dtype::F16, 2f32.powi(-10));
}
