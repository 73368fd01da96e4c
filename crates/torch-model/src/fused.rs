//! Multi-tensor libtorch operators that tch does not bind, through `cpp/optimizer.cpp`: AdamW
//! as one fused kernel (`_fused_adamw_`), the global norm as one reduction (`_foreach_norm`)
//! and zeroing every gradient at once (`_foreach_zero_`); adding the gradients of bf16 weight
//! copies into their f32 masters' ([`accumulate_copy_grads`]); and a host-to-CUDA copy from
//! page-locked memory that does not wait for the device ([`queued_upload`]). The per-tensor
//! loop these replace launches a dozen kernels for each of V1's parameter tensors, and reads
//! and writes each tensor once per kernel; the fused AdamW reads every parameter, gradient and
//! moment once.
//!
//! Tensors cross as the `at::Tensor` pointers tch holds; nothing here owns one except the norm
//! it returns, which tch frees as any other tensor.

use std::ffi::{CStr, c_char};

use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn somatrain_free_message(message: *mut c_char);
    fn somatrain_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        count: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const C_tensor,
    ) -> *mut c_char;
    fn somatrain_global_norm(
        tensors: *const *mut C_tensor,
        count: usize,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn somatrain_zero_all(tensors: *const *mut C_tensor, count: usize) -> *mut c_char;
    fn somatrain_accumulate_copy_grads(
        masters: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        count: usize,
        copies: *const *mut C_tensor,
        copy_count: usize,
    ) -> *mut c_char;
    fn somatrain_queued_upload(
        host: *const C_tensor,
        device_index: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// The shim's answer: `NULL`, or a message it allocated.
fn answer(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null answer is a NUL-terminated string the shim malloc'd, freed here once.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { somatrain_free_message(message) };
    Err(crate::train::libtorch_words(&text).to_string())
}

fn pointers(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *mut C_tensor)
        .collect()
}

/// AdamW's settings for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step over every parameter in place. `step` is a 0-dim f32 tensor on the device
/// holding the step number (1 for the first); each gradient is divided by `grad_scale` first
/// where one is given.
pub fn adamw(
    params: &[Tensor],
    grads: &[Tensor],
    moments: &[(Tensor, Tensor)],
    step: &Tensor,
    settings: AdamW,
    grad_scale: Option<&Tensor>,
) -> Result<(), String> {
    let count = params.len();
    assert!(
        grads.len() == count && moments.len() == count,
        "one gradient and two moments per parameter"
    );
    let (m, v): (Vec<Tensor>, Vec<Tensor>) = moments
        .iter()
        .map(|(m, v)| (m.shallow_clone(), v.shallow_clone()))
        .unzip();
    let (params, grads, m, v) = (
        pointers(params),
        pointers(grads),
        pointers(&m),
        pointers(&v),
    );
    let scale = grad_scale.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a live tensor tch holds for the duration of the call, and each
    // array holds `count` of them.
    answer(unsafe {
        somatrain_fused_adamw(
            params.as_ptr(),
            grads.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            count,
            step.as_ptr(),
            settings.lr,
            settings.beta1,
            settings.beta2,
            settings.weight_decay,
            settings.eps,
            scale,
        )
    })
}

/// The 2-norm of all `tensors` together, accumulated in f64: a 0-dim f64 tensor on their
/// device.
pub fn global_norm(tensors: &[Tensor]) -> Result<Tensor, String> {
    let list = pointers(tensors);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors; on success `out` is a new at::Tensor that tch takes ownership of.
    answer(unsafe { somatrain_global_norm(list.as_ptr(), list.len(), &mut out) })?;
    assert!(!out.is_null(), "the shim answered a norm");
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Sets every tensor to zero.
pub fn zero_all(tensors: &[Tensor]) -> Result<(), String> {
    let list = pointers(tensors);
    // SAFETY: live tensors, `list.len()` of them.
    answer(unsafe { somatrain_zero_all(list.as_ptr(), list.len()) })
}

/// Adds each of `grads` (the bf16 copies' gradients, or slices of them) into its master's
/// `.grad` (in the master's precision, setting it where it has none), then drops the gradients
/// of `copies`.
pub fn accumulate_copy_grads(
    masters: &[Tensor],
    grads: &[Tensor],
    copies: &[Tensor],
) -> Result<(), String> {
    assert_eq!(masters.len(), grads.len(), "one gradient per master");
    let (masters, grads, copies) = (pointers(masters), pointers(grads), pointers(copies));
    // SAFETY: live tensors, `masters.len()` masters and gradients and `copies.len()` copies.
    answer(unsafe {
        somatrain_accumulate_copy_grads(
            masters.as_ptr(),
            grads.as_ptr(),
            masters.len(),
            copies.as_ptr(),
            copies.len(),
        )
    })
}

/// `host` copied to CUDA device `index`, queued behind the device's earlier work without the host
/// waiting for it: staged through page-locked memory (libtorch's pinned-memory cache), copied
/// with `non_blocking`. tch's `to_device` copies from pageable memory, which makes the host wait
/// until the device has run everything queued before the copy; per micro-batch, that is the
/// whole previous micro-batch. Fails where libtorch has no CUDA (pinned memory needs it).
pub fn queued_upload(host: &Tensor, index: usize) -> Result<Tensor, String> {
    let index = i32::try_from(index).map_err(|_| format!("no CUDA device {index}"))?;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: a live tensor; on success `out` is a new at::Tensor that tch takes ownership of.
    answer(unsafe { somatrain_queued_upload(host.as_ptr(), index, &mut out) })?;
    assert!(!out.is_null(), "the shim answered a tensor");
    Ok(unsafe { Tensor::from_ptr(out) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where libtorch has a CUDA device the copy arrives there intact; where it has none (CI),
    /// the shim answers libtorch's reason instead of aborting, which is what lets the engine
    /// fall back to waiting copies.
    #[test]
    fn a_queued_upload_arrives_on_the_device_or_says_why_not() {
        let host = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6]);
        match crate::open(crate::TorchDevice::Cuda(0)) {
            Ok(device) => {
                let on_device = queued_upload(&host, 0).expect("a queued copy to CUDA");
                assert_eq!(on_device.device(), device);
                let back = Vec::<i64>::try_from(on_device.to_device(tch::Device::Cpu)).unwrap();
                assert_eq!(back, [3, 1, 4, 1, 5, 9, 2, 6]);
            }
            Err(_) => {
                let why = queued_upload(&host, 0).expect_err("no CUDA, no page-locked memory");
                assert!(!why.trim().is_empty());
                eprintln!("without CUDA, libtorch answers: {why}");
            }
        }
    }
}
