//! `petald._native`: the pyo3 binding of petald-core. It converts arguments, releases the GIL
//! around O(n) work and maps errors; every algorithm lives in petald-core.

mod buffer;
mod errors;
mod frame;
mod gguf;
mod kad;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use petald_core::frame as core_frame;
    m.add("FRAME_VERSION", core_frame::VERSION)?;
    m.add("DEFAULT_CHUNK_SIZE", core_frame::DEFAULT_CHUNK_SIZE)?;
    m.add("MIN_CHUNK_SIZE", core_frame::MIN_CHUNK_SIZE)?;
    m.add("MAX_CHUNK_SIZE", core_frame::MAX_CHUNK_SIZE)?;
    m.add("DEFAULT_MAX_TENSOR_BYTES", core_frame::DEFAULT_MAX_TENSOR_BYTES)?;
    m.add("CHUNK_HEADER_LEN", core_frame::CHUNK_HEADER_LEN)?;
    m.add_function(wrap_pyfunction!(frame::encode, m)?)?;
    m.add_function(wrap_pyfunction!(frame::encode_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(frame::decode, m)?)?;
    m.add_function(wrap_pyfunction!(frame::canonical_codec, m)?)?;
    m.add_function(wrap_pyfunction!(frame::dtype_names, m)?)?;
    m.add_class::<frame::DecodedTensor>()?;
    m.add_class::<frame::FrameDecoder>()?;
    m.add_function(wrap_pyfunction!(gguf::gguf_index, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_dequantize, m)?)?;
    {
        use petald_core::gguf::dequant;
        m.add("GGUF_DEQUANT_TYPES", (dequant::Q4_0, dequant::Q4_1, dequant::Q8_0))?;
    }
    kad::register(m)?;
    Ok(())
}
