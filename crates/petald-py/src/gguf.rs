//! Python face of `petald_core::gguf`: `gguf_index(buffer)` parses a GGUF header out of any
//! buffer (the caller passes an `mmap` of the file) with the GIL released, then converts the
//! index to Python values; `gguf_dequantize` fills a new bytearray with f32 weights. No logic
//! of its own.

use petald_core::gguf::{self, dequant, Value};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::buffer::{new_bytearray, ByteView};
use crate::errors::{gguf_dequant_err, gguf_err};

fn to_py(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    match value {
        Value::Uint(v) => v.into_py_any(py),
        Value::Int(v) => v.into_py_any(py),
        Value::Float(v) => v.into_py_any(py),
        Value::Bool(v) => v.into_py_any(py),
        Value::Str(v) => v.into_py_any(py),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            Ok(list.into_any().unbind())
        }
    }
}

/// (version, metadata dict, [(name, ggml_type, dims, absolute offset)], data_start).
#[pyfunction]
pub fn gguf_index<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
    let view = ByteView::new(data)?;
    let index = py.detach(|| gguf::parse(view.as_slice())).map_err(gguf_err)?;
    let metadata = PyDict::new(py);
    for (key, value) in &index.metadata {
        metadata.set_item(key, to_py(py, value)?)?;
    }
    let tensors = PyList::empty(py);
    for t in &index.tensors {
        let dims = PyTuple::new(py, &t.dims)?;
        tensors.append((t.name.as_str(), t.ggml_type, dims, t.offset))?;
    }
    PyTuple::new(
        py,
        [
            index.version.into_py_any(py)?,
            metadata.into_any().unbind(),
            tensors.into_any().unbind(),
            index.data_start.into_py_any(py)?,
        ],
    )
}

/// The f32 weights of `data` (whole blocks of a type in `GGUF_DEQUANT_TYPES`), as a bytearray
/// of native-endian f32, computed with the GIL released.
#[pyfunction]
pub fn gguf_dequantize<'py>(
    py: Python<'py>,
    ggml_type: u32,
    data: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let view = ByteView::new(data)?;
    let input = view.as_slice();
    let block = dequant::block_bytes(ggml_type)
        .ok_or_else(|| gguf_dequant_err(dequant::DequantError::Unsupported(ggml_type)))?;
    let n = input.len() / block * dequant::BLOCK;
    let (out, mut ptr) = new_bytearray(py, n * 4)?;
    // A bytearray's buffer comes from CPython's allocator (at least 8-byte aligned): the core
    // views it as f32 (and says so if it ever were not aligned).
    py.detach(|| dequant::dequantize_bytes(ggml_type, input, ptr.as_mut_slice()))
        .map_err(gguf_dequant_err)?;
    Ok(out)
}
