//! Which models a new target is assigned to: the chain's stake-weighted nearest-neighbour rule
//! (`shared/reference/protocol-targets.md`, sections 1.2 and 2).
//!
//! One implementation for everyone who needs the rule: the localnet's ledger assigns targets
//! with it, and `somatrain strategy` estimates a model's share of targets with it. A target's
//! embedding is i.i.d. standard normal; each active model `i` with embedding `m_i` and stake
//! `s_i` scores `cosine_distance(t, m_i) / (sqrt(s_i) / Σ_j sqrt(s_j) + 1e-10)`, and the
//! `models_per_target` lowest scores win.

/// The embedding of a target generated from `seed` (the network's `deterministic_embedding`).
pub fn target_embedding(seed: u64, dim: usize) -> Vec<f32> {
    somatrain_noise::normal_array(seed, dim, 0.0, 1.0)
}

/// `1 - cos(a, b)`, each norm floored at 1e-8 as the network's cosine similarity does.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    1.0 - dot / (norm(a) * norm(b))
}

/// The Euclidean norm as [`cosine_distance`] uses it (floored at 1e-8), for callers that
/// normalise once and compare many times.
pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-8)
}

/// One model competing for a target: its cosine distance to the target and its stake.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Contender {
    pub distance: f64,
    /// Shannons in the model's staking pool.
    pub stake: u64,
}

/// Every contender's score, `distance / sqrt-stake share`, in input order (lower is better).
pub fn scores(contenders: &[Contender]) -> Vec<f64> {
    let root = |c: &Contender| (c.stake as f64).sqrt();
    let total: f64 = contenders.iter().map(root).sum();
    let n = contenders.len() as f64;
    contenders
        .iter()
        .map(|c| {
            let share = if total > 0.0 {
                root(c) / total
            } else {
                1.0 / n
            };
            c.distance / (share + 1e-10)
        })
        .collect()
}

/// Indices of `contenders` with their scores, best first; equal scores keep input order (the
/// chain's registry order, ascending model id).
pub fn rank(contenders: &[Contender]) -> Vec<(usize, f64)> {
    let mut ranked: Vec<(usize, f64)> = scores(contenders).into_iter().enumerate().collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    ranked
}

/// The indices of the contenders a target is assigned to: the `models_per_target` best.
pub fn assign(contenders: &[Contender], models_per_target: usize) -> Vec<usize> {
    rank(contenders)
        .into_iter()
        .take(models_per_target)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The network's `test_stake_weighting`: two orthogonal models with stakes 100 and 1000, both
    /// at cosine distance 1 from the target: shares 0.240/0.760, scores 4.16/1.32, the
    /// high-stake model first.
    #[test]
    fn stake_weighting_matches_the_worked_example() {
        let target = [0.0f32, 0.0, 1.0];
        let contenders = [
            Contender {
                distance: cosine_distance(&target, &[1.0, 0.0, 0.0]),
                stake: 100,
            },
            Contender {
                distance: cosine_distance(&target, &[0.0, 1.0, 0.0]),
                stake: 1000,
            },
        ];
        let ranked = rank(&contenders);
        assert_eq!(ranked[0].0, 1);
        assert!((ranked[0].1 - 1.32).abs() < 0.005, "{ranked:?}");
        assert!((ranked[1].1 - 4.16).abs() < 0.005, "{ranked:?}");
        assert_eq!(assign(&contenders, 1), vec![1]);
        assert_eq!(assign(&contenders, 3), vec![1, 0]);
    }

    #[test]
    fn equal_scores_keep_input_order_and_zero_stakes_share_equally() {
        let same = Contender {
            distance: 0.5,
            stake: 0,
        };
        assert_eq!(assign(&[same, same, same], 2), vec![0, 1]);
        assert_eq!(scores(&[same, same]), vec![0.5 / (0.5 + 1e-10); 2]);
    }

    #[test]
    fn distances_span_zero_to_two_and_scale_does_not_matter() {
        assert!(cosine_distance(&[1.0, 2.0], &[2.0, 4.0]).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[-5.0, 0.0]) - 2.0).abs() < 1e-12);
        let t = target_embedding(7, 64);
        assert_eq!(t, target_embedding(7, 64));
        assert_ne!(t, target_embedding(8, 64));
    }
}
