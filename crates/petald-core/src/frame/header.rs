//! The two fixed headers of the petald/v1 tensor frame, with their parsing and validation.
//!
//! A tensor travels as one or more chunks. Each chunk is a 32-byte [`ChunkHeader`] and a body.
//! The bodies, concatenated, are a [`TensorHeader`] (16 + 8*ndim bytes) and the encoded payload.
//! All integers are little-endian. Both header sizes are multiples of 8, so in a single-chunk
//! frame the payload starts 8-byte aligned relative to the frame and numpy/torch can view it in
//! place.
//!
//! ```text
//! chunk header  0 magic "PDTF" | 4 version u8 | 5 reserved [u8;3] | 8 index u32 | 12 count u32
//!               16 body_len u32 | 20 reserved u32 | 24 xxh3-64 of body, seeded with xxh3-64 of
//!               bytes 0..24 (so the header is covered too)
//! tensor header 0 dtype u8 | 1 lossy codec u8 | 2 compression u8 | 3 ndim u8 | 4 reserved u32
//!               8 payload_len u64 | 16 dims u64 * ndim
//! ```

use twox_hash::XxHash3_64;

fn xxh3_64(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

fn xxh3_64_with_seed(data: &[u8], seed: u64) -> u64 {
    XxHash3_64::oneshot_with_seed(seed, data)
}

use super::FrameError;
use crate::codec::Codec;
use crate::dtype::DType;

pub const MAGIC: [u8; 4] = *b"PDTF";
pub const VERSION: u8 = 1;
pub const CHUNK_HEADER_LEN: usize = 32;
/// Tensors of more dimensions than this are refused: no model tensor needs more, and the
/// header must fit in a small first chunk.
pub const MAX_NDIM: usize = 8;
pub const TENSOR_HEADER_FIXED: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub index: u32,
    pub count: u32,
    pub body_len: u32,
    pub checksum: u64,
}

impl ChunkHeader {
    /// Writes the header for `body` into `out[..32]`, computing the checksum.
    pub fn write(index: u32, count: u32, body: &[u8], out: &mut [u8]) {
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5..8].fill(0);
        out[8..12].copy_from_slice(&index.to_le_bytes());
        out[12..16].copy_from_slice(&count.to_le_bytes());
        out[16..20].copy_from_slice(&len.to_le_bytes());
        out[20..24].fill(0);
        let seed = xxh3_64(&out[0..24]);
        out[24..32].copy_from_slice(&xxh3_64_with_seed(body, seed).to_le_bytes());
    }

    /// Parses and validates a chunk header (not yet its checksum, which needs the body).
    pub fn parse(b: &[u8; CHUNK_HEADER_LEN], max_body: u32) -> Result<ChunkHeader, FrameError> {
        if b[0..4] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1], b[2], b[3]]));
        }
        if b[4] != VERSION {
            return Err(FrameError::UnsupportedVersion(b[4]));
        }
        if b[5..8] != [0; 3] || b[20..24] != [0; 4] {
            return Err(FrameError::ReservedNotZero);
        }
        let h = ChunkHeader {
            index: u32_at(b, 8),
            count: u32_at(b, 12),
            body_len: u32_at(b, 16),
            checksum: u64_at(b, 24),
        };
        if h.count == 0 || h.index >= h.count {
            return Err(FrameError::BadChunkIndex { index: h.index, count: h.count });
        }
        // Empty chunks carry nothing; refusing them bounds how many chunks a frame can have.
        if h.body_len == 0 {
            return Err(FrameError::EmptyChunk { index: h.index });
        }
        if h.body_len > max_body {
            return Err(FrameError::ChunkTooLarge { len: h.body_len, max: max_body });
        }
        Ok(h)
    }

    pub fn verify(&self, raw: &[u8; CHUNK_HEADER_LEN], body: &[u8]) -> Result<(), FrameError> {
        let seed = xxh3_64(&raw[0..24]);
        if xxh3_64_with_seed(body, seed) != self.checksum {
            return Err(FrameError::BadChecksum { index: self.index });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorHeader {
    pub dtype: DType,
    pub codec: Codec,
    pub shape: Vec<u64>,
    pub payload_len: u64,
}

impl TensorHeader {
    pub fn encoded_len(&self) -> usize {
        TENSOR_HEADER_FIXED + 8 * self.shape.len()
    }

    /// Number of elements, or `None` if the product overflows.
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d))
    }

    /// Decoded size in bytes, or `None` on overflow.
    pub fn raw_len(&self) -> Option<u64> {
        self.numel()?.checked_mul(self.dtype.itemsize() as u64)
    }

    pub fn write(&self, out: &mut [u8]) {
        let (lossy, compression) = self.codec.wire();
        out[0] = self.dtype.code();
        out[1] = lossy;
        out[2] = compression;
        out[3] = self.shape.len() as u8;
        out[4..8].fill(0);
        out[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        for (i, d) in self.shape.iter().enumerate() {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&d.to_le_bytes());
        }
    }

    /// The header's length given its first 4 bytes (needs only `ndim`), validating `ndim`.
    pub fn len_from_prefix(prefix: &[u8]) -> Result<usize, FrameError> {
        if prefix.len() < TENSOR_HEADER_FIXED {
            return Err(FrameError::Truncated { needed: TENSOR_HEADER_FIXED, got: prefix.len() });
        }
        let ndim = usize::from(prefix[3]);
        if ndim > MAX_NDIM {
            return Err(FrameError::TooManyDims { ndim, max: MAX_NDIM });
        }
        Ok(TENSOR_HEADER_FIXED + 8 * ndim)
    }

    /// Parses and validates: known dtype and codec, the codec fits the dtype, no overflow, the
    /// decoded size within `max_bytes`, and a payload length the codec can have produced.
    pub fn parse(b: &[u8], max_bytes: u64) -> Result<TensorHeader, FrameError> {
        let len = Self::len_from_prefix(b)?;
        if b.len() < len {
            return Err(FrameError::Truncated { needed: len, got: b.len() });
        }
        let dtype = DType::from_code(b[0]).ok_or(FrameError::UnknownDtype(b[0]))?;
        let codec = Codec::from_wire(b[1], b[2])?;
        codec.lossy.check_source(dtype)?;
        if b[4..8] != [0; 4] {
            return Err(FrameError::ReservedNotZero);
        }
        let shape = (0..usize::from(b[3])).map(|i| u64_at(b, 16 + 8 * i)).collect();
        let header = TensorHeader { dtype, codec, shape, payload_len: u64_at(b, 8) };
        let raw = header.raw_len().ok_or(FrameError::ShapeOverflow)?;
        if raw > max_bytes {
            return Err(FrameError::TooLarge { bytes: raw, max: max_bytes });
        }
        let numel = usize::try_from(header.numel().unwrap_or(0)).map_err(|_| FrameError::ShapeOverflow)?;
        let expected = codec.lossy.encoded_len(dtype, numel).ok_or(FrameError::ShapeOverflow)? as u64;
        let ok = if codec.zstd_level.is_some() {
            header.payload_len <= zstd_bound(expected)
        } else {
            header.payload_len == expected
        };
        if !ok {
            return Err(FrameError::PayloadLength { declared: header.payload_len, expected });
        }
        Ok(header)
    }
}

/// zstd's worst-case compressed size (ZSTD_COMPRESSBOUND), plus the frame header.
fn zstd_bound(n: u64) -> u64 {
    n + (n >> 8) + 64 + if n < (128 << 10) { ((128 << 10) - n) >> 11 } else { 0 }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
