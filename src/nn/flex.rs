//! 与 CPU 后端 burn-flex 直接打交道的两个小工具：从泛型张量里取出 `FlexTensor`，再放回去。
//!
//! The model code is generic over `B: Backend`; the concrete CPU backend is named only at the
//! binary's dispatch point. Where flex needs a path of its own (an in-place cache write, a
//! streaming matrix-vector product), the backend is recognised at run time by the type of its
//! tensor primitive (an `Any` downcast), and every other backend takes the portable path.

use std::any::Any;

use burn::backend::flex::FlexTensor;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

/// The flex tensor inside `t`, or `t` back when `B` is another backend.
pub(crate) fn into_flex<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => {
            let any: Box<dyn Any> = Box::new(p);
            match any.downcast::<FlexTensor>() {
                Ok(f) => Ok(*f),
                Err(any) => match any.downcast::<B::FloatTensorPrimitive>() {
                    Ok(p) => Err(Tensor::from_primitive(TensorPrimitive::Float(*p))),
                    Err(_) => unreachable!("a primitive is its own type"),
                },
            }
        }
        q => Err(Tensor::from_primitive(q)),
    }
}

/// A tensor of `B` from a flex tensor; only called once [`into_flex`] has shown that `B`'s
/// primitive is `FlexTensor`.
pub(crate) fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let any: Box<dyn Any> = Box::new(t);
    match any.downcast::<B::FloatTensorPrimitive>() {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
        Err(_) => unreachable!("B's float primitive is FlexTensor (checked by into_flex)"),
    }
}
