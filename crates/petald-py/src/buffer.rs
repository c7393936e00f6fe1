//! Raw byte access to Python objects without copies: any C-contiguous buffer-protocol object
//! (bytes, bytearray, memoryview, numpy arrays of any dtype) in, uninitialised `bytes` /
//! `bytearray` objects out that Rust fills before Python sees them.
//!
//! pyo3's typed `PyBuffer<T>` insists the buffer's format matches `T`; the frame codec wants the
//! raw bytes of a float32 array, so we request no format and read `len` bytes. The buffer
//! protocol is in the stable ABI from Python 3.11, which is why the wheel is abi3-py311.

use std::mem::MaybeUninit;

use pyo3::exceptions::{PyBufferError, PyMemoryError};
use pyo3::ffi;
use pyo3::prelude::*;

/// A held `Py_buffer` view, released on drop. Keeps the exporter alive and its memory pinned.
pub struct ByteView {
    view: Box<ffi::Py_buffer>,
}

// SAFETY: the exporter's memory stays valid and pinned while the view is held; we only read it,
// and reading from another thread while the GIL is released is what the buffer protocol allows.
unsafe impl Send for ByteView {}
unsafe impl Sync for ByteView {}

impl ByteView {
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<ByteView> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::uninit());
        // SAFETY: PyObject_GetBuffer initialises `view` when it returns 0.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_C_CONTIGUOUS) };
        if rc != 0 {
            return Err(PyErr::take(obj.py())
                .unwrap_or_else(|| PyBufferError::new_err("object does not expose a C-contiguous buffer")));
        }
        // SAFETY: initialised by the successful call above.
        let view = unsafe { Box::from_raw(Box::into_raw(view).cast::<ffi::Py_buffer>()) };
        Ok(ByteView { view })
    }

    pub fn as_slice(&self) -> &[u8] {
        let len = usize::try_from(self.view.len).unwrap_or(0);
        if len == 0 || self.view.buf.is_null() {
            return &[];
        }
        // SAFETY: the exporter guarantees `len` readable, contiguous bytes at `buf` while held.
        unsafe { std::slice::from_raw_parts(self.view.buf.cast::<u8>(), len) }
    }
}

impl Drop for ByteView {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: the view was filled by PyObject_GetBuffer and is released exactly once.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) }
        });
    }
}

/// A pointer into a freshly created bytes/bytearray that only this call can see yet.
pub struct OutPtr(*mut u8, usize);

// SAFETY: the object was just created and is not reachable from Python until we return it, so
// writing through the pointer with the GIL released races with nothing.
unsafe impl Send for OutPtr {}

impl OutPtr {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.1 == 0 {
            return &mut [];
        }
        // SAFETY: see the Send impl; `len` bytes were allocated.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

/// A new `bytes` of `len` uninitialised bytes and a pointer to fill it. The caller must write
/// every byte before handing the object to Python.
pub fn new_bytes(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyAny>, OutPtr)> {
    let n = ffi::Py_ssize_t::try_from(len).map_err(|_| PyMemoryError::new_err("size too large"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised object of that size.
    let obj =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), n))? };
    // SAFETY: obj is a bytes object; its buffer lives as long as obj.
    let ptr = unsafe { ffi::PyBytes_AsString(obj.as_ptr()) };
    Ok((obj, OutPtr(ptr.cast::<u8>(), len)))
}

/// A new `bytearray` (writable, so torch.frombuffer can wrap it without warnings).
pub fn new_bytearray(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyAny>, OutPtr)> {
    let n = ffi::Py_ssize_t::try_from(len).map_err(|_| PyMemoryError::new_err("size too large"))?;
    // SAFETY: as above, for bytearray.
    let obj =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n))? };
    // SAFETY: obj is a bytearray; nothing else can resize it before we return it.
    let ptr = unsafe { ffi::PyByteArray_AsString(obj.as_ptr()) };
    Ok((obj, OutPtr(ptr.cast::<u8>(), len)))
}
