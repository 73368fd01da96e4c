// The few libtorch operators the engine needs that tch does not bind: AdamW as one fused
// multi-tensor kernel, the global gradient norm as one multi-tensor reduction, zeroing every
// gradient at once, adding the gradients of bf16 weight copies into their f32 masters', and a
// host-to-CUDA copy that does not wait for the device. Each entry point catches every C++
// exception and returns its message (malloc'd, freed by somatrain_free_message), or NULL on
// success.
//
// A tch tensor is a pointer to an at::Tensor (torch-sys's C_tensor), so tensors cross as
// at::Tensor pointers and come back as new at::Tensor objects that tch then owns.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

char *copy_message(const char *what) {
    size_t length = std::strlen(what);
    char *copy = static_cast<char *>(std::malloc(length + 1));
    if (copy != nullptr) {
        std::memcpy(copy, what, length + 1);
    }
    return copy;
}

std::vector<at::Tensor> gather(at::Tensor *const *tensors, size_t count) {
    std::vector<at::Tensor> list;
    list.reserve(count);
    for (size_t i = 0; i < count; ++i) {
        list.push_back(*tensors[i]);
    }
    return list;
}

template <typename Work> char *guarded(Work work) {
    try {
        work();
        return nullptr;
    } catch (const std::exception &e) {
        return copy_message(e.what());
    } catch (...) {
        return copy_message("an unknown C++ exception");
    }
}

} // namespace

extern "C" {

void somatrain_free_message(char *message) { std::free(message); }

// AdamW (decoupled weight decay) over every parameter in one fused kernel. Each gradient is
// divided by grad_scale first when it is given (clipping: max(1, norm / max_norm)), and is left
// unscaled in place. step is a one-element f32 tensor on the parameters' device holding the
// step number the bias corrections use.
char *somatrain_fused_adamw(at::Tensor *const *params, at::Tensor *const *grads,
                            at::Tensor *const *exp_avgs, at::Tensor *const *exp_avg_sqs,
                            size_t count, const at::Tensor *step, double lr, double beta1,
                            double beta2, double weight_decay, double eps,
                            const at::Tensor *grad_scale) {
    return guarded([&] {
        std::vector<at::Tensor> steps(count, *step);
        std::optional<at::Tensor> scale;
        if (grad_scale != nullptr) {
            scale = *grad_scale;
        }
        at::_fused_adamw_(gather(params, count), gather(grads, count), gather(exp_avgs, count),
                          gather(exp_avg_sqs, count), {}, steps, lr, beta1, beta2, weight_decay,
                          eps, /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
    });
}

// The 2-norm of all tensors together, accumulated in f64: a new 0-dim f64 tensor in *out.
char *somatrain_global_norm(at::Tensor *const *tensors, size_t count, at::Tensor **out) {
    return guarded([&] {
        std::vector<at::Tensor> norms =
            at::_foreach_norm(gather(tensors, count), 2, at::ScalarType::Double);
        at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
        *out = new at::Tensor(std::move(total));
    });
}

// Sets every tensor to zero in one multi-tensor kernel.
char *somatrain_zero_all(at::Tensor *const *tensors, size_t count) {
    return guarded([&] { at::_foreach_zero_(gather(tensors, count)); });
}

// Adds grads[i] (a bf16 copy's gradient, or a slice of a fused copy's) into masters[i]'s
// gradient, set to it in the master's precision where the master has none yet, as autograd
// would; then drops the gradients of the copies, which the next backward pass allocates
// afresh. The f32 sum of the bf16 values is what autograd computes when the master is cast
// inside the graph, without the cast's f32 gradient in between.
char *somatrain_accumulate_copy_grads(at::Tensor *const *masters, at::Tensor *const *grads,
                                      size_t count, at::Tensor *const *copies,
                                      size_t copy_count) {
    return guarded([&] {
        for (size_t i = 0; i < count; ++i) {
            at::Tensor &master_grad = masters[i]->mutable_grad();
            if (master_grad.defined()) {
                master_grad.add_(*grads[i]);
            } else {
                master_grad = grads[i]->to(masters[i]->scalar_type(), /*non_blocking=*/false,
                                           /*copy=*/true);
            }
        }
        for (size_t i = 0; i < copy_count; ++i) {
            copies[i]->mutable_grad().reset();
        }
    });
}

// A copy of a host tensor on CUDA device `device_index` in *out, queued on the device's current
// stream from page-locked memory. A copy from pageable memory (what tch's to_device does) makes
// the host wait until the stream has run everything queued before it; this one returns at once.
// libtorch's pinned-memory cache holds the page-locked block until the copy has run.
char *somatrain_queued_upload(const at::Tensor *host, int device_index, at::Tensor **out) {
    return guarded([&] {
        at::Tensor pinned = host->pin_memory();
        *out = new at::Tensor(
            pinned.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)),
                      /*non_blocking=*/true));
    });
}

} // extern "C"
