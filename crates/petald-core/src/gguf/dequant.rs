//! Dequantization of the ggml block formats that small GGUF checkpoints use most (Q4_0, Q4_1,
//! Q8_0) to f32, bit for bit as the `gguf` Python package computes them (its numpy code is the
//! reference the tests compare with): each block of 32 weights carries an f16 scale `d` (and for
//! Q4_1 an f16 minimum `m`), and a weight is `d * q` (`d * q + m`), one f32 multiply then one
//! add, never fused. Other types stay with the `gguf` package.

use half::f16;

/// Weights per block, for every type here.
pub const BLOCK: usize = 32;

/// ggml type codes (ggml.h `enum ggml_type`).
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DequantError {
    #[error("ggml type {0} is not dequantized here")]
    Unsupported(u32),
    #[error("{len} bytes are not whole blocks of {block} bytes")]
    PartialBlock { len: usize, block: usize },
    #[error("output holds {have} weights, the input {need}")]
    OutputSize { have: usize, need: usize },
}

/// Bytes per block of `ggml_type`, or None when it is not handled here.
pub fn block_bytes(ggml_type: u32) -> Option<usize> {
    match ggml_type {
        Q4_0 => Some(2 + BLOCK / 2),
        Q4_1 => Some(4 + BLOCK / 2),
        Q8_0 => Some(2 + BLOCK),
        _ => None,
    }
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `data` (whole blocks) into `out`, which must hold exactly 32 weights per block.
pub fn dequantize(ggml_type: u32, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let block = block_bytes(ggml_type).ok_or(DequantError::Unsupported(ggml_type))?;
    if data.len() % block != 0 {
        return Err(DequantError::PartialBlock { len: data.len(), block });
    }
    let need = data.len() / block * BLOCK;
    if out.len() != need {
        return Err(DequantError::OutputSize { have: out.len(), need });
    }
    let blocks = data.chunks_exact(block).zip(out.chunks_exact_mut(BLOCK));
    match ggml_type {
        Q4_0 => {
            for (b, y) in blocks {
                let d = half(b);
                let (lo, hi) = y.split_at_mut(BLOCK / 2);
                for ((q, l), h) in b[2..].iter().zip(lo).zip(hi) {
                    *l = d * f32::from((q & 0x0f) as i8 - 8);
                    *h = d * f32::from((q >> 4) as i8 - 8);
                }
            }
        }
        Q4_1 => {
            for (b, y) in blocks {
                let (d, m) = (half(b), half(&b[2..]));
                let (lo, hi) = y.split_at_mut(BLOCK / 2);
                for ((q, l), h) in b[4..].iter().zip(lo).zip(hi) {
                    *l = d * f32::from(q & 0x0f) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }
        }
        _ => {
            for (b, y) in blocks {
                let d = half(b);
                for (q, w) in b[2..].iter().zip(y) {
                    *w = f32::from(*q as i8) * d;
                }
            }
        }
    }
    Ok(())
}

/// `dequantize` into raw bytes (native-endian f32), e.g. a new Python bytearray.
pub fn dequantize_bytes(ggml_type: u32, data: &[u8], out: &mut [u8]) -> Result<(), DequantError> {
    let have = out.len() / 4;
    let weights: &mut [f32] =
        bytemuck::try_cast_slice_mut(out).map_err(|_| DequantError::OutputSize { have, need: usize::MAX })?;
    dequantize(ggml_type, data, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_block(d: f32, m: f32, qs: [u8; 16]) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_le_bytes().to_vec();
        b.extend(f16::from_f32(m).to_le_bytes());
        b.extend(qs);
        b
    }

    #[test]
    fn q4_1_low_nibbles_first_then_high() {
        let mut qs = [0u8; 16];
        qs[0] = 0x3a; // weight 0 gets 0xa, weight 16 gets 0x3
        let data = q4_1_block(0.5, -1.0, qs);
        let mut out = [0f32; 32];
        dequantize(Q4_1, &data, &mut out).expect("whole block");
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_are_signed() {
        let mut q4 = f16::from_f32(2.0).to_le_bytes().to_vec();
        q4.extend([0x0fu8; 16]); // low nibble 15 -> 7, high nibble 0 -> -8
        let mut out = [0f32; 32];
        dequantize(Q4_0, &q4, &mut out).expect("whole block");
        assert_eq!((out[0], out[16]), (14.0, -16.0));
        let mut q8 = f16::from_f32(0.25).to_le_bytes().to_vec();
        q8.extend([0x80u8; 32]); // -128
        dequantize(Q8_0, &q8, &mut out).expect("whole block");
        assert!(out.iter().all(|&w| w == -32.0));
    }

    #[test]
    fn sizes_are_checked() {
        let mut out = [0f32; 32];
        assert_eq!(
            dequantize(Q8_0, &[0; 33], &mut out),
            Err(DequantError::PartialBlock { len: 33, block: 34 })
        );
        assert_eq!(
            dequantize(Q8_0, &[0; 68], &mut out),
            Err(DequantError::OutputSize { have: 32, need: 64 })
        );
        assert_eq!(dequantize(12, &[], &mut out), Err(DequantError::Unsupported(12)));
    }
}
