//! The network's deterministic normal generator (`soma-arrgen`), bit for bit.
//!
//! Owns one function: [`normal_array`], used for the SIGReg projection noise in scoring and for
//! target embeddings on the network. It must stay bit-identical to the network, which is why
//! `rand` and `rand_distr` are pinned to exact versions in the workspace: `StdRng` (ChaCha12,
//! seeded through PCG32) is documented as not portable across `rand` releases.

#![forbid(unsafe_code)]

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// `count` samples of N(mean, std) from `StdRng::seed_from_u64(seed)`, in row-major order of
/// whatever shape the caller has in mind.
///
/// # Panics
/// When `std` is negative or not finite (the generator's own precondition).
pub fn normal_array(seed: u64, count: usize, mean: f32, std: f32) -> Vec<f32> {
    let distribution = Normal::new(mean, std).expect("standard deviation must be finite and >= 0");
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| distribution.sample(&mut rng)).collect()
}

/// The SIGReg projection matrix for one batch: `[dim, slices]` noise seeded `seed`, each column
/// scaled to unit L2 norm (norm taken over `dim`, computed in f32 as the scorer does).
pub fn unit_column_noise(seed: u64, dim: usize, slices: usize) -> Vec<f32> {
    let mut noise = normal_array(seed, dim * slices, 0.0, 1.0);
    let mut sum_sq = vec![0f32; slices];
    for row in noise.chunks_exact(slices) {
        for (acc, x) in sum_sq.iter_mut().zip(row) {
            *acc += x * x;
        }
    }
    let norms: Vec<f32> = sum_sq.iter().map(|s| s.sqrt()).collect();
    for row in noise.chunks_exact_mut(slices) {
        for (x, norm) in row.iter_mut().zip(&norms) {
            *x /= norm;
        }
    }
    noise
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_have_unit_norm() {
        let a = unit_column_noise(3, 64, 8);
        for s in 0..8 {
            let norm: f32 = (0..64)
                .map(|d| a[d * 8 + s] * a[d * 8 + s])
                .sum::<f32>()
                .sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "column {s} norm {norm}");
        }
    }
}
