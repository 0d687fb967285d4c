//! The calling convention of the crate's C++ ops (`src/model/ffi.h`): each returns null and
//! writes its output tensor, or returns an error message that Rust frees.

use std::ffi::{c_char, CStr};
use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn mp_free_error(message: *mut c_char);
}

/// The op's output, or its error as one line named after `op`.
///
/// # Safety
/// `err` is null or a message allocated by the C++ side; when it is null, `out` is a heap
/// tensor whose ownership passes to the result.
pub(super) unsafe fn output(
    op: &str,
    err: *mut c_char,
    out: *mut C_tensor,
) -> Result<Tensor, TchError> {
    if err.is_null() {
        return Ok(Tensor::from_ptr(out));
    }
    let text = CStr::from_ptr(err).to_string_lossy();
    // libtorch appends a C++ backtrace; its first line is the message.
    let first = text.lines().next().unwrap_or("").to_string();
    mp_free_error(err);
    Err(TchError::Torch(format!("{op}: {first}")))
}
