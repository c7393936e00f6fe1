//! fp32 <-> fp16/bf16 conversion over little-endian byte buffers. The `half` crate does the
//! element work (F16C instructions when the CPU has them); this module only deals with byte
//! buffers that may not be aligned for the typed view (a slice of a Python bytes object can start
//! anywhere), falling back to an aligned scratch copy in that case.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Runs `f` on `data` viewed as `[T]`, copying into an aligned buffer only when needed.
pub(crate) fn with_typed<T: bytemuck::Pod, R>(data: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    match bytemuck::try_cast_slice::<u8, T>(data) {
        Ok(typed) => f(typed),
        Err(_) => {
            let mut scratch = vec![T::zeroed(); data.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut scratch).copy_from_slice(data);
            f(&scratch)
        }
    }
}

/// Runs `f` on `out` viewed as `[T]`, going through an aligned scratch buffer only when needed.
pub(crate) fn with_typed_mut<T: bytemuck::Pod>(out: &mut [u8], f: impl FnOnce(&mut [T])) {
    match bytemuck::try_cast_slice_mut::<u8, T>(out) {
        Ok(typed) => f(typed),
        Err(_) => {
            let mut scratch = vec![T::zeroed(); out.len() / std::mem::size_of::<T>()];
            f(&mut scratch);
            out.copy_from_slice(bytemuck::cast_slice(&scratch));
        }
    }
}

/// `out` must be exactly half of `data`'s length.
pub(super) fn f32_to_f16(data: &[u8], out: &mut [u8]) {
    with_typed(data, |src: &[f32]| with_typed_mut(out, |dst: &mut [f16]| dst.convert_from_f32_slice(src)));
}

/// `out` must be exactly half of `data`'s length.
pub(super) fn f32_to_bf16(data: &[u8], out: &mut [u8]) {
    with_typed(data, |src: &[f32]| with_typed_mut(out, |dst: &mut [bf16]| dst.convert_from_f32_slice(src)));
}

pub(super) fn f16_to_f32(payload: &[u8], out: &mut [u8]) {
    with_typed(payload, |src: &[f16]| with_typed_mut(out, |dst: &mut [f32]| src.convert_to_f32_slice(dst)));
}

pub(super) fn bf16_to_f32(payload: &[u8], out: &mut [u8]) {
    with_typed(payload, |src: &[bf16]| with_typed_mut(out, |dst: &mut [f32]| src.convert_to_f32_slice(dst)));
}
