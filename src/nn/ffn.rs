//! SwiGLU feed-forward network: `w2(silu(w1 x) * w3 x)`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::silu, backend::Backend, Tensor};

/// SwiGLU FFN（DeepSeek 的 MLP / Expert 结构）。
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    w1: Linear<B>,
    w2: Linear<B>,
    w3: Linear<B>,
}

impl<B: Backend> SwiGlu<B> {
    /// New FFN `dim -> inter -> dim`, no biases.
    pub fn new(dim: usize, inter: usize, device: &B::Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        SwiGlu {
            w1: lin(dim, inter),
            w2: lin(inter, dim),
            w3: lin(dim, inter),
        }
    }

    /// # Shapes
    /// `[b, s, dim] -> [b, s, dim]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.w2
            .forward(silu(self.w1.forward(x.clone())) * self.w3.forward(x))
    }

    /// Parameter count.
    pub fn params(dim: usize, inter: usize) -> usize {
        3 * dim * inter
    }
}
