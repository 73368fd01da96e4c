//! Where a model's embedding earns: the share of new targets a model with a given embedding and
//! stake would be assigned, estimated under the chain's own rule, and a search for a better place.
//!
//! Owns: Monte Carlo over targets drawn as the chain draws them, the candidates of a search, the
//! co-assignment counts and the arithmetic from a rate to targets and rewards per epoch. The rule
//! itself is [`somatrain_protocol::assignment`], the code the localnet's ledger assigns with;
//! this crate never restates it and never talks to a chain (the CLI reads the chain and hands
//! over a [`Field`]).

use somatrain_protocol::ObjectId;
use somatrain_protocol::assignment::{self, Contender};

/// An active model already on chain: it competes with every candidate for each target.
#[derive(Debug, Clone, PartialEq)]
pub struct Rival {
    pub id: ObjectId,
    pub embedding: Vec<f32>,
    /// Shannons in its staking pool.
    pub stake: u64,
}

/// A position to evaluate: the embedding a new model would reveal and the stake it would hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub embedding: Vec<f32>,
    pub stake: u64,
}

/// The chance that a new target is assigned to one candidate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub rate: f64,
    /// Of the Monte Carlo estimate; 0 when exact.
    pub standard_error: f64,
    /// Targets drawn; 0 when exact.
    pub samples: u64,
    pub exact: bool,
    /// Rivals that share targets with the candidate: the fraction of the candidate's targets
    /// each one is also assigned, most first.
    pub shared_with: Vec<(ObjectId, f64)>,
}

/// The active models a newcomer competes with, and the chain's parameters of the contest.
#[derive(Debug, Clone)]
pub struct Field {
    rivals: Vec<Rival>,
    models_per_target: usize,
    dim: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error("the embedding has {got} values; the chain's embeddings have {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("at least one sample is needed")]
    NoSamples,
}

/// splitmix64: independent, reproducible target seeds from one base seed.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Field {
    /// The field of `rivals` (active models; ones of another dimension are left out, as the
    /// chain leaves them out) for targets of `dim` values assigned to `models_per_target`.
    pub fn new(rivals: Vec<Rival>, models_per_target: usize, dim: usize) -> Self {
        let rivals = rivals
            .into_iter()
            .filter(|r| r.embedding.len() == dim)
            .collect();
        Field {
            rivals,
            models_per_target,
            dim,
        }
    }

    pub fn rivals(&self) -> &[Rival] {
        &self.rivals
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn models_per_target(&self) -> usize {
        self.models_per_target
    }

    /// With fewer rivals than `models_per_target`, every new model is on every new target.
    pub fn everyone_is_assigned(&self) -> bool {
        self.rivals.len() < self.models_per_target
    }

    /// The median norm of the rivals' embeddings (1 without rivals): the scale a search draws
    /// new positions at.
    pub fn typical_norm(&self) -> f64 {
        let mut norms: Vec<f64> = self
            .rivals
            .iter()
            .map(|r| assignment::norm(&r.embedding))
            .collect();
        if norms.is_empty() {
            return 1.0;
        }
        norms.sort_by(f64::total_cmp);
        norms[norms.len() / 2]
    }

    /// Each candidate's chance of being assigned a new target, each entering the field alone.
    /// Exact when every newcomer is assigned; otherwise `samples` targets drawn as the chain
    /// draws them (seeded by `seed`), the same targets for every candidate.
    pub fn estimate(
        &self,
        candidates: &[Candidate],
        samples: usize,
        seed: u64,
    ) -> Result<Vec<Estimate>, StrategyError> {
        for c in candidates {
            if c.embedding.len() != self.dim {
                return Err(StrategyError::Dimension {
                    got: c.embedding.len(),
                    expected: self.dim,
                });
            }
        }
        if self.everyone_is_assigned() {
            let all: Vec<(ObjectId, f64)> = self.rivals.iter().map(|r| (r.id, 1.0)).collect();
            return Ok(candidates
                .iter()
                .map(|_| Estimate {
                    rate: 1.0,
                    standard_error: 0.0,
                    samples: 0,
                    exact: true,
                    shared_with: all.clone(),
                })
                .collect());
        }
        if samples == 0 {
            return Err(StrategyError::NoSamples);
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(samples);
        let per_thread = samples.div_ceil(threads);
        let tallies: Vec<Tally> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * per_thread)..((t + 1) * per_thread).min(samples);
                    scope.spawn(move || self.tally(candidates, range, seed))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a strategy worker panicked"))
                .collect()
        });
        let mut total = Tally::new(candidates.len(), self.rivals.len());
        for t in tallies {
            total.add(&t);
        }
        let n = samples as f64;
        Ok((0..candidates.len())
            .map(|c| {
                let hits = total.assigned[c] as f64;
                let rate = hits / n;
                let mut shared_with: Vec<(ObjectId, f64)> = self
                    .rivals
                    .iter()
                    .enumerate()
                    .map(|(r, rival)| {
                        let together = total.together[c * self.rivals.len() + r] as f64;
                        (rival.id, if hits > 0.0 { together / hits } else { 0.0 })
                    })
                    .filter(|(_, share)| *share > 0.0)
                    .collect();
                shared_with.sort_by(|a, b| b.1.total_cmp(&a.1));
                Estimate {
                    rate,
                    standard_error: (rate * (1.0 - rate) / n).sqrt(),
                    samples: samples as u64,
                    exact: false,
                    shared_with,
                }
            })
            .collect())
    }

    fn tally(&self, candidates: &[Candidate], range: std::ops::Range<usize>, seed: u64) -> Tally {
        let mut tally = Tally::new(candidates.len(), self.rivals.len());
        let newcomer = self.rivals.len();
        let mut contenders: Vec<Contender> = Vec::with_capacity(newcomer + 1);
        for i in range {
            let target = assignment::target_embedding(mix(seed, i as u64), self.dim);
            contenders.clear();
            contenders.extend(self.rivals.iter().map(|r| Contender {
                distance: assignment::cosine_distance(&target, &r.embedding),
                stake: r.stake,
            }));
            for (c, candidate) in candidates.iter().enumerate() {
                // The newcomer joins last: the chain orders by id, and a new id ties nobody
                // but with probability zero.
                contenders.push(Contender {
                    distance: assignment::cosine_distance(&target, &candidate.embedding),
                    stake: candidate.stake,
                });
                let chosen = assignment::assign(&contenders, self.models_per_target);
                if chosen.contains(&newcomer) {
                    tally.assigned[c] += 1;
                    for r in chosen.into_iter().filter(|&r| r != newcomer) {
                        tally.together[c * newcomer + r] += 1;
                    }
                }
                contenders.pop();
            }
        }
        tally
    }

    /// The best of `count` positions at `stake`: random directions at the field's scale and,
    /// given `own`, as many near it (and `own` itself). Screened on one sample of targets; the
    /// winner is estimated again on a fresh sample, so its rate is not flattered by the choice.
    pub fn search(
        &self,
        own: Option<&[f32]>,
        stake: u64,
        count: usize,
        samples: usize,
        seed: u64,
    ) -> Result<SearchResult, StrategyError> {
        let mut candidates: Vec<(Candidate, &'static str)> = Vec::new();
        if let Some(own) = own {
            candidates.push((
                Candidate {
                    embedding: own.to_vec(),
                    stake,
                },
                "your embedding",
            ));
        }
        let scale = self.typical_norm() / (self.dim as f64).sqrt();
        let own_scale = own.map(|e| assignment::norm(e) / (self.dim as f64).sqrt());
        for k in 0..count {
            let noise = assignment::target_embedding(mix(seed ^ 0x5EA2C4, k as u64), self.dim);
            let (embedding, origin) = match (own, own_scale) {
                (Some(own), Some(own_scale)) if k % 2 == 1 => {
                    const SPREADS: [f64; 3] = [0.1, 0.3, 1.0];
                    let spread = SPREADS[(k / 2) % SPREADS.len()];
                    let near = own
                        .iter()
                        .zip(&noise)
                        .map(|(o, z)| *o + (spread * own_scale * *z as f64) as f32)
                        .collect();
                    (near, "near your embedding")
                }
                _ => (
                    noise.iter().map(|z| (scale * *z as f64) as f32).collect(),
                    "random direction at the field's scale",
                ),
            };
            candidates.push((Candidate { embedding, stake }, origin));
        }
        if candidates.is_empty() {
            return Err(StrategyError::NoSamples);
        }
        let screened = self.estimate(
            &candidates
                .iter()
                .map(|(c, _)| c.clone())
                .collect::<Vec<_>>(),
            samples,
            seed,
        )?;
        let (best, screened_best) = screened
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.rate.total_cmp(&b.1.rate))
            .expect("at least one candidate");
        let (winner, origin) = candidates.swap_remove(best);
        let fresh = self
            .estimate(std::slice::from_ref(&winner), samples, mix(seed, u64::MAX))?
            .pop()
            .expect("one estimate");
        Ok(SearchResult {
            screened_rate: screened_best.rate,
            candidates: screened.len(),
            best: winner,
            origin,
            estimate: fresh,
        })
    }
}

/// What [`Field::search`] found.
#[derive(Debug, Clone)]
pub struct SearchResult {
    pub best: Candidate,
    pub origin: &'static str,
    /// The winner's rate on the screening sample (biased upward by the choice).
    pub screened_rate: f64,
    /// The winner on a fresh sample.
    pub estimate: Estimate,
    pub candidates: usize,
}

struct Tally {
    assigned: Vec<u64>,
    /// `[candidate][rival]`: targets the two share.
    together: Vec<u64>,
}

impl Tally {
    fn new(candidates: usize, rivals: usize) -> Self {
        Tally {
            assigned: vec![0; candidates],
            together: vec![0; candidates * rivals],
        }
    }

    fn add(&mut self, other: &Tally) {
        for (a, b) in self.assigned.iter_mut().zip(&other.assigned) {
            *a += b;
        }
        for (a, b) in self.together.iter_mut().zip(&other.together) {
            *a += b;
        }
    }
}

/// What a rate is worth per epoch, from the chain's parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Earnings {
    /// Targets the chain generates in an epoch: those of the epoch change plus one per hit
    /// (the hits average), capped by the epoch's target budget.
    pub targets_per_epoch: f64,
    pub assigned_per_epoch: f64,
    pub reward_per_target: u64,
    /// The model owner's share of a filled target's reward, in basis points, where the chain
    /// says.
    pub model_share_bps: Option<u64>,
    /// Shannons per epoch if every assigned target is filled with this model's data.
    pub if_it_wins_every_one: Option<f64>,
    /// Shannons per epoch if it wins one assigned target in three.
    pub if_it_wins_one_in_three: Option<f64>,
}

/// The chain's target economy, as [`earnings`] needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Economy {
    pub initial_targets_per_epoch: u64,
    pub hits_ema: u64,
    /// The budget's cap on targets funded per epoch (`target_hits_per_epoch` since protocol
    /// version 3).
    pub max_targets_per_epoch: u64,
    pub reward_per_target: u64,
    pub model_share_bps: Option<u64>,
}

pub fn earnings(rate: f64, economy: &Economy) -> Earnings {
    let targets = (economy
        .initial_targets_per_epoch
        .saturating_add(economy.hits_ema))
    .min(economy.max_targets_per_epoch) as f64;
    let assigned = rate * targets;
    let all = economy
        .model_share_bps
        .map(|bps| assigned * economy.reward_per_target as f64 * bps as f64 / 10_000.0);
    Earnings {
        targets_per_epoch: targets,
        assigned_per_epoch: assigned,
        reward_per_target: economy.reward_per_target,
        model_share_bps: economy.model_share_bps,
        if_it_wins_every_one: all,
        if_it_wins_one_in_three: all.map(|a| a / 3.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rival(id: u8, embedding: Vec<f32>, stake: u64) -> Rival {
        Rival {
            id: ObjectId([id; 32]),
            embedding,
            stake,
        }
    }

    #[test]
    fn fewer_rivals_than_seats_is_exact() {
        let field = Field::new(vec![rival(1, vec![1.0, 0.0], 5)], 3, 2);
        assert!(field.everyone_is_assigned());
        let e = field
            .estimate(
                &[Candidate {
                    embedding: vec![0.0, 1.0],
                    stake: 1,
                }],
                0,
                1,
            )
            .unwrap();
        assert_eq!((e[0].rate, e[0].exact), (1.0, true));
        assert_eq!(e[0].shared_with, vec![(ObjectId([1; 32]), 1.0)]);
    }

    /// One seat, one rival of equal stake, in two dimensions: the newcomer wins exactly the
    /// targets whose direction is nearer to it. With the rival at 0° and the newcomer at 90°,
    /// that is the half-plane of directions nearer 90° than 0°: half of all targets.
    #[test]
    fn a_half_plane_is_half_the_targets() {
        let field = Field::new(vec![rival(1, vec![1.0, 0.0], 100)], 1, 2);
        let e = &field
            .estimate(
                &[Candidate {
                    embedding: vec![0.0, 1.0],
                    stake: 100,
                }],
                20_000,
                7,
            )
            .unwrap()[0];
        assert!(!e.exact);
        assert!((e.rate - 0.5).abs() < 4.0 * e.standard_error, "{e:?}");
        assert!((e.standard_error - (0.25f64 / 20_000.0).sqrt()).abs() < 1e-3);
    }

    #[test]
    fn more_stake_never_lowers_the_rate_on_the_same_targets() {
        let field = Field::new(
            vec![
                rival(1, vec![1.0, 0.0, 0.0], 100),
                rival(2, vec![0.0, 1.0, 0.0], 400),
                rival(3, vec![0.0, 0.0, 1.0], 900),
            ],
            1,
            3,
        );
        let at = |stake| Candidate {
            embedding: vec![1.0, 1.0, 1.0],
            stake,
        };
        let e = field
            .estimate(&[at(1), at(100), at(10_000)], 5000, 3)
            .unwrap();
        assert!(e[0].rate <= e[1].rate && e[1].rate <= e[2].rate, "{e:?}");
        assert!(e[2].rate > e[0].rate);
    }

    #[test]
    fn a_wrong_dimension_is_refused() {
        let field = Field::new(vec![], 3, 4);
        let err = field
            .estimate(
                &[Candidate {
                    embedding: vec![1.0],
                    stake: 1,
                }],
                10,
                1,
            )
            .unwrap_err();
        assert_eq!(
            err,
            StrategyError::Dimension {
                got: 1,
                expected: 4
            }
        );
    }

    /// A crowded corner: the search moves away from it.
    #[test]
    fn search_beats_a_crowded_position() {
        let field = Field::new(
            vec![
                rival(1, vec![1.0, 0.1, 0.0, 0.0], 100),
                rival(2, vec![1.0, -0.1, 0.0, 0.0], 100),
                rival(3, vec![1.0, 0.0, 0.1, 0.0], 100),
            ],
            1,
            4,
        );
        let own = [1.0f32, 0.0, 0.0, 0.1];
        let own_rate = field
            .estimate(
                &[Candidate {
                    embedding: own.to_vec(),
                    stake: 100,
                }],
                4000,
                11,
            )
            .unwrap()[0]
            .rate;
        let found = field.search(Some(&own), 100, 16, 4000, 11).unwrap();
        assert_eq!(found.candidates, 17);
        assert!(found.estimate.rate > own_rate + 0.2, "{own_rate} {found:?}");
    }

    #[test]
    fn earnings_follow_the_rate_and_the_budget_cap() {
        let economy = Economy {
            initial_targets_per_epoch: 100,
            hits_ema: 50,
            max_targets_per_epoch: 120,
            reward_per_target: 1000,
            model_share_bps: Some(5000),
        };
        let e = earnings(0.5, &economy);
        assert_eq!(e.targets_per_epoch, 120.0);
        assert_eq!(e.assigned_per_epoch, 60.0);
        assert_eq!(e.if_it_wins_every_one, Some(30_000.0));
        assert_eq!(e.if_it_wins_one_in_three, Some(10_000.0));
        let unknown = earnings(
            0.5,
            &Economy {
                model_share_bps: None,
                ..economy
            },
        );
        assert_eq!(unknown.if_it_wins_every_one, None);
    }
}
