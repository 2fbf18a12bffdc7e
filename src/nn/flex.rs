//! 与 CPU 后端 burn-flex 直接打交道的两个小工具：从泛型张量里取出 `FlexTensor`，再放回去。
//!
//! The model code is generic over `B: Backend`; the concrete CPU backend is named only at the
//! binary's dispatch point. Where flex needs a path of its own (an in-place cache write, a
//! streaming matrix-vector product), the backend is recognised at run time by the type of its
//! tensor primitive (an `Any` downcast), and every other backend takes the portable path.

use std::any::Any;

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor, TensorPrimitive};

use crate::kernels::convert::Stored;
use crate::kernels::eltwise::{self, Op};

/// The flex tensor inside `t`, or `t` back when `B` is another backend.
///
/// The primitive is moved out, not cloned (its buffer keeps one owner, which is what lets a
/// caller write into it in place); an empty placeholder takes its place and is dropped.
pub(crate) fn into_flex<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    match t.into_primitive() {
        TensorPrimitive::Float(mut p) => {
            match (&mut p as &mut dyn Any).downcast_mut::<FlexTensor>() {
                Some(f) => {
                    let dtype = f.dtype();
                    Ok(std::mem::replace(
                        f,
                        FlexTensor::empty(Shape::new([0]), dtype),
                    ))
                }
                None => Err(Tensor::from_primitive(TensorPrimitive::Float(p))),
            }
        }
        q => Err(Tensor::from_primitive(q)),
    }
}

/// A tensor of `B` from a flex tensor. Called once [`into_flex`] has shown that `B`'s
/// primitive is `FlexTensor`, so the flex tensor simply takes the place of an empty `B`
/// primitive; were `B` another backend, the values would go through host memory instead (a
/// copy, correct on any backend).
pub(crate) fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let device = B::Device::default();
    let mut p = Tensor::<B, 1>::empty([0], &device)
        .into_primitive()
        .tensor();
    match (&mut p as &mut dyn Any).downcast_mut::<FlexTensor>() {
        Some(slot) => {
            *slot = t;
            Tensor::from_primitive(TensorPrimitive::Float(p))
        }
        None => Tensor::from_data(t.into_data(), &device),
    }
}

/// `n` elements of a flex tensor's storage from `at`, as stored (f32, f16 or bf16; any other
/// dtype is read as f32, which the callers have ruled out).
pub(crate) fn elems(t: &FlexTensor, at: usize, n: usize) -> crate::kernels::convert::Elems<'_> {
    use crate::kernels::convert::Elems;
    match t.dtype() {
        DType::F16 => Elems::F16(&t.storage::<burn::tensor::f16>()[at..at + n]),
        DType::BF16 => Elems::Bf16(&t.storage::<burn::tensor::bf16>()[at..at + n]),
        _ => Elems::F32(&t.storage::<f32>()[at..at + n]),
    }
}

/// A kernel's f32 result `y` as a contiguous flex tensor of `shape` in `dtype` (f16 and bf16
/// rounded to nearest even; f32 as it is).
pub(crate) fn from_f32(y: Vec<f32>, shape: Shape, dtype: DType) -> FlexTensor {
    use crate::kernels::convert;
    let layout = Layout::contiguous(shape);
    match dtype {
        DType::F16 => FlexTensor::new(
            Bytes::from_elems(convert::to_f16(crate::kernels::Level::current(), &y)),
            layout,
            dtype,
        ),
        DType::BF16 => FlexTensor::new(
            Bytes::from_elems(convert::to_bf16(crate::kernels::Level::current(), &y)),
            layout,
            dtype,
        ),
        _ => FlexTensor::new(Bytes::from_elems(y), layout, DType::F32),
    }
}

/// `silu(a) · b` (SwiGLU's gate) in one pass on flex (f32, f16 or bf16, both contiguous, same
/// shape and dtype: [`crate::kernels::eltwise`] with the kernel [`crate::kernels::gate::swiglu`]),
/// or both tensors back.
#[allow(clippy::type_complexity)]
pub(crate) fn swiglu_gate<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    binary(a, b, Op::SwiGlu, &[DType::F32, DType::F16, DType::BF16])
}

/// `a + b` on flex in half precision (f16 or bf16, both contiguous, same shape and dtype): the
/// sum in f32, rounded once, as Burn's op gives it, in one pass split over the pool
/// ([`crate::kernels::eltwise`]); or both tensors back (f32 keeps Burn's add, already a
/// vectorised pass).
#[allow(clippy::type_complexity)]
pub(crate) fn add_half<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    binary(a, b, Op::Add, &[DType::F16, DType::BF16])
}

/// `x · s` on flex in half precision (f16 or bf16, contiguous): `s` rounded to `x`'s type and
/// the product rounded once, bit for bit Burn's `x * s`, in one pass split over the pool
/// ([`crate::kernels::eltwise::scale`]); or `x` back (f32 keeps Burn's op).
pub(crate) fn scale_half<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    s: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    use burn::tensor::{bf16, f16};
    let xf = into_flex(x)?;
    let dtype = xf.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) || !xf.layout().is_contiguous() {
        return Err(from_flex(xf));
    }
    let n = xf.layout().num_elements();
    let level = crate::kernels::Level::current();
    let x = elems(&xf, xf.layout().start_offset(), n);
    let layout = Layout::contiguous(xf.layout().shape().clone());
    let bytes = if dtype == DType::F16 {
        let mut y = vec![f16::ZERO; n];
        let s = f16::from_f32(s as f32).to_f32();
        eltwise::scale(level, x, s, Stored::F16(&mut y));
        Bytes::from_elems(y)
    } else {
        let mut y = vec![bf16::ZERO; n];
        let s = bf16::from_f32(s as f32).to_f32();
        eltwise::scale(level, x, s, Stored::Bf16(&mut y));
        Bytes::from_elems(y)
    };
    Ok(from_flex(FlexTensor::new(bytes, layout, dtype)))
}

/// `op(a, b)` on flex where both are contiguous with the same shape and one of the `dtypes`, the
/// result contiguous in that dtype; or both tensors back.
#[allow(clippy::type_complexity)]
fn binary<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    op: Op,
    dtypes: &[DType],
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if a.dims() != b.dims() {
        return Err((a, b));
    }
    let af = match into_flex(a) {
        Ok(f) => f,
        Err(a) => return Err((a, b)),
    };
    let bf = match into_flex(b) {
        Ok(f) => f,
        Err(b) => return Err((from_flex(af), b)),
    };
    let dtype = af.dtype();
    let plain = |t: &FlexTensor| {
        t.dtype() == dtype && dtypes.contains(&dtype) && t.layout().is_contiguous()
    };
    if !plain(&af) || !plain(&bf) {
        return Err((from_flex(af), from_flex(bf)));
    }
    let n = af.layout().num_elements();
    let level = crate::kernels::Level::current();
    let (xa, xb) = (
        elems(&af, af.layout().start_offset(), n),
        elems(&bf, bf.layout().start_offset(), n),
    );
    let layout = Layout::contiguous(af.layout().shape().clone());
    let bytes = match dtype {
        DType::F16 => {
            let mut y = vec![burn::tensor::f16::ZERO; n];
            eltwise::binary(level, op, xa, xb, Stored::F16(&mut y));
            Bytes::from_elems(y)
        }
        DType::BF16 => {
            let mut y = vec![burn::tensor::bf16::ZERO; n];
            eltwise::binary(level, op, xa, xb, Stored::Bf16(&mut y));
            Bytes::from_elems(y)
        }
        _ => {
            let mut y = vec![0f32; n];
            eltwise::binary(level, op, xa, xb, Stored::F32(&mut y));
            Bytes::from_elems(y)
        }
    };
    Ok(from_flex(FlexTensor::new(bytes, layout, dtype)))
}

/// RMSNorm of `x` over its last dimension on flex (f32/f16/bf16; rows of contiguous elements at
/// one stride, as a slice of the last dimension gives): the kernel
/// [`crate::kernels::norm::rms_norm`], the result contiguous in `x`'s dtype; or `x` back.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let xf = into_flex(x)?;
    let Ok(gf) = into_flex(gamma) else {
        return Err(from_flex(xf));
    };
    let known = |t: &FlexTensor| matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16);
    let (shape, st) = (xf.layout().shape().clone(), xf.layout().strides().to_vec());
    let d = shape[D - 1];
    let rows = shape.num_elements() / d.max(1);
    // rows at one stride: every outer stride is the next one's extent times its stride
    let uniform = D >= 2
        && st[D - 1] == 1
        && (0..D - 2).all(|k| st[k] == shape[k + 1] as isize * st[k + 1])
        && st[D - 2] >= d as isize;
    if !known(&xf)
        || !known(&gf)
        || !uniform
        || gf.layout().num_elements() != d
        || rows == 0
        || !gf.layout().is_contiguous()
    {
        return Err(from_flex(xf));
    }
    let stride = st[D - 2] as usize;
    let start = xf.layout().start_offset();
    let span = (rows - 1) * stride + d;
    let mut out = vec![0f32; rows * d];
    crate::kernels::norm::rms_norm(
        crate::kernels::Level::current(),
        elems(&xf, start, span),
        stride,
        elems(&gf, gf.layout().start_offset(), d),
        eps as f32,
        &mut out,
    );
    Ok(from_flex(from_f32(out, shape, xf.dtype())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_gate_equals_silu_times_b() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let dev = Default::default();
        let n = 3 * 5 * 37;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let ys = crate::rng::uniform(n, 4);
        let a = Tensor::<Flex, 3>::from_data(TensorData::new(xs, [3, 5, 37]), &dev);
        let b = Tensor::<Flex, 3>::from_data(TensorData::new(ys, [3, 5, 37]), &dev);
        let want = burn::tensor::activation::silu(a.clone()) * b.clone();
        let got = swiglu_gate(a.clone(), b.clone()).unwrap_or_else(|_| panic!("flex path"));
        let d: f32 = (got - want.clone()).abs().max().into_scalar();
        let scale: f32 = want.abs().max().into_scalar();
        assert!(d <= 2e-6 * scale, "{d} of {scale}");
        // half precision: read as stored, rounded once
        for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
            let (ah, bh) = (a.clone().cast(dt), b.clone().cast(dt));
            let want = burn::tensor::activation::silu(ah.clone().cast(DType::F32))
                * bh.clone().cast(DType::F32);
            let got = swiglu_gate(ah, bh).unwrap_or_else(|_| panic!("flex path in {dt:?}"));
            assert_eq!(got.dtype(), dt);
            let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
            assert!(d <= tol * scale, "{dt:?}: {d} of {scale}");
        }
        // a strided view keeps Burn's ops
        assert!(swiglu_gate(a.clone().swap_dims(0, 1), b.swap_dims(0, 1)).is_err());
    }

    #[test]
    fn half_precision_adds_equal_burns_bit_for_bit() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let dev = Default::default();
        let n = 3 * 5 * 37;
        let t = |seed| {
            let v: Vec<f32> = crate::rng::uniform(n, seed)
                .iter()
                .map(|x| x * 50.0)
                .collect();
            Tensor::<Flex, 3>::from_data(TensorData::new(v, [3, 5, 37]), &dev)
        };
        let (a, b) = (t(1), t(2));
        for dt in [DType::F16, DType::BF16] {
            let (ah, bh) = (a.clone().cast(dt), b.clone().cast(dt));
            let want = ah.clone() + bh.clone();
            let got = add_half(ah, bh).unwrap_or_else(|_| panic!("flex path in {dt:?}"));
            assert_eq!(got.dtype(), dt);
            assert_eq!(got.into_data(), want.into_data(), "{dt:?}");
        }
        // f32 and strided views keep Burn's add; crate::nn::add gives the f32 sum rounded once
        // either way (checked against a sum taken in f32)
        assert!(add_half(a.clone(), b.clone()).is_err());
        let (ah, bh) = (a.clone().cast(DType::F16), b.clone().cast(DType::F16));
        assert!(add_half(ah.clone().swap_dims(0, 1), bh.clone().swap_dims(0, 1)).is_err());
        let in_f32 = |x: Tensor<Flex, 3>, y: Tensor<Flex, 3>| {
            (x.cast(DType::F32) + y.cast(DType::F32)).cast(DType::F16)
        };
        let want = in_f32(ah.clone(), bh.clone()).swap_dims(0, 1).into_data();
        let got = crate::nn::add(ah.clone().swap_dims(0, 1), bh.clone().swap_dims(0, 1));
        assert_eq!(got.into_data(), want);
        // a contiguous view that starts past the buffer's first element, and a tensor large
        // enough to be split over the pool
        let r = [1..3, 0..5, 0..37];
        let (av, bv) = (ah.clone().slice(r.clone()), bh.clone().slice(r));
        let want = in_f32(av.clone(), bv.clone()).into_data();
        assert_eq!(
            add_half(av, bv)
                .unwrap_or_else(|_| panic!("view"))
                .into_data(),
            want
        );
        let big = |seed| {
            let n = 3 * 64 * 512;
            let v: Vec<f32> = crate::rng::uniform(n, seed)
                .iter()
                .map(|x| x * 50.0)
                .collect();
            Tensor::<Flex, 3>::from_data(TensorData::new(v, [3, 64, 512]), &dev).cast(DType::F16)
        };
        let (x, y) = (big(3), big(4));
        let want = in_f32(x.clone(), y.clone()).into_data();
        assert_eq!(crate::nn::add(x, y).into_data(), want);
    }

    #[test]
    fn half_precision_scaling_equals_burns_bit_for_bit() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let dev = Default::default();
        let v: Vec<f32> = crate::rng::uniform(4 * 37, 5)
            .iter()
            .map(|x| x * 300.0)
            .collect();
        let a = Tensor::<Flex, 2>::from_data(TensorData::new(v, [4, 37]), &dev);
        let s = 1.0 / (192f64).sqrt();
        for dt in [DType::F16, DType::BF16] {
            let ah = a.clone().cast(dt);
            let want = (ah.clone() * s).into_data();
            let got = scale_half(ah.clone(), s).unwrap_or_else(|_| panic!("flex path in {dt:?}"));
            assert_eq!(got.dtype(), dt);
            assert_eq!(got.into_data(), want, "{dt:?}");
            // a strided view keeps Burn's op; crate::nn::scale gives the same either way
            assert!(scale_half(ah.clone().swap_dims(0, 1), s).is_err());
            let want = (ah.clone().swap_dims(0, 1) * s).into_data();
            assert_eq!(crate::nn::scale(ah.swap_dims(0, 1), s).into_data(), want);
        }
        assert!(scale_half(a, s).is_err());
    }

    #[test]
    fn rms_norm_equals_burns_in_every_dtype_and_on_a_column_slice() {
        use burn::backend::Flex;
        use burn::nn::RmsNormConfig;
        use burn::tensor::TensorData;
        let dev = Default::default();
        let n: burn::nn::RmsNorm<Flex> = RmsNormConfig::new(37).with_epsilon(1e-5).init(&dev);
        let gamma =
            Tensor::<Flex, 1>::from_data(TensorData::new(crate::rng::uniform(37, 2), [37]), &dev);
        let n = burn::nn::RmsNorm {
            gamma: burn::module::Param::from_tensor(gamma),
            ..n
        };
        let raw = Tensor::<Flex, 3>::from_data(
            TensorData::new(crate::rng::uniform(3 * 5 * 40, 4), [3, 5, 40]),
            &dev,
        );
        // contiguous rows, and MLA's kv_norm input: the first 37 of 40 columns
        for x in [
            raw.clone().slice([0..3, 0..5, 0..37]),
            raw.clone().slice([0..3, 0..5, 3..40]),
        ] {
            let want = n.forward(x.clone());
            let got = crate::nn::rms_norm(&n, x.clone());
            let d: f32 = (got - want).abs().max().into_scalar();
            assert!(d <= 1e-5, "f32: {d}");
            for (dt, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
                let xh = x.clone().cast(dt);
                let want = n.forward(xh.clone().cast(DType::F32));
                let got = rms_norm(xh, n.gamma.val(), n.epsilon).unwrap_or_else(|_| panic!("flex"));
                assert_eq!(got.dtype(), dt);
                let d: f32 = (got.cast(DType::F32) - want).abs().max().into_scalar();
                assert!(d <= tol, "{dt:?}: {d}");
            }
        }
        // a transposed view keeps Burn's ops
        assert!(rms_norm(raw.swap_dims(1, 2), n.gamma.val(), n.epsilon).is_err());
    }
}
