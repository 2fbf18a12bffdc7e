//! What the integration tests share: whether the wgpu tests can run here.
//!
//! The wgpu backend needs a Vulkan driver (on a machine without a GPU: Mesa's lavapipe,
//! `apt-get install -y mesa-vulkan-drivers libvulkan1`). Without any wgpu adapter the wgpu parts
//! of the tests are skipped with a printed reason, so the README's `cargo test --release` passes
//! on a fresh machine; `.ci/run` installs lavapipe and sets `DSOPT_REQUIRE_WGPU=1`, which turns a
//! missing adapter into a failure, so CI can never skip them silently.

#![allow(dead_code)]

/// `true` when a wgpu adapter answers. Otherwise prints why `test` skips its wgpu part and
/// returns `false` — or panics when `DSOPT_REQUIRE_WGPU` is set.
pub fn wgpu_available(test: &str) -> bool {
    if !dsopt::backend::wgpu_adapters().is_empty() {
        return true;
    }
    let fix = "install a Vulkan driver (without a GPU: apt-get install -y mesa-vulkan-drivers libvulkan1)";
    if std::env::var_os("DSOPT_REQUIRE_WGPU").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test}: no wgpu adapter on this machine, and DSOPT_REQUIRE_WGPU is set: {fix}");
    }
    eprintln!(
        "SKIPPED the wgpu part of `{test}`: no wgpu adapter on this machine ({fix}; set \
         DSOPT_REQUIRE_WGPU=1 to make this a failure)"
    );
    false
}

/// The backends `test` runs on: flex, and wgpu where an adapter answers.
pub fn backends(test: &str) -> Vec<&'static str> {
    if wgpu_available(test) {
        vec!["flex", "wgpu"]
    } else {
        vec!["flex"]
    }
}
