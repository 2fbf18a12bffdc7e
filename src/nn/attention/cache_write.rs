//! KV 缓存的原地写入：每步只写新 token 的那几行，不复制整块缓存。
//!
//! Burn's `slice_assign` is the portable way to write rows into a pre-sized cache, and on the
//! CubeCL backends (wgpu, CUDA) it writes in place. On burn-flex 0.21 it does not: its writer
//! (`ops/slice.rs`, `slice_write_impl`) shadows the destination with `to_contiguous()` (a second
//! handle to the same buffer) before `storage_mut()`, so the copy-on-write check always sees two
//! owners and copies the WHOLE cache on every write — at 8192 tokens that is the entire KV cache
//! per layer per decode step, and a second cache-sized buffer at the peak.
//!
//! So on flex the rows are copied straight into the cache's buffer here: the cache tensor is
//! uniquely owned by the [`super::LayerCache`] at the moment of the write (the attention's views
//! of it are dropped by then), and `FlexTensor::try_storage_mut` hands out its buffer without a
//! copy exactly when that holds. When it does not (a caller kept a clone of the cache), the
//! portable path runs and the copy is real — `tests` and the decode-allocation figure in the
//! MLA report show it.
//!
//! The backend is recognised at run time by the type of its tensor primitive (`Any`
//! downcast), so the model code stays generic over `B: Backend` and the concrete CPU backend is
//! still named only at the binary's dispatch point.

use burn::backend::flex::FlexTensor;
use burn::tensor::{backend::Backend, bf16, f16, DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::nn::flex::{from_flex, into_flex};

/// A zero-filled cache tensor of `shape` in the device's default float dtype, allocated once.
///
/// Not `Tensor::zeros`: on burn-flex 0.21 that allocates a `Vec<u8>` and then copies it into a
/// 16-byte-aligned buffer (cubecl's `Bytes::from_bytes_vec` judges alignment by the declared
/// layout, 1 for bytes, not by the pointer), so every cache briefly existed twice — a whole
/// extra cache at the measured peak. `Tensor::full` builds a typed vector and keeps it.
pub fn zeros<B: Backend>(shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::full(shape, 0.0, device)
}

/// Writes `new` `[b, g, s, d]` into `cache` `[b, g, cap, d]` at rows `starts[i]..starts[i]+s` of
/// sequence `i`. In place on every backend where that is possible; one call for the whole batch.
pub fn write_rows<B: Backend>(
    cache: Tensor<B, 4>,
    new: Tensor<B, 4>,
    starts: &[usize],
) -> Tensor<B, 4> {
    let [b, _, s, _] = new.dims();
    let cap = cache.dims()[2];
    assert_eq!(starts.len(), b, "one start position per sequence");
    assert!(
        starts.iter().all(|&st| st + s <= cap),
        "KV cache overflow: capacity {cap}"
    );
    let (cache, new) = match flex_write(cache, new, starts) {
        Ok(done) => return done,
        Err(back) => back,
    };
    portable(cache, new, starts)
}

/// The portable write: one `slice_assign` when every sequence starts at the same position,
/// else ONE `scatter_nd` (assign) of all `b·g·s` rows at their `(sequence, group, position)`
/// — not a `slice_assign` per sequence (on a GPU that was 2·b kernel launches per layer and
/// step once the sequences of a speculative batch diverge).
fn portable<B: Backend>(cache: Tensor<B, 4>, new: Tensor<B, 4>, starts: &[usize]) -> Tensor<B, 4> {
    let [b, g, s, d] = new.dims();
    if let Some(st) = crate::nn::rope::uniform(starts) {
        return cache.slice_assign([0..b, 0..g, st..st + s, 0..d], new);
    }
    let mut idx = Vec::with_capacity(b * g * s * 3);
    for (i, &st) in starts.iter().enumerate() {
        for gi in 0..g {
            for j in 0..s {
                idx.extend([i as i64, gi as i64, (st + j) as i64]);
            }
        }
    }
    let device = cache.device();
    let indices = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [b * g * s, 3]), &device);
    cache.scatter_nd(
        indices,
        new.reshape([b * g * s, d]),
        IndexingUpdateOp::Assign,
    )
}

/// The flex fast path; gives both tensors back untouched when it does not apply (another
/// backend, a shared or non-contiguous cache, mixed dtypes).
#[allow(clippy::type_complexity)]
fn flex_write<B: Backend>(
    cache: Tensor<B, 4>,
    new: Tensor<B, 4>,
    starts: &[usize],
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
    let dims = new.dims();
    let cap = cache.dims()[2];
    let mut c = match into_flex(cache) {
        Ok(c) => c,
        Err(cache) => return Err((cache, new)), // not flex: the portable path
    };
    let n = match into_flex(new) {
        Ok(n) => n,
        Err(new) => return Err((from_flex(c), new)),
    };
    let usable = c.dtype() == n.dtype()
        && c.layout().is_contiguous()
        && c.layout().start_offset() == 0
        && c.is_unique();
    if usable {
        let n = n.to_contiguous();
        let written = match c.dtype() {
            DType::F32 => copy_rows::<f32>(&mut c, &n, starts, dims, cap),
            DType::F16 => copy_rows::<f16>(&mut c, &n, starts, dims, cap),
            DType::BF16 => copy_rows::<bf16>(&mut c, &n, starts, dims, cap),
            _ => false,
        };
        if written {
            return Ok(from_flex(c));
        }
        return Err((from_flex(c), from_flex(n)));
    }
    Err((from_flex(c), from_flex(n)))
}

/// Copies the `s` rows of each `(sequence, group)` of `new` into `cache`'s buffer, in place.
/// `false` (nothing written) when the buffer is shared.
fn copy_rows<E: burn::tensor::Element + bytemuck::Pod>(
    cache: &mut FlexTensor,
    new: &FlexTensor,
    starts: &[usize],
    [b, g, s, d]: [usize; 4],
    cap: usize,
) -> bool {
    let src: &[E] = new.storage();
    let src = &src[new.layout().start_offset()..];
    let Some(dst) = cache.try_storage_mut::<E>() else {
        return false;
    };
    let row = s * d;
    for (i, &st) in starts.iter().enumerate() {
        for j in 0..g {
            let from = (i * g + j) * row;
            let to = ((i * g + j) * cap + st) * d;
            dst[to..to + row].copy_from_slice(&src[from..from + row]);
        }
    }
    debug_assert_eq!(starts.len(), b);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    use crate::nn::test_util::t4;

    type B = Flex;

    /// The address of a flex tensor's buffer.
    fn addr(t: &Tensor<B, 4>) -> usize {
        let Ok(f) = into_flex(t.clone()) else {
            panic!("a flex tensor")
        };
        f.bytes().as_ptr() as usize
    }

    /// The portable reference: Burn's slice_assign, one sequence at a time.
    fn reference(cache: Tensor<B, 4>, new: Tensor<B, 4>, starts: &[usize]) -> Tensor<B, 4> {
        let [_, g, s, d] = new.dims();
        let mut cache = cache;
        for (i, &st) in starts.iter().enumerate() {
            let row = new.clone().slice([i..i + 1, 0..g, 0..s, 0..d]);
            cache = cache.slice_assign([i..i + 1, 0..g, st..st + s, 0..d], row);
        }
        cache
    }

    #[test]
    fn writes_equal_slice_assign_and_happen_in_place() {
        let dev = Default::default();
        for starts in [vec![0, 0, 0], vec![3, 0, 7], vec![5, 5, 5]] {
            let cache = Tensor::<B, 4>::zeros([3, 2, 10, 4], &dev);
            // a non-contiguous source (a swapped view, as heads come out of a projection)
            let new = t4([3, 3, 2, 4], 1).swap_dims(1, 2);
            let want = reference(cache.clone(), new.clone(), &starts);
            let before = addr(&cache);
            let got = write_rows(cache, new, &starts);
            assert_eq!(
                addr(&got),
                before,
                "{starts:?}: the cache buffer was replaced"
            );
            let d: f32 = (got - want).abs().max().into_scalar();
            assert_eq!(d, 0.0, "{starts:?}");
        }
    }

    #[test]
    fn the_batched_scatter_equals_per_sequence_writes() {
        // the portable path (wgpu, CUDA): one scatter for the whole batch
        for starts in [vec![3, 0, 7], vec![5, 5, 5], vec![0, 6, 1]] {
            let cache = t4([3, 2, 10, 4], 9);
            let new = t4([3, 3, 2, 4], 1).swap_dims(1, 2);
            let want = reference(cache.clone(), new.clone(), &starts);
            let got = portable(cache, new, &starts);
            let d: f32 = (got - want).abs().max().into_scalar();
            assert_eq!(d, 0.0, "{starts:?}");
        }
    }

    #[test]
    fn a_shared_cache_is_copied_not_corrupted() {
        let dev = Default::default();
        let cache = Tensor::<B, 4>::zeros([1, 1, 4, 2], &dev);
        let keep = cache.clone(); // a second owner: writing in place would change `keep`
        let got = write_rows(cache, Tensor::ones([1, 1, 1, 2], &dev), &[1]);
        assert_ne!(addr(&got), addr(&keep));
        assert_eq!(keep.sum().into_scalar(), 0.0);
        assert_eq!(got.sum().into_scalar(), 2.0);
    }

    #[test]
    fn half_precision_caches_are_written_in_place() {
        let dev = Default::default();
        for dtype in [DType::F16, DType::BF16] {
            let cache = Tensor::<B, 4>::zeros([2, 1, 6, 3], (&dev, dtype));
            let new = t4([2, 1, 2, 3], 4).cast(dtype);
            let want = reference(cache.clone(), new.clone(), &[1, 4]);
            let before = addr(&cache);
            let got = write_rows(cache, new, &[1, 4]);
            assert_eq!(addr(&got), before, "{dtype:?}");
            assert_eq!(got.dtype(), dtype);
            let d: f32 = (got.cast(DType::F32) - want.cast(DType::F32))
                .abs()
                .max()
                .into_scalar();
            assert_eq!(d, 0.0, "{dtype:?}");
        }
    }
}
