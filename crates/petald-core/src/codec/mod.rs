//! Payload codecs for tensor frames. A [`Codec`] is an optional lossy transform of floating-point
//! elements (fp16, bf16, blockwise int8) followed by optional zstd; the two compose, e.g.
//! `int8+zstd:3`. Entry points: [`Codec::parse`], [`Codec::encode`], [`Codec::decode_into`].
//!
//! Error bounds of the lossy transforms (all tested):
//! - `fp16`: IEEE round-to-nearest-even, like `tensor.to(torch.float16)`; relative error
//!   <= 2^-11 for |x| in the normal range [6.1e-5, 65504]; absolute error <= 2^-25 below it;
//!   |x| > 65504 becomes ±inf, exactly as torch does.
//! - `bf16`: round-to-nearest-even; relative error <= 2^-8 for normal x, absolute error
//!   <= 2^-134 for f32 subnormals (bf16 keeps f32's exponent range, not its precision); NaN
//!   stays NaN.
//! - `int8`/`int8-256`: blockwise absmax quantisation (the scheme of bitsandbytes' blockwise
//!   8-bit): each block of 64 (or 256) elements stores its absmax as f32 and the elements as
//!   round(x * 127 / absmax). |x - x'| <= absmax/254 (half a step) plus f32 rounding, so we test
//!   `absmax/254 * (1 + 1e-4)`, plus one subnormal ulp (1.4e-45) for subnormal blocks. For f16/bf16 sources the result is rounded back to that dtype,
//!   which adds at most half an ulp of it. Blocks holding inf or NaN are refused
//!   ([`CodecError::NonFinite`]) instead of silently turning into NaN.

mod half_float;
mod int8;

use std::borrow::Cow;

use crate::dtype::DType;

pub use int8::{dequantize_blockwise, quantize_blockwise};

/// zstd's own default level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Levels we accept: zstd's fast negative levels down to -7 and the normal range up to 22.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=22;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("unknown codec {0:?}: expected none, fp16, bf16, int8, int8-256, zstd[:LEVEL] or a lossy codec + zstd, e.g. \"int8+zstd:3\"")]
    UnknownCodec(String),
    #[error("zstd level {0} is out of range {min}..={max}", min = ZSTD_LEVELS.start(), max = ZSTD_LEVELS.end())]
    BadLevel(i32),
    #[error("codec {codec} cannot encode {dtype} tensors (it needs {needs})")]
    Unsupported { codec: &'static str, dtype: DType, needs: &'static str },
    #[error("int8 codec: block {block} holds inf or NaN, which blockwise quantisation cannot represent; use fp16/bf16/none")]
    NonFinite { block: usize },
    #[error("payload has {got} bytes, expected {expected}")]
    SizeMismatch { expected: usize, got: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("unknown codec code {0} in frame")]
    UnknownCode(u8),
}

/// The lossy transform applied before compression. Wire codes are part of petald/v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lossy {
    None,
    F16,
    BF16,
    /// Blockwise absmax int8 with the given block size (64 or 256).
    Int8(usize),
}

impl Lossy {
    pub fn code(self) -> u8 {
        match self {
            Lossy::None => 0,
            Lossy::F16 => 1,
            Lossy::BF16 => 2,
            Lossy::Int8(256) => 4,
            Lossy::Int8(_) => 3,
        }
    }

    pub fn from_code(code: u8) -> Result<Lossy, CodecError> {
        Ok(match code {
            0 => Lossy::None,
            1 => Lossy::F16,
            2 => Lossy::BF16,
            3 => Lossy::Int8(64),
            4 => Lossy::Int8(256),
            other => return Err(CodecError::UnknownCode(other)),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Lossy::None => "none",
            Lossy::F16 => "fp16",
            Lossy::BF16 => "bf16",
            Lossy::Int8(256) => "int8-256",
            Lossy::Int8(_) => "int8",
        }
    }

    /// Refuses source dtypes the transform is not defined for.
    pub fn check_source(self, dtype: DType) -> Result<(), CodecError> {
        let ok = match self {
            Lossy::None => true,
            Lossy::F16 | Lossy::BF16 => dtype == DType::F32,
            Lossy::Int8(_) => matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        };
        if ok {
            return Ok(());
        }
        let needs = match self {
            Lossy::Int8(_) => "float32, float16 or bfloat16",
            _ => "float32",
        };
        Err(CodecError::Unsupported { codec: self.name(), dtype, needs })
    }

    /// Exact byte size of the transformed payload for `numel` elements of `dtype`.
    pub fn encoded_len(self, dtype: DType, numel: usize) -> Option<usize> {
        match self {
            Lossy::None => numel.checked_mul(dtype.itemsize()),
            Lossy::F16 | Lossy::BF16 => numel.checked_mul(2),
            Lossy::Int8(block) => numel.checked_add(numel.div_ceil(block).checked_mul(4)?),
        }
    }
}

/// A codec: a lossy transform, then optional zstd at a level (the level is not on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Codec {
    pub lossy: Lossy,
    pub zstd_level: Option<i32>,
}

impl Codec {
    pub const NONE: Codec = Codec { lossy: Lossy::None, zstd_level: None };

    /// Parses `none`, `zstd`, `zstd:LEVEL`, `fp16`, `bf16`, `int8`, `int8-64`, `int8-256`, and a
    /// lossy one joined to zstd with `+` (`fp16+zstd`, `int8-256+zstd:5`).
    pub fn parse(spec: &str) -> Result<Codec, CodecError> {
        let unknown = || CodecError::UnknownCodec(spec.to_string());
        let spec_lc = spec.trim().to_ascii_lowercase();
        let mut lossy = None;
        let mut zstd_level = None;
        for part in spec_lc.split('+') {
            let (name, level) = match part.split_once(':') {
                Some((n, l)) => (n, Some(l)),
                None => (part, None),
            };
            match (name, level) {
                ("zstd", level) if zstd_level.is_none() => {
                    let level = match level {
                        None => DEFAULT_ZSTD_LEVEL,
                        Some(l) => l.parse::<i32>().map_err(|_| unknown())?,
                    };
                    if !ZSTD_LEVELS.contains(&level) {
                        return Err(CodecError::BadLevel(level));
                    }
                    zstd_level = Some(level);
                }
                (name, None) if lossy.is_none() => {
                    lossy = Some(match name {
                        "none" => Lossy::None,
                        "fp16" | "float16" => Lossy::F16,
                        "bf16" | "bfloat16" => Lossy::BF16,
                        "int8" | "int8-64" => Lossy::Int8(64),
                        "int8-256" => Lossy::Int8(256),
                        _ => return Err(unknown()),
                    });
                }
                _ => return Err(unknown()),
            }
        }
        if lossy == Some(Lossy::None) && zstd_level.is_some() {
            return Err(unknown()); // "none+zstd" reads as a contradiction; "zstd" says it
        }
        Ok(Codec { lossy: lossy.unwrap_or(Lossy::None), zstd_level })
    }

    /// The canonical spelling, which `parse` reads back to the same codec.
    pub fn name(&self) -> String {
        match (self.lossy, self.zstd_level) {
            (Lossy::None, None) => "none".into(),
            (Lossy::None, Some(l)) => format!("zstd:{l}"),
            (lossy, None) => lossy.name().into(),
            (lossy, Some(l)) => format!("{}+zstd:{l}", lossy.name()),
        }
    }

    fn check_input(&self, dtype: DType, data: &[u8]) -> Result<usize, CodecError> {
        self.lossy.check_source(dtype)?;
        if data.len() % dtype.itemsize() != 0 {
            let expected = data.len() - data.len() % dtype.itemsize();
            return Err(CodecError::SizeMismatch { expected, got: data.len() });
        }
        let numel = data.len() / dtype.itemsize();
        self.lossy
            .encoded_len(dtype, numel)
            .ok_or(CodecError::SizeMismatch { expected: usize::MAX, got: data.len() })
    }

    /// Runs only the lossy transform of `data` into `out`, which must be exactly
    /// `lossy.encoded_len(..)` bytes: lets the framer write straight into its output.
    pub fn encode_lossy_into(&self, dtype: DType, data: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let expected = self.check_input(dtype, data)?;
        if out.len() != expected {
            return Err(CodecError::SizeMismatch { expected, got: out.len() });
        }
        match self.lossy {
            Lossy::None => out.copy_from_slice(data),
            Lossy::F16 => half_float::f32_to_f16(data, out),
            Lossy::BF16 => half_float::f32_to_bf16(data, out),
            Lossy::Int8(block) => int8::encode(dtype, data, block, out)?,
        }
        Ok(())
    }

    /// Encodes `data` (little-endian elements of `dtype`). Borrows when there is nothing to do,
    /// so framing with codec `none` copies the tensor exactly once.
    pub fn encode<'a>(&self, dtype: DType, data: &'a [u8]) -> Result<Cow<'a, [u8]>, CodecError> {
        let len = self.check_input(dtype, data)?;
        let transformed: Cow<'a, [u8]> = if self.lossy == Lossy::None {
            Cow::Borrowed(data)
        } else {
            let mut out = vec![0u8; len];
            self.encode_lossy_into(dtype, data, &mut out)?;
            Cow::Owned(out)
        };
        match self.zstd_level {
            None => Ok(transformed),
            Some(level) => zstd::bulk::compress(&transformed, level)
                .map(Cow::Owned)
                .map_err(|e| CodecError::Zstd(e.to_string())),
        }
    }

    /// Decodes a payload into `out`, which must hold exactly the tensor's raw bytes. zstd output
    /// is bounded by the size the header promised, so a hostile frame cannot balloon memory.
    pub fn decode_into(&self, dtype: DType, payload: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        self.lossy.check_source(dtype)?;
        let numel = out.len() / dtype.itemsize();
        let expected = self
            .lossy
            .encoded_len(dtype, numel)
            .ok_or(CodecError::SizeMismatch { expected: usize::MAX, got: payload.len() })?;
        let decompressed;
        let payload: &[u8] = if self.zstd_level.is_some() {
            decompressed = decompress_exact(payload, expected)?;
            &decompressed
        } else {
            payload
        };
        if payload.len() != expected {
            return Err(CodecError::SizeMismatch { expected, got: payload.len() });
        }
        match self.lossy {
            Lossy::None => out.copy_from_slice(payload),
            Lossy::F16 => half_float::f16_to_f32(payload, out),
            Lossy::BF16 => half_float::bf16_to_f32(payload, out),
            Lossy::Int8(block) => int8::decode(dtype, payload, block, out),
        }
        Ok(())
    }

    /// Wire form: (lossy code, compressed flag).
    pub fn wire(&self) -> (u8, u8) {
        (self.lossy.code(), u8::from(self.zstd_level.is_some()))
    }

    pub fn from_wire(lossy: u8, compression: u8) -> Result<Codec, CodecError> {
        let zstd_level = match compression {
            0 => None,
            1 => Some(DEFAULT_ZSTD_LEVEL),
            other => return Err(CodecError::UnknownCode(other)),
        };
        Ok(Codec { lossy: Lossy::from_code(lossy)?, zstd_level })
    }
}

fn decompress_exact(payload: &[u8], expected: usize) -> Result<Vec<u8>, CodecError> {
    // Capacity one past the expected size: a stream that decodes to more is caught as a
    // mismatch rather than truncated.
    let out = zstd::bulk::decompress(payload, expected.saturating_add(1))
        .map_err(|e| CodecError::Zstd(e.to_string()))?;
    if out.len() != expected {
        return Err(CodecError::SizeMismatch { expected, got: out.len() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
