//! Blockwise absmax int8 quantisation (the scheme of bitsandbytes' blockwise 8-bit, Dettmers et
//! al. 2022, "8-bit Optimizers via Block-wise Quantization", §2.1, with a linear rather than
//! dynamic code). Payload layout: `[absmax: f32 LE; n_blocks][q: i8; n]`.
//!
//! The per-block loops run on fixed-size arrays (`const B`) so LLVM unrolls and vectorises them
//! with the baseline x86-64 (SSE2) or aarch64 (NEON) instruction set; no `unsafe`, no intrinsics.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::half_float::{with_typed, with_typed_mut};
use super::CodecError;
use crate::dtype::DType;

const ABS_MASK: u32 = 0x7fff_ffff;
const INF_BITS: u32 = 0x7f80_0000;
/// Adding 1.5 * 2^23 to an f32 of magnitude < 2^22 rounds it to an integer (ties to even) that
/// then sits in the low mantissa bits: subtracting the constant's bit pattern reads it out with
/// integer ops only. `f32::round_ties_even` is a libm call on SSE2 and a saturating `as i8`
/// cast is scalar; this stays in vector registers.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;

/// `v` must lie in [-127.5, 127.5): callers scale by 127/absmax, so |v| <= 127 * (1 + 2^-22).
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    ((v + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC_BITS) as i8
}

/// Quantises one block; `None` when it holds inf or NaN.
#[inline(always)]
fn quantize_block(x: &[f32], q: &mut [i8]) -> Option<f32> {
    // |x| compared as bits: for non-negative floats integer order is float order, and an integer
    // max vectorises where f32::max (NaN-aware) does not. NaN bits sort above inf.
    let max_bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & ABS_MASK));
    if max_bits >= INF_BITS {
        return None;
    }
    let absmax = f32::from_bits(max_bits);
    let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
    if inv.is_finite() {
        for (o, v) in q.iter_mut().zip(x) {
            *o = round_to_i8(v * inv);
        }
    } else {
        // absmax is a tiny subnormal and 127/absmax overflowed: divide in f64 instead.
        for (o, v) in q.iter_mut().zip(x) {
            *o = round_to_i8((f64::from(*v) * 127.0 / f64::from(absmax)) as f32);
        }
    }
    Some(absmax)
}

#[inline(always)]
fn quantize_fixed<const B: usize>(x: &[f32], q: &mut [i8]) -> Option<f32> {
    let x: &[f32; B] = x.try_into().ok()?;
    let q: &mut [i8; B] = q.try_into().ok()?;
    quantize_block(x, q)
}

/// Outside this absmax range `absmax / 127` underflows into subnormals or `127 * scale`
/// overflows to inf, so such blocks take an f64 path.
const PLAIN_ABSMAX: std::ops::Range<f32> = 1e-30..1e30;

fn dequantize_extreme(absmax: f32, q: &[i8], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(q) {
        *o = (f64::from(*v) * f64::from(absmax) / 127.0) as f32;
    }
}

#[inline(always)]
fn dequantize_fixed<const B: usize>(absmax: f32, q: &[i8], out: &mut [f32]) {
    let scale = absmax / 127.0;
    if !PLAIN_ABSMAX.contains(&absmax) {
        return dequantize_extreme(absmax, q, out);
    }
    if let (Ok(q), Ok(out)) = (<&[i8; B]>::try_from(q), <&mut [f32; B]>::try_from(out)) {
        for (o, v) in out.iter_mut().zip(q) {
            *o = f32::from(*v) * scale;
        }
    }
}

/// Quantises `src` in blocks of `block` elements into `absmax` (one per block) and `q`.
pub fn quantize_blockwise(
    src: &[f32],
    block: usize,
    absmax: &mut [f32],
    q: &mut [i8],
) -> Result<(), CodecError> {
    let blocks = src.len().div_ceil(block);
    if absmax.len() != blocks || q.len() != src.len() || block == 0 {
        return Err(CodecError::SizeMismatch { expected: blocks, got: absmax.len() });
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { quantize_avx2(src, block, absmax, q) };
    }
    quantize_all(src, block, absmax, q)
}

/// The same loops compiled for AVX2: twice the lanes of the SSE2 baseline the wheel targets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(
    src: &[f32],
    block: usize,
    absmax: &mut [f32],
    q: &mut [i8],
) -> Result<(), CodecError> {
    quantize_all(src, block, absmax, q)
}

#[inline(always)]
fn quantize_all(src: &[f32], block: usize, absmax: &mut [f32], q: &mut [i8]) -> Result<(), CodecError> {
    let chunks = src.chunks(block).zip(q.chunks_mut(block)).zip(absmax.iter_mut());
    for (i, ((x, q), m)) in chunks.enumerate() {
        let got = match (block, x.len() == block) {
            (64, true) => quantize_fixed::<64>(x, q),
            (256, true) => quantize_fixed::<256>(x, q),
            _ => quantize_block(x, q),
        };
        *m = got.ok_or(CodecError::NonFinite { block: i })?;
    }
    Ok(())
}

/// Inverse of [`quantize_blockwise`]: `out[i] = q[i] * absmax[block] / 127`.
pub fn dequantize_blockwise(absmax: &[f32], q: &[i8], block: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { dequantize_avx2(absmax, q, block, out) };
    }
    dequantize_all(absmax, q, block, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_avx2(absmax: &[f32], q: &[i8], block: usize, out: &mut [f32]) {
    dequantize_all(absmax, q, block, out)
}

#[inline(always)]
fn dequantize_all(absmax: &[f32], q: &[i8], block: usize, out: &mut [f32]) {
    let chunks = q.chunks(block).zip(out.chunks_mut(block)).zip(absmax);
    for ((q, out), m) in chunks {
        match (block, q.len() == block) {
            (64, true) => dequantize_fixed::<64>(*m, q, out),
            (256, true) => dequantize_fixed::<256>(*m, q, out),
            _ if !PLAIN_ABSMAX.contains(m) => dequantize_extreme(*m, q, out),
            _ => {
                let scale = *m / 127.0;
                for (o, v) in out.iter_mut().zip(q) {
                    *o = f32::from(*v) * scale;
                }
            }
        }
    }
}

fn to_f32(dtype: DType, data: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; data.len() / dtype.itemsize()];
    match dtype {
        DType::F16 => with_typed(data, |s: &[f16]| s.convert_to_f32_slice(&mut out)),
        DType::BF16 => with_typed(data, |s: &[bf16]| s.convert_to_f32_slice(&mut out)),
        _ => with_typed(data, |s: &[f32]| out.copy_from_slice(s)),
    }
    out
}

/// `out` must be exactly `Lossy::Int8(block).encoded_len(dtype, numel)` bytes.
pub(super) fn encode(dtype: DType, data: &[u8], block: usize, out: &mut [u8]) -> Result<(), CodecError> {
    let numel = data.len() / dtype.itemsize();
    let blocks = numel.div_ceil(block);
    let (scales, q) = out.split_at_mut(blocks * 4);
    let q: &mut [i8] = bytemuck::cast_slice_mut(q);
    let mut result = Ok(());
    let mut run = |src: &[f32]| {
        with_typed_mut(scales, |s: &mut [f32]| result = quantize_blockwise(src, block, s, q));
    };
    if dtype == DType::F32 {
        with_typed(data, |src: &[f32]| run(src));
    } else {
        run(&to_f32(dtype, data));
    }
    result
}

pub(super) fn decode(dtype: DType, payload: &[u8], block: usize, out: &mut [u8]) {
    let numel = out.len() / dtype.itemsize();
    let (scales, q) = payload.split_at(numel.div_ceil(block) * 4);
    let q: &[i8] = bytemuck::cast_slice(q);
    with_typed(scales, |scales: &[f32]| match dtype {
        DType::F32 => with_typed_mut(out, |o: &mut [f32]| dequantize_blockwise(scales, q, block, o)),
        _ => {
            let mut wide = vec![0f32; numel];
            dequantize_blockwise(scales, q, block, &mut wide);
            match dtype {
                DType::F16 => with_typed_mut(out, |o: &mut [f16]| o.convert_from_f32_slice(&wide)),
                _ => with_typed_mut(out, |o: &mut [bf16]| o.convert_from_f32_slice(&wide)),
            }
        }
    });
}
