//! Python face of `petald_core::frame`: `encode`, `encode_chunks`, `decode`, `FrameDecoder`.
//! Converts arguments, releases the GIL for the O(n) work, maps errors. No logic of its own.

use std::borrow::Cow;

use petald_core::codec::Codec;
use petald_core::dtype::DType;
use petald_core::frame::{self, Encoded, Limits, Payload, TensorHeader};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PySlice, PyTuple};

use crate::buffer::{new_bytearray, new_bytes, ByteView};
use crate::errors::{codec_err, frame_err};

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).ok_or_else(|| {
        let known: Vec<&str> = DType::all().iter().map(|d| d.name()).collect();
        PyValueError::new_err(format!("unknown dtype {name:?}; expected one of {known:?}"))
    })
}

fn limits(max_tensor_bytes: u64, max_chunk_body: u32) -> Limits {
    Limits { max_tensor_bytes, max_chunk_body }
}

/// Validates and runs the codec with the GIL released; the result borrows `view`.
fn prepare<'v>(
    py: Python<'_>,
    view: &'v ByteView,
    dtype: &str,
    shape: Vec<u64>,
    codec: &str,
    chunk_size: usize,
) -> PyResult<Encoded<'v>> {
    let dtype = parse_dtype(dtype)?;
    let codec = Codec::parse(codec).map_err(codec_err)?;
    py.detach(|| Encoded::new(view.as_slice(), dtype, &shape, codec, chunk_size)).map_err(frame_err)
}

#[pyfunction]
#[pyo3(signature = (data, dtype, shape, codec = "none", chunk_size = frame::DEFAULT_CHUNK_SIZE))]
pub fn encode<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    dtype: &str,
    shape: Vec<u64>,
    codec: &str,
    chunk_size: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let view = ByteView::new(data)?;
    let enc = prepare(py, &view, dtype, shape, codec, chunk_size)?;
    let (out, mut ptr) = new_bytes(py, enc.frame_len())?;
    py.detach(|| enc.write_to(ptr.as_mut_slice())).map_err(frame_err)?;
    Ok(out)
}

#[pyfunction]
#[pyo3(signature = (data, dtype, shape, codec = "none", chunk_size = frame::DEFAULT_CHUNK_SIZE))]
pub fn encode_chunks<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    dtype: &str,
    shape: Vec<u64>,
    codec: &str,
    chunk_size: usize,
) -> PyResult<Bound<'py, PyList>> {
    let view = ByteView::new(data)?;
    let enc = prepare(py, &view, dtype, shape, codec, chunk_size)?;
    let whole = py.detach(|| enc.to_vec()).map_err(frame_err)?;
    let mut chunks = Vec::with_capacity(enc.chunk_count());
    let mut rest: &[u8] = &whole;
    while !rest.is_empty() {
        let body = u32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
        let (chunk, tail) = rest.split_at(frame::CHUNK_HEADER_LEN + body);
        chunks.push(PyBytes::new(py, chunk));
        rest = tail;
    }
    PyList::new(py, chunks)
}

/// A decoded tensor: dtype and shape as torch names them, and its bytes in `data`, a
/// `memoryview` into the input frame when nothing had to be decoded, else a new `bytearray`.
#[pyclass(module = "petald._native", frozen, get_all)]
pub struct DecodedTensor {
    dtype: &'static str,
    shape: Py<PyTuple>,
    codec: String,
    data: Py<PyAny>,
}

#[pymethods]
impl DecodedTensor {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "DecodedTensor(dtype={:?}, shape={}, codec={:?})",
            self.dtype,
            self.shape.bind(py),
            self.codec
        )
    }
}

fn build(
    py: Python<'_>,
    header: &TensorHeader,
    payload: Payload<'_>,
    view_of: Option<(&Bound<'_, PyAny>, usize)>,
) -> PyResult<DecodedTensor> {
    let raw = header.raw_len().ok_or_else(|| frame_err(frame::FrameError::ShapeOverflow))? as usize;
    let identity = header.codec == Codec::NONE;
    let data = match view_of {
        // Zero copy: a view of the caller's frame.
        Some((obj, offset)) if identity => {
            let mv = pyo3::types::PyMemoryView::from(obj)?;
            let slice = PySlice::new(py, offset as isize, (offset + raw) as isize, 1);
            mv.get_item(slice)?.unbind()
        }
        _ => {
            let (out, mut ptr) = new_bytearray(py, raw)?;
            py.detach(|| payload.decode_into(header, ptr.as_mut_slice())).map_err(frame_err)?;
            out.unbind()
        }
    };
    Ok(DecodedTensor {
        dtype: header.dtype.name(),
        shape: PyTuple::new(py, &header.shape)?.unbind(),
        codec: header.codec.name(),
        data,
    })
}

#[pyfunction]
#[pyo3(signature = (frame, max_tensor_bytes = frame::DEFAULT_MAX_TENSOR_BYTES, max_chunk_body = frame::MAX_CHUNK_SIZE as u32))]
pub fn decode(
    py: Python<'_>,
    frame: &Bound<'_, PyAny>,
    max_tensor_bytes: u64,
    max_chunk_body: u32,
) -> PyResult<DecodedTensor> {
    let view = ByteView::new(frame)?;
    let limits = limits(max_tensor_bytes, max_chunk_body);
    let d = py.detach(|| frame::decode(view.as_slice(), &limits)).map_err(frame_err)?;
    let view_of = d.payload_offset.map(|off| (frame, off));
    build(py, &d.header, d.payload, view_of)
}

/// Incremental decoder for a frame arriving from a stream in pieces of any size.
#[pyclass(module = "petald._native")]
pub struct FrameDecoder {
    inner: Option<frame::FrameDecoder>,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_tensor_bytes = frame::DEFAULT_MAX_TENSOR_BYTES, max_chunk_body = frame::MAX_CHUNK_SIZE as u32))]
    fn new(max_tensor_bytes: u64, max_chunk_body: u32) -> Self {
        FrameDecoder { inner: Some(frame::FrameDecoder::new(limits(max_tensor_bytes, max_chunk_body))) }
    }

    fn feed(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let view = ByteView::new(data)?;
        let dec = self.inner.as_mut().ok_or_else(|| frame_err(frame::FrameError::Poisoned))?;
        py.detach(|| dec.feed(view.as_slice())).map_err(frame_err)
    }

    #[getter]
    fn is_complete(&self) -> bool {
        self.inner.as_ref().is_some_and(|d| d.is_complete())
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<DecodedTensor> {
        let dec = self.inner.take().ok_or_else(|| frame_err(frame::FrameError::Poisoned))?;
        let (header, payload) = dec.finish().map_err(frame_err)?;
        build(py, &header, Payload::Contiguous(Cow::Owned(payload)), None)
    }
}

#[pyfunction]
pub fn canonical_codec(spec: &str) -> PyResult<String> {
    Codec::parse(spec).map(|c| c.name()).map_err(codec_err)
}

#[pyfunction]
pub fn dtype_names() -> Vec<&'static str> {
    DType::all().iter().map(|d| d.name()).collect()
}
