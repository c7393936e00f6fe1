//! The petald/v1 tensor frame: encoding a buffer into checksummed chunks and decoding them back,
//! either from one contiguous buffer ([`decode`]) or incrementally from a byte stream
//! ([`FrameDecoder`]). Wire layout: see [`header`].
//!
//! Every decode validates before it allocates: sizes declared by a peer are checked against
//! [`Limits`] and against the bytes actually present, so a hostile length field costs nothing.

mod decoder;
pub mod header;

use std::borrow::Cow;

pub use decoder::{decode, decode_prefix, Decoded, FrameDecoder, Payload};
pub use header::{ChunkHeader, TensorHeader, CHUNK_HEADER_LEN, MAX_NDIM, VERSION};

use crate::codec::{Codec, CodecError, Lossy};
use crate::dtype::DType;

/// Default chunk body size: small enough to interleave streams, large enough that the 32-byte
/// header and per-chunk checksum cost nothing.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;
/// The first chunk must hold the whole tensor header (80 bytes at 8 dims).
pub const MIN_CHUNK_SIZE: usize = 256;
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// Default cap on a decoded tensor: 1 GiB is 4x the activations of a 405B model (hidden 16384)
/// for 4096 tokens in fp32.
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("not a petald tensor frame (magic {0:02x?}, expected \"PDTF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported frame version {0} (this build speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("unknown dtype code {0}")]
    UnknownDtype(u8),
    #[error("tensor has {ndim} dimensions, at most {max} are allowed")]
    TooManyDims { ndim: usize, max: usize },
    #[error("shape's element count overflows")]
    ShapeOverflow,
    #[error("tensor of {bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    #[error("payload length {declared} does not fit the header (expected {expected} bytes)")]
    PayloadLength { declared: u64, expected: u64 },
    #[error("chunk {index} of {count}: index out of range")]
    BadChunkIndex { index: u32, count: u32 },
    #[error("chunk {index} is empty")]
    EmptyChunk { index: u32 },
    #[error("chunk body of {len} bytes exceeds the limit of {max}")]
    ChunkTooLarge { len: u32, max: u32 },
    #[error("chunk {index}: checksum mismatch (corrupted in transit?)")]
    BadChecksum { index: u32 },
    #[error("chunk out of order: expected index {expected}, got {got}")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("chunk count changed mid-frame: {first} then {now}")]
    CountMismatch { first: u32, now: u32 },
    #[error("the first chunk must hold the whole tensor header")]
    HeaderSplit,
    #[error("frame truncated: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("chunks carry more payload than the header's {declared} bytes")]
    PayloadOverrun { declared: u64 },
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    #[error("shape {shape:?} of {dtype} needs {expected} bytes, buffer has {got}")]
    BufferSize { shape: Vec<u64>, dtype: DType, expected: u64, got: usize },
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(usize),
    #[error("the stream ended before the frame's last chunk")]
    Incomplete,
    #[error("decoder already failed; start a new one")]
    Poisoned,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// What a receiver accepts. Set from config; peers never choose these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_tensor_bytes: u64,
    pub max_chunk_body: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_tensor_bytes: DEFAULT_MAX_TENSOR_BYTES, max_chunk_body: MAX_CHUNK_SIZE as u32 }
    }
}

/// The payload of a frame being written.
#[derive(Debug)]
enum Body<'a> {
    /// Final bytes: the input itself for codec `none`, else the codec's output.
    Ready(Cow<'a, [u8]>),
    /// A lossy transform without zstd, run at write time straight into the output when the
    /// frame is one chunk (no intermediate buffer).
    Lossy(&'a [u8]),
}

/// A tensor ready to be framed: its header and payload.
#[derive(Debug)]
pub struct Encoded<'a> {
    pub header: TensorHeader,
    body: Body<'a>,
    chunk_size: usize,
}

impl<'a> Encoded<'a> {
    /// Validates `data` against `dtype` and `shape` and runs the codec.
    pub fn new(
        data: &'a [u8],
        dtype: DType,
        shape: &[u64],
        codec: Codec,
        chunk_size: usize,
    ) -> Result<Self, FrameError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(FrameError::BadChunkSize(chunk_size));
        }
        if shape.len() > MAX_NDIM {
            return Err(FrameError::TooManyDims { ndim: shape.len(), max: MAX_NDIM });
        }
        let mut header = TensorHeader { dtype, codec, shape: shape.to_vec(), payload_len: 0 };
        let expected = header.raw_len().ok_or(FrameError::ShapeOverflow)?;
        if expected != data.len() as u64 {
            return Err(FrameError::BufferSize { shape: shape.to_vec(), dtype, expected, got: data.len() });
        }
        let body = if codec.zstd_level.is_none() && codec.lossy != Lossy::None {
            codec.lossy.check_source(dtype)?;
            let numel = data.len() / dtype.itemsize();
            header.payload_len =
                codec.lossy.encoded_len(dtype, numel).ok_or(FrameError::ShapeOverflow)? as u64;
            Body::Lossy(data)
        } else {
            let payload = codec.encode(dtype, data)?;
            header.payload_len = payload.len() as u64;
            Body::Ready(payload)
        };
        let enc = Encoded { header, body, chunk_size };
        if u32::try_from(enc.chunk_count()).is_err() {
            return Err(FrameError::BadChunkSize(chunk_size));
        }
        Ok(enc)
    }

    fn body_len(&self) -> usize {
        self.header.encoded_len() + self.header.payload_len as usize
    }

    pub fn chunk_count(&self) -> usize {
        self.body_len().div_ceil(self.chunk_size).max(1)
    }

    /// Total bytes of the frame: chunk headers + tensor header + payload.
    pub fn frame_len(&self) -> usize {
        self.chunk_count() * CHUNK_HEADER_LEN + self.body_len()
    }

    /// Writes the whole frame into `out`, which must be exactly `frame_len()` bytes. The payload
    /// is copied once, chunk by chunk, and each chunk is hashed while it is still in cache.
    /// Fails only when a lossy codec meets values it cannot represent (int8 and inf/NaN).
    pub fn write_to(&self, out: &mut [u8]) -> Result<(), FrameError> {
        if out.len() != self.frame_len() {
            return Err(FrameError::Truncated { needed: self.frame_len(), got: out.len() });
        }
        let count = self.chunk_count() as u32;
        let hlen = self.header.encoded_len();
        let mut header_bytes = [0u8; header::TENSOR_HEADER_FIXED + 8 * MAX_NDIM];
        self.header.write(&mut header_bytes[..hlen]);
        let payload: Cow<'_, [u8]> = match &self.body {
            Body::Ready(p) => Cow::Borrowed(p),
            Body::Lossy(data) if count == 1 => {
                let (head, body) = out.split_at_mut(CHUNK_HEADER_LEN);
                body[..hlen].copy_from_slice(&header_bytes[..hlen]);
                self.header.codec.encode_lossy_into(self.header.dtype, data, &mut body[hlen..])?;
                ChunkHeader::write(0, 1, body, head);
                return Ok(());
            }
            Body::Lossy(data) => self.header.codec.encode(self.header.dtype, data)?,
        };
        let body_total = self.body_len();
        let mut rest = out;
        for index in 0..count {
            let start = index as usize * self.chunk_size;
            let len = self.chunk_size.min(body_total - start);
            let (chunk, tail) = rest.split_at_mut(CHUNK_HEADER_LEN + len);
            let (head, body) = chunk.split_at_mut(CHUNK_HEADER_LEN);
            // The body window [start, start+len) of (tensor header ++ payload); only chunk 0
            // holds header bytes, since chunk_size >= MIN_CHUNK_SIZE > the largest header.
            let from_header = hlen.saturating_sub(start).min(len);
            body[..from_header]
                .copy_from_slice(&header_bytes[start.min(hlen)..start.min(hlen) + from_header]);
            let p_start = start + from_header - hlen;
            body[from_header..].copy_from_slice(&payload[p_start..p_start + (len - from_header)]);
            ChunkHeader::write(index, count, body, head);
            rest = tail;
        }
        Ok(())
    }

    pub fn to_vec(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = vec![0u8; self.frame_len()];
        self.write_to(&mut out)?;
        Ok(out)
    }
}

/// Frames `data` in one call (Rust callers; the Python binding writes into a bytes object).
pub fn encode(
    data: &[u8],
    dtype: DType,
    shape: &[u64],
    codec: Codec,
    chunk_size: usize,
) -> Result<Vec<u8>, FrameError> {
    Encoded::new(data, dtype, shape, codec, chunk_size)?.to_vec()
}

/// Decodes a payload into `out` (exactly the tensor's raw size).
pub fn decode_payload(header: &TensorHeader, payload: &[u8], out: &mut [u8]) -> Result<(), FrameError> {
    let raw = header.raw_len().ok_or(FrameError::ShapeOverflow)?;
    if raw != out.len() as u64 {
        return Err(FrameError::BufferSize {
            shape: header.shape.clone(),
            dtype: header.dtype,
            expected: raw,
            got: out.len(),
        });
    }
    Ok(header.codec.decode_into(header.dtype, payload, out)?)
}

/// Decodes a payload split across chunk bodies into `out`. Codec `none` copies each part to its
/// place; plain zstd streams into `out`; lossy codecs gather the (smaller) encoded bytes first.
pub fn decode_payload_chunks(
    header: &TensorHeader,
    parts: &[&[u8]],
    out: &mut [u8],
) -> Result<(), FrameError> {
    let raw = header.raw_len().ok_or(FrameError::ShapeOverflow)?;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if raw != out.len() as u64 {
        return Err(FrameError::BufferSize {
            shape: header.shape.clone(),
            dtype: header.dtype,
            expected: raw,
            got: out.len(),
        });
    }
    if header.codec == Codec::NONE {
        if total != out.len() {
            return Err(CodecError::SizeMismatch { expected: out.len(), got: total }.into());
        }
        let mut at = 0;
        for p in parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return Ok(());
    }
    let mut gathered = Vec::with_capacity(total);
    for p in parts {
        gathered.extend_from_slice(p);
    }
    decode_payload(header, &gathered, out)
}

#[cfg(test)]
mod tests;
