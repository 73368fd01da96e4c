//! The scoring loss pieces, computed on the host from a forward pass's outputs: PAD-inclusive
//! cross-entropy, SIGReg over random unit projections, and the per-batch embedding.

use rayon::prelude::*;
use somatrain_data::PAD;

use crate::config::{SIGREG_POINTS, SIGREG_SLICES, SIGREG_T_MAX};

/// Sum of the negative log-likelihoods of `targets` under `logits [rows, vocab]`; PAD targets
/// contribute zero. The scorer divides this by *all* rows, PAD included.
pub fn cross_entropy_sum(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    let partials: Vec<f64> = logits
        .par_chunks(vocab * 64)
        .zip(targets.par_chunks(64))
        .map(|(rows, tgts)| {
            let mut total = 0f64;
            for (row, &t) in rows.chunks_exact(vocab).zip(tgts) {
                if t == PAD {
                    continue;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
                let log_prob = row[t as usize] - max - sum.ln();
                total += -(log_prob as f64);
            }
            total
        })
        .collect();
    // Summed in a fixed order: a parallel sum's order (and so its rounding) varies between runs.
    partials.iter().sum()
}

/// Cross-entropy summed over non-PAD rows (as [`cross_entropy_sum`]) and its gradient:
/// `dlogits = (softmax - onehot) * grad_scale` on non-PAD rows, zero on PAD rows.
pub fn cross_entropy_with_grad(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    grad_scale: f32,
    dlogits: &mut [f32],
) -> f64 {
    let partials: Vec<f64> = dlogits
        .par_chunks_mut(vocab * 64)
        .zip(logits.par_chunks(vocab * 64))
        .zip(targets.par_chunks(64))
        .map(|((grads, rows), tgts)| {
            let mut total = 0f64;
            for ((g, row), &t) in grads
                .chunks_exact_mut(vocab)
                .zip(rows.chunks_exact(vocab))
                .zip(tgts)
            {
                if t == PAD {
                    g.fill(0.0);
                    continue;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
                let lse = sum.ln();
                total += -((row[t as usize] - max - lse) as f64);
                for (g, x) in g.iter_mut().zip(row) {
                    *g = (x - max - lse).exp() * grad_scale;
                }
                g[t as usize] -= grad_scale;
            }
            total
        })
        .collect();
    partials.iter().sum()
}

/// The t grid, the target characteristic function phi(t) and the trapezoid weights of SIGReg.
pub struct SigRegGrid {
    pub t: [f32; SIGREG_POINTS],
    pub phi: [f32; SIGREG_POINTS],
    pub weight: [f32; SIGREG_POINTS],
}

impl SigRegGrid {
    pub fn new() -> Self {
        let dt = SIGREG_T_MAX / (SIGREG_POINTS - 1) as f32;
        let mut grid = SigRegGrid {
            t: [0.0; SIGREG_POINTS],
            phi: [0.0; SIGREG_POINTS],
            weight: [0.0; SIGREG_POINTS],
        };
        for j in 0..SIGREG_POINTS {
            let t = j as f32 * dt;
            let phi = (-(t * t) / 2.0).exp();
            let end = j == 0 || j == SIGREG_POINTS - 1;
            grid.t[j] = t;
            grid.phi[j] = phi;
            grid.weight[j] = if end { dt * phi } else { 2.0 * dt * phi };
        }
        grid
    }
}

impl Default for SigRegGrid {
    fn default() -> Self {
        Self::new()
    }
}

/// Mean SIGReg statistic over all rows of `projections [rows, SLICES]` (`R A`).
///
/// For each token the empirical characteristic function is averaged over the slices at every
/// `t_j`; `cos(t_j p)` and `sin(t_j p)` come from rotating `(cos t_1 p, sin t_1 p)` in f64, since
/// the grid is uniform (`t_j = j t_1`): one sin/cos per value instead of sixteen.
pub fn sigreg_mean(projections: &[f32]) -> f32 {
    sigreg(projections, None)
}

/// [`sigreg_mean`] and its gradient: `dproj = d(mean stat)/d(proj) * grad_scale`.
pub fn sigreg_with_grad(projections: &[f32], grad_scale: f32, dproj: &mut [f32]) -> f32 {
    sigreg(projections, Some((grad_scale, dproj)))
}

fn sigreg(projections: &[f32], grad: Option<(f32, &mut [f32])>) -> f32 {
    let grid = SigRegGrid::new();
    let rows = projections.len() / SIGREG_SLICES;
    let t1 = grid.t[1] as f64;
    let (grad_scale, dproj) = match grad {
        Some((scale, d)) => (scale / rows as f32, Some(d)),
        None => (0.0, None),
    };
    let token = |p: &[f32], dp: Option<&mut [f32]>, scratch: &mut Vec<f64>| -> f64 {
        scratch.resize(SIGREG_SLICES * 4, 0.0);
        let (base, rest) = scratch.split_at_mut(SIGREG_SLICES * 2);
        let (c1, s1) = base.split_at_mut(SIGREG_SLICES);
        let (cj, sj) = rest.split_at_mut(SIGREG_SLICES);
        for (i, &x) in p.iter().enumerate() {
            let (s, c) = (t1 * x as f64).sin_cos();
            c1[i] = c;
            s1[i] = s;
        }
        let rotate = |cj: &mut [f64], sj: &mut [f64], c1: &[f64], s1: &[f64]| {
            for i in 0..SIGREG_SLICES {
                let (c, s) = (cj[i], sj[i]);
                cj[i] = c * c1[i] - s * s1[i];
                sj[i] = s * c1[i] + c * s1[i];
            }
        };
        // j = 0 contributes nothing: cos(0) = 1 = phi(0) and sin(0) = 0 exactly.
        let mut means = [(0f32, 0f32); SIGREG_POINTS];
        cj.copy_from_slice(c1);
        sj.copy_from_slice(s1);
        let mut stat = 0f32;
        for j in 1..SIGREG_POINTS {
            let (mut sum_c, mut sum_s) = (0f64, 0f64);
            for i in 0..SIGREG_SLICES {
                sum_c += cj[i];
                sum_s += sj[i];
            }
            let mean_c = (sum_c / SIGREG_SLICES as f64) as f32;
            let mean_s = (sum_s / SIGREG_SLICES as f64) as f32;
            means[j] = (mean_c, mean_s);
            stat += ((mean_c - grid.phi[j]).powi(2) + mean_s * mean_s) * grid.weight[j];
            if j + 1 < SIGREG_POINTS {
                rotate(cj, sj, c1, s1);
            }
        }
        if let Some(dp) = dp {
            // d stat / d p_s = sum_j 2 w_j t_j (S_j cos(t_j p_s) - (C_j - phi_j) sin(t_j p_s)):
            // the factor N = 256 cancels against the 1/256 of the slice means.
            dp.fill(0.0);
            cj.copy_from_slice(c1);
            sj.copy_from_slice(s1);
            for j in 1..SIGREG_POINTS {
                let (mean_c, mean_s) = means[j];
                let a = (2.0 * grid.weight[j] * grid.t[j]) as f64;
                let (sc, cc) = (mean_s as f64 * a, (mean_c - grid.phi[j]) as f64 * a);
                for i in 0..SIGREG_SLICES {
                    dp[i] += ((sc * cj[i] - cc * sj[i]) * grad_scale as f64) as f32;
                }
                if j + 1 < SIGREG_POINTS {
                    rotate(cj, sj, c1, s1);
                }
            }
        }
        (stat * SIGREG_SLICES as f32) as f64
    };
    let chunk = 64 * SIGREG_SLICES;
    let partials: Vec<f64> = match dproj {
        Some(dproj) => projections
            .par_chunks(chunk)
            .zip(dproj.par_chunks_mut(chunk))
            .map_init(Vec::new, |scratch, (p, d)| {
                p.chunks_exact(SIGREG_SLICES)
                    .zip(d.chunks_exact_mut(SIGREG_SLICES))
                    .map(|(p, d)| token(p, Some(d), scratch))
                    .sum()
            })
            .collect(),
        None => projections
            .par_chunks(chunk)
            .map_init(Vec::new, |scratch, p| {
                p.chunks_exact(SIGREG_SLICES)
                    .map(|p| token(p, None, scratch))
                    .sum()
            })
            .collect(),
    };
    (partials.iter().sum::<f64>() / rows as f64) as f32
}

/// Mean of `reps [batch, seq, dim]` over the sequence, then over the batch.
pub fn batch_embedding(reps: &[f32], batch: usize, seq: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f64; dim];
    for sequence in reps.chunks_exact(seq * dim).take(batch) {
        let mut sums = vec![0f64; dim];
        for row in sequence.chunks_exact(dim) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
        for (o, s) in out.iter_mut().zip(sums) {
            *o += ((s / seq as f64) as f32) as f64;
        }
    }
    out.into_iter().map(|s| (s / batch as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct evaluation of the scorer's formula, one sin/cos per (token, slice, t).
    fn sigreg_direct(p: &[f32]) -> f32 {
        let g = SigRegGrid::new();
        let rows = p.len() / SIGREG_SLICES;
        let mut total = 0f64;
        for row in p.chunks_exact(SIGREG_SLICES) {
            let mut stat = 0f32;
            for j in 0..SIGREG_POINTS {
                let c: f32 = row
                    .iter()
                    .map(|x| ((g.t[j] * x) as f64).cos() as f32)
                    .sum::<f32>()
                    / SIGREG_SLICES as f32;
                let s: f32 = row
                    .iter()
                    .map(|x| ((g.t[j] * x) as f64).sin() as f32)
                    .sum::<f32>()
                    / SIGREG_SLICES as f32;
                stat += ((c - g.phi[j]).powi(2) + s * s) * g.weight[j];
            }
            total += (stat * SIGREG_SLICES as f32) as f64;
        }
        (total / rows as f64) as f32
    }

    #[test]
    fn rotated_sigreg_matches_direct_formula() {
        let p = somatrain_noise::normal_array(9, SIGREG_SLICES * 7, 0.0, 1.5);
        let (a, b) = (sigreg_mean(&p), sigreg_direct(&p));
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn cross_entropy_ignores_pad_targets() {
        let logits = vec![0.0f32; 2 * 4];
        let sum = cross_entropy_sum(&logits, &[1, PAD], 4);
        assert!((sum - (4f64).ln()).abs() < 1e-6);
    }
}
