//! Burn 模块：注意力（MHA/GQA、MLA、RoPE、KV 缓存、分块注意力）、FFN、解码器模型。

pub mod attention;
pub mod decode;
pub mod ffn;
pub(crate) mod flex;
pub mod linear;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod rope;

pub use attention::mla::{MlaAttention, MlaImpl};
pub use attention::{Attention, AttentionConfig, AttentionKind, KvCache};
pub use model::{Decoder, DecoderConfig};
pub use mtp::{MtpModel, MtpPredictor};

use burn::tensor::{backend::Backend, Tensor};

/// `n.forward(x)` (RMSNorm over the last dimension): on the CPU backend one pass of the kernel
/// module (rows read as stored, statistics in f32, see `kernels::norm`), Burn's ops elsewhere
/// (other backends, autodiff).
pub fn rms_norm<B: Backend, const D: usize>(
    n: &burn::nn::RmsNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match flex::rms_norm(x, n.gamma.val(), n.epsilon) {
        Ok(y) => y,
        Err(x) => n.forward(x),
    }
}

/// `a + b` (the residual adds): on the CPU backend in half precision one pass of the kernel
/// module (f32 sums rounded once, as Burn's op; split over the pool, see `kernels::eltwise`),
/// Burn's op elsewhere (f32, other backends, autodiff).
pub fn add<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    match flex::add_half(a, b) {
        Ok(y) => y,
        Err((a, b)) => a + b,
    }
}

/// `x * s`: on the CPU backend in half precision one pass of the kernel module (bit for bit
/// Burn's op, split over the pool, see `kernels::eltwise`), Burn's op elsewhere.
pub fn scale<B: Backend, const D: usize>(x: Tensor<B, D>, s: f64) -> Tensor<B, D> {
    match flex::scale_half(x, s) {
        Ok(y) => y,
        Err(x) => x * s,
    }
}

#[cfg(test)]
mod tests;

/// Test helpers shared by the modules of `nn`.
#[cfg(test)]
pub(crate) mod test_util {
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};

    /// A flex tensor of `shape` filled with `uniform(.., seed)`.
    pub fn t4(shape: [usize; 4], seed: u64) -> Tensor<Flex, 4> {
        let n = shape.iter().product();
        Tensor::from_data(
            TensorData::new(crate::rng::uniform(n, seed), shape),
            &Default::default(),
        )
    }
}
