//! Model shape: the V1 constants and the smaller presets used for tests and CPU work.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Vocabulary of every V1 model: 256 bytes, PAD, EOS and six reserved ids.
pub const VOCAB_SIZE: usize = 264;
/// Longest sequence the network cuts data into.
pub const MAX_SEQ_LEN: usize = 1024;
/// Sequences per batch in the network's scorer.
pub const EVAL_BATCH_SIZE: usize = 16;
pub const LAYER_NORM_EPS: f32 = 1e-5;
pub const ROPE_MAX_WAVELENGTH: f32 = 10_000.0;
pub const SIGREG_SLICES: usize = 256;
pub const SIGREG_POINTS: usize = 17;
pub const SIGREG_T_MAX: f32 = 3.0;
pub const SIGREG_COEFFICIENT: f32 = 0.02;
/// Value that replaces masked attention scores (replaced, not added; not -inf).
pub const MASK_FILL: f32 = -1.0e4;

/// The shape of one model. Everything else about V1 is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub embedding_dim: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub pwff_hidden_dim: usize,
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
}

fn default_vocab() -> usize {
    VOCAB_SIZE
}

impl Default for ModelConfig {
    fn default() -> Self {
        Preset::V1.config()
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.embedding_dim / self.num_heads
    }

    /// Checks what the forward pass relies on: heads divide the width, and the head dim is even
    /// (RoPE rotates halves).
    pub fn validate(&self) -> Result<(), String> {
        if self.embedding_dim == 0 || self.num_layers == 0 || self.pwff_hidden_dim == 0 {
            return Err(format!("config has a zero dimension: {self:?}"));
        }
        if self.num_heads == 0 || !self.embedding_dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "{} heads do not divide embedding dim {}",
                self.num_heads, self.embedding_dim
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.vocab_size != VOCAB_SIZE {
            return Err(format!(
                "vocab size must be {VOCAB_SIZE}, got {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    pub fn parameter_count(&self) -> u64 {
        let d = self.embedding_dim as u64;
        let f = self.pwff_hidden_dim as u64;
        let v = self.vocab_size as u64;
        let per_layer = 4 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d);
        v * d + self.num_layers as u64 * per_layer + 2 * d + d * v + v
    }

    /// Multiply-adds x2 of one forward pass over `tokens` tokens in sequences of `seq_len`,
    /// counting attention as the causal half that a fused kernel computes.
    pub fn forward_flops(&self, tokens: u64, seq_len: u64) -> f64 {
        let d = self.embedding_dim as f64;
        let f = self.pwff_hidden_dim as f64;
        let v = self.vocab_size as f64;
        let n = tokens as f64;
        let dense = 2.0 * n * (4.0 * d * d + 2.0 * d * f) * self.num_layers as f64;
        // q.k and p.v over the causal half: 2 matmuls x 2 flops x d x (T+1)/2 keys per token.
        let attention = 2.0 * 2.0 * n * d * (seq_len as f64 + 1.0) / 2.0 * self.num_layers as f64;
        let head = 2.0 * n * d * v;
        let sigreg = 2.0 * n * d * SIGREG_SLICES as f64;
        dense + attention + head + sigreg
    }
}

/// Named model shapes. `V1` is what the network runs; the others are for tests and CPU work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    V1,
    Medium,
    Small,
    Tiny,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::V1, Preset::Medium, Preset::Small, Preset::Tiny];

    pub fn config(self) -> ModelConfig {
        let (embedding_dim, num_layers, num_heads, pwff_hidden_dim) = match self {
            Preset::V1 => (2048, 24, 8, 8192),
            Preset::Medium => (512, 4, 2, 2048),
            Preset::Small => (64, 2, 4, 256),
            Preset::Tiny => (16, 2, 4, 64),
        };
        ModelConfig {
            embedding_dim,
            num_layers,
            num_heads,
            pwff_hidden_dim,
            vocab_size: VOCAB_SIZE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::V1 => "v1",
            Preset::Medium => "medium",
            Preset::Small => "small",
            Preset::Tiny => "tiny",
        }
    }

    /// The preset whose shape is exactly `config`, if any.
    pub fn matching(config: &ModelConfig) -> Option<Preset> {
        Self::ALL.into_iter().find(|p| p.config() == *config)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown preset '{s}' (known: v1, medium, small, tiny)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_parameter_count_matches_the_network() {
        assert_eq!(Preset::V1.config().parameter_count(), 1_209_684_232);
    }

    #[test]
    fn presets_round_trip_by_name() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            assert!(p.config().validate().is_ok());
        }
        assert!("huge".parse::<Preset>().is_err());
    }
}
