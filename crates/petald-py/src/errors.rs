//! The one place Rust errors become Python exceptions. The classes live in `petald.errors` so the
//! whole project shares one exception tree (`FrameError` is a `WireError` and a `ValueError`).

use petald_core::codec::CodecError;
use petald_core::frame::FrameError;
use petald_core::gguf::dequant::DequantError;
use petald_core::gguf::GgufError;
use petald_core::kad::KadError;
use pyo3::PyErr;

mod py {
    pyo3::import_exception!(petald.errors, FrameError);
    pyo3::import_exception!(petald.errors, CodecError);
    pyo3::import_exception!(petald.errors, RoutingTableError);
    pyo3::import_exception!(petald.errors, GGUFError);
}

pub fn frame_err(e: FrameError) -> PyErr {
    match e {
        FrameError::Codec(c) => codec_err(c),
        other => py::FrameError::new_err(other.to_string()),
    }
}

pub fn codec_err(e: CodecError) -> PyErr {
    py::CodecError::new_err(e.to_string())
}

pub fn kad_err(e: KadError) -> PyErr {
    py::RoutingTableError::new_err(e.to_string())
}

pub fn gguf_err(e: GgufError) -> PyErr {
    py::GGUFError::new_err(e.to_string())
}

pub fn gguf_dequant_err(e: DequantError) -> PyErr {
    py::GGUFError::new_err(e.to_string())
}
