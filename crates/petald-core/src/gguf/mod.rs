//! The index of a GGUF file (llama.cpp's checkpoint format, versions 2 and 3): its metadata
//! key-value pairs and where each tensor's bytes lie. Spec: ggml-org/ggml `docs/gguf.md`.
//!
//! Why here: the `gguf` Python package builds a numpy view per metadata element, so reading the
//! header of a file with a 49k-token vocabulary costs seconds of CPU at every server start. This
//! parser reads the header out of a borrowed buffer (the caller memory-maps the file: Python owns
//! the I/O) in milliseconds and copies no tensor data.
//!
//! Every length and count comes from a file that may be truncated or hostile: each is checked
//! against the bytes actually present before anything is allocated.

pub mod dequant;

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// `general.alignment` when the file does not say.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions; a little slack for future formats.
pub const MAX_DIMS: u32 = 8;
/// Arrays of arrays are allowed by the spec; nobody nests deeper than this.
const MAX_DEPTH: u32 = 4;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (versions 2 and 3 are read)")]
    UnsupportedVersion(u32),
    #[error("the GGUF header is truncated at byte {0}")]
    Truncated(u64),
    #[error("unknown GGUF value type {0} at byte {1}")]
    UnknownType(u32, u64),
    #[error("a GGUF string at byte {0} is not UTF-8")]
    NotUtf8(u64),
    #[error("GGUF arrays nested deeper than {MAX_DEPTH} levels at byte {0}")]
    TooDeep(u64),
    #[error("tensor {name:?} has {n} dimensions, at most {MAX_DIMS} are allowed")]
    TooManyDims { name: String, n: u32 },
    #[error("general.alignment is {0}: it must be a power of two")]
    BadAlignment(u64),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
}

/// A metadata value. Integers keep their sign; floats are widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

/// One tensor: its name, ggml type code, dimensions in GGUF order (innermost first) and the
/// offset of its bytes from the start of the file (already aligned by the writer).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: u32,
    pub dims: Vec<u64>,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data section starts: the header's length, rounded up to the alignment.
    pub data_start: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.buf.len())
            .ok_or(GgufError::Truncated(self.pos as u64))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let at = self.pos as u64;
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::NotUtf8(at))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => Value::Uint(u64::from(self.array::<1>()?[0])),
            1 => Value::Int(i64::from(i8::from_le_bytes(self.array()?))),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::Uint(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.array()?))),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::TooDeep(at));
                }
                let item = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least one byte: a count past the end is truncation,
                // caught here before the Vec is sized by it.
                if count > self.remaining() as u64 {
                    return Err(GgufError::Truncated(self.pos as u64));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(GgufError::UnknownType(other, at)),
        })
    }
}

/// Parses the header at the start of `buf` (the whole file, or at least its header).
pub fn parse(buf: &[u8]) -> Result<Index, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = c.array()?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // A key-value pair takes at least 12 bytes and a tensor info at least 24.
    if n_kv.saturating_mul(12).saturating_add(n_tensors.saturating_mul(24)) > c.remaining() as u64 {
        return Err(GgufError::Truncated(c.pos as u64));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        metadata.push((key, c.value(ty, 0)?));
    }
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n: n_dims });
        }
        let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = c.u32()?;
        let offset = c.u64()?;
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo { name, ggml_type, dims, offset });
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, Value::Uint(a))) => *a,
        Some(_) => return Err(GgufError::BadAlignment(0)),
        None => DEFAULT_ALIGNMENT,
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(alignment));
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    for t in &mut tensors {
        t.offset = t.offset.saturating_add(data_start);
    }
    Ok(Index { version, metadata, tensors, data_start })
}

#[cfg(test)]
mod tests;
