//! The dropout masks drawn on the device are the CPU path's, bit for bit: on burn's flex
//! backend, or the device named by `SOMATRAIN_BURN_DEVICE` (wgpu on lavapipe, CUDA).

use burn::tensor::Bool;
use burn::tensor::Tensor;
use somatrain_burn::dropped_on_device;
use somatrain_model::cpu::kernels::Dropout;

mod common;

fn device_mask<const D: usize>(drop: &Dropout, dims: [usize; D]) -> Vec<bool> {
    let mask: Tensor<D, Bool> = dropped_on_device(drop, dims, &common::device());
    mask.into_data().iter::<bool>().collect()
}

#[test]
fn device_masks_equal_the_cpu_masks() {
    // Keys with both halves' top bits set and clear, and rates from tiny to most.
    let keys = [
        0,
        0xfeed,
        0xffff_ffff_ffff_ffff,
        0x8000_0001_7fff_fffe,
        Dropout::derive(42, &[3, 1]),
    ];
    for key in keys {
        for rate in [0.001f32, 0.1, 0.5, 0.9] {
            let drop = Dropout { rate, key };
            let dims = [2, 3, 37, 41];
            let expected = drop.dropped(dims.iter().product());
            let got = device_mask(&drop, dims);
            let differ = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ, 0,
                "key {key:#x} rate {rate}: {differ} elements differ"
            );
        }
    }
}

/// A site the size of a small model's attention (2 x 4 x 256 x 256 = 2^19 elements), where
/// indices use more than 16 bits.
#[test]
fn large_sites_match_too() {
    let drop = Dropout {
        rate: 0.1,
        key: Dropout::derive(7, &[1, 0]),
    };
    let dims = [2, 4, 256, 256];
    let expected = drop.dropped(dims.iter().product());
    let got = device_mask(&drop, dims);
    assert_eq!(got.len(), expected.len());
    let first = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first, None, "first differing element");
    let share = got.iter().filter(|&&d| d).count() as f64 / got.len() as f64;
    assert!((share - 0.1).abs() < 5e-3, "dropped share {share}");
}

/// A V1 attention site of a 2 x 1024 micro-batch (2 x 8 x 1024 x 1024 = 2^24 elements): the
/// size the device path draws. (burn's `arange` past 65,535 elements was wrong on wgpu with
/// fusion; the indices are built from short ranges, and this checks them at full size.)
#[test]
fn a_v1_attention_site_matches() {
    let drop = Dropout {
        rate: 0.1,
        key: Dropout::derive(9, &[3, 0]),
    };
    let dims = [2, 8, 1024, 1024];
    let expected = drop.dropped(1 << 24);
    let got = device_mask(&drop, dims);
    let first = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first, None, "first differing element");
}
