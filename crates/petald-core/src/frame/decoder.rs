//! Decoding frames: [`decode`] for a frame held whole in memory (zero-copy for one chunk), and
//! [`FrameDecoder`] for bytes arriving from a stream in pieces of any size.

use std::borrow::Cow;

use super::header::{ChunkHeader, TensorHeader, CHUNK_HEADER_LEN};
use super::{FrameError, Limits};

/// The still-encoded payload of a validated frame, as it lies in the input.
#[derive(Debug)]
pub enum Payload<'a> {
    /// One chunk: a slice of the input, nothing copied.
    Contiguous(Cow<'a, [u8]>),
    /// Several chunks' bodies in order (the first without the tensor header). Decoding copies
    /// them straight into the output instead of gathering them first.
    Chunks(Vec<&'a [u8]>),
}

impl Payload<'_> {
    /// Decodes into `out` (exactly the tensor's raw size).
    pub fn decode_into(&self, header: &TensorHeader, out: &mut [u8]) -> Result<(), FrameError> {
        match self {
            Payload::Contiguous(p) => super::decode_payload(header, p, out),
            Payload::Chunks(parts) => super::decode_payload_chunks(header, parts, out),
        }
    }
}

/// A validated frame: header and the still-encoded payload.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub header: TensorHeader,
    pub payload: Payload<'a>,
    /// Offset of the payload in the input when it was borrowed (one chunk): lets a binding hand
    /// out a view of the input instead of a copy.
    pub payload_offset: Option<usize>,
    /// Bytes of input the frame occupied.
    pub frame_len: usize,
}

/// Decodes exactly one frame; bytes after it are an error.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, FrameError> {
    let d = decode_prefix(buf, limits)?;
    if d.frame_len != buf.len() {
        return Err(FrameError::TrailingBytes(buf.len() - d.frame_len));
    }
    Ok(d)
}

/// Decodes the frame at the start of `buf`, which may hold more after it.
pub fn decode_prefix<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, FrameError> {
    let (first, body0, mut pos) = read_chunk(buf, 0, limits)?;
    check_order(&first, 0, None)?;
    let header = parse_tensor_header(body0, limits)?;
    let hlen = header.encoded_len();
    let declared = header.payload_len;
    if first.count == 1 {
        let payload = &body0[hlen..];
        if payload.len() as u64 != declared {
            return Err(FrameError::PayloadLength { declared, expected: payload.len() as u64 });
        }
        let offset = CHUNK_HEADER_LEN + hlen;
        let payload = Payload::Contiguous(Cow::Borrowed(payload));
        return Ok(Decoded { header, payload, payload_offset: Some(offset), frame_len: pos });
    }
    // Every chunk is non-empty and must be present in `buf`, so this list is bounded by the
    // input's size, whatever count the header claims.
    let mut parts = vec![&body0[hlen..]];
    let mut have = parts[0].len() as u64;
    for index in 1..first.count {
        let (h, body, next) = read_chunk(buf, pos, limits)?;
        check_order(&h, index, Some(first.count))?;
        have += body.len() as u64;
        if have > declared {
            return Err(FrameError::PayloadOverrun { declared });
        }
        parts.push(body);
        pos = next;
    }
    if have != declared {
        return Err(FrameError::PayloadLength { declared, expected: have });
    }
    Ok(Decoded { header, payload: Payload::Chunks(parts), payload_offset: None, frame_len: pos })
}

/// Reads and verifies the chunk at `pos`; returns its header, body and the position after it.
fn read_chunk<'a>(
    buf: &'a [u8],
    pos: usize,
    limits: &Limits,
) -> Result<(ChunkHeader, &'a [u8], usize), FrameError> {
    let raw: &[u8; CHUNK_HEADER_LEN] =
        buf.get(pos..pos + CHUNK_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FrameError::Truncated { needed: pos + CHUNK_HEADER_LEN, got: buf.len() })?;
    let h = ChunkHeader::parse(raw, limits.max_chunk_body)?;
    let end = pos + CHUNK_HEADER_LEN + h.body_len as usize;
    let body =
        buf.get(pos + CHUNK_HEADER_LEN..end).ok_or(FrameError::Truncated { needed: end, got: buf.len() })?;
    h.verify(raw, body)?;
    Ok((h, body, end))
}

fn check_order(h: &ChunkHeader, expected: u32, count: Option<u32>) -> Result<(), FrameError> {
    if h.index != expected {
        return Err(FrameError::OutOfOrder { expected, got: h.index });
    }
    match count {
        Some(first) if first != h.count => Err(FrameError::CountMismatch { first, now: h.count }),
        _ => Ok(()),
    }
}

fn parse_tensor_header(body0: &[u8], limits: &Limits) -> Result<TensorHeader, FrameError> {
    let hlen = TensorHeader::len_from_prefix(body0).map_err(|e| match e {
        FrameError::Truncated { .. } => FrameError::HeaderSplit,
        other => other,
    })?;
    if body0.len() < hlen {
        return Err(FrameError::HeaderSplit);
    }
    TensorHeader::parse(&body0[..hlen], limits.max_tensor_bytes)
}

/// Incremental decoder for one frame arriving in pieces of any size.
///
/// Memory grows only with bytes received (never with lengths a peer declares), and every chunk is
/// verified before its bytes join the payload. After an error the decoder is poisoned.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    raw: [u8; CHUNK_HEADER_LEN],
    have_raw: usize,
    chunk: Option<ChunkHeader>,
    body: Vec<u8>,
    next_index: u32,
    count: Option<u32>,
    header: Option<TensorHeader>,
    payload: Vec<u8>,
    complete: bool,
    failed: bool,
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            raw: [0; CHUNK_HEADER_LEN],
            have_raw: 0,
            chunk: None,
            body: Vec::new(),
            next_index: 0,
            count: None,
            header: None,
            payload: Vec::new(),
            complete: false,
            failed: false,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The tensor header, once the first chunk has arrived.
    pub fn header(&self) -> Option<&TensorHeader> {
        self.header.as_ref()
    }

    /// Consumes bytes of this frame from `data` and returns how many; it stops at the frame's end,
    /// so the caller keeps the rest for the next frame.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        let result = self.feed_inner(data);
        self.failed = result.is_err();
        result
    }

    fn feed_inner(&mut self, mut data: &[u8]) -> Result<usize, FrameError> {
        let start = data.len();
        while !self.complete && !data.is_empty() {
            match self.chunk {
                None => {
                    let n = (CHUNK_HEADER_LEN - self.have_raw).min(data.len());
                    self.raw[self.have_raw..self.have_raw + n].copy_from_slice(&data[..n]);
                    self.have_raw += n;
                    data = &data[n..];
                    if self.have_raw == CHUNK_HEADER_LEN {
                        let h = ChunkHeader::parse(&self.raw, self.limits.max_chunk_body)?;
                        check_order(&h, self.next_index, self.count)?;
                        self.count = Some(h.count);
                        self.chunk = Some(h);
                    }
                }
                Some(h) => {
                    let n = (h.body_len as usize - self.body.len()).min(data.len());
                    self.body.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.body.len() == h.body_len as usize {
                        self.finish_chunk(h)?;
                    }
                }
            }
        }
        Ok(start - data.len())
    }

    fn finish_chunk(&mut self, h: ChunkHeader) -> Result<(), FrameError> {
        h.verify(&self.raw, &self.body)?;
        let body = std::mem::take(&mut self.body);
        let payload_part = if h.index == 0 {
            let header = parse_tensor_header(&body, &self.limits)?;
            let hlen = header.encoded_len();
            self.header = Some(header);
            &body[hlen..]
        } else {
            &body[..]
        };
        let declared = self.header.as_ref().map_or(0, |t| t.payload_len);
        if (self.payload.len() + payload_part.len()) as u64 > declared {
            return Err(FrameError::PayloadOverrun { declared });
        }
        self.payload.extend_from_slice(payload_part);
        if h.index + 1 == h.count {
            if self.payload.len() as u64 != declared {
                return Err(FrameError::PayloadLength { declared, expected: self.payload.len() as u64 });
            }
            self.complete = true;
        }
        self.next_index = h.index + 1;
        self.chunk = None;
        self.have_raw = 0;
        self.body = body; // keep the allocation for the next chunk
        self.body.clear();
        Ok(())
    }

    /// The header and encoded payload of the completed frame.
    pub fn finish(self) -> Result<(TensorHeader, Vec<u8>), FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        match (self.complete, self.header) {
            (true, Some(header)) => Ok((header, self.payload)),
            _ => Err(FrameError::Incomplete),
        }
    }
}
