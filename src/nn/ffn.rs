//! SwiGLU feed-forward network: `w2(silu(w1 x) * w3 x)`.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::silu, backend::Backend, Tensor, TensorData};

use super::linear;

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
        // decode steps take the streaming matrix-vector path on the CPU backend (nn::linear)
        let (a, b) = (
            linear::forward(&self.w1, x.clone()),
            linear::forward(&self.w3, x),
        );
        // one fused pass on the CPU backend (`nn::flex::swiglu_gate`), Burn's ops elsewhere
        let h = match super::flex::swiglu_gate(a, b) {
            Ok(h) => h,
            Err((a, b)) => silu(a) * b,
        };
        linear::forward(&self.w2, h)
    }

    /// An FFN from its three linear layers (`w1` gate, `w2` down, `w3` up).
    pub fn from_linears(w1: Linear<B>, w2: Linear<B>, w3: Linear<B>) -> Self {
        SwiGlu { w1, w2, w3 }
    }

    /// An FFN from host weights `w1`, `w2`, `w3` (Burn's `[d_in, d_out]` layout), copied to
    /// `device`.
    pub fn from_data(w1: TensorData, w2: TensorData, w3: TensorData, device: &B::Device) -> Self {
        let lin = |w: TensorData| Linear {
            weight: Param::from_tensor(Tensor::from_data(w, device)),
            bias: None,
        };
        SwiGlu {
            w1: lin(w1),
            w2: lin(w2),
            w3: lin(w3),
        }
    }

    /// The weights `w1`, `w2`, `w3` read back to the host.
    pub fn to_data(&self) -> [TensorData; 3] {
        [
            self.w1.weight.val().into_data(),
            self.w2.weight.val().into_data(),
            self.w3.weight.val().into_data(),
        ]
    }

    /// The three linear layers `[w1 (gate), w2 (down), w3 (up)]`.
    pub(crate) fn linears(&self) -> [&Linear<B>; 3] {
        [&self.w1, &self.w2, &self.w3]
    }

    /// Parameter count.
    pub fn params(dim: usize, inter: usize) -> usize {
        3 * dim * inter
    }
}
