//! The parameters of one model, held as plain `f32` buffers in the canonical layout.
//!
//! Linear weights are `[in, out]` row-major and applied as `x W + b`, exactly as stored in the
//! network's safetensors files, so loading and saving never transposes anything.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::config::ModelConfig;

/// Parameters of one pre-norm transformer layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    pub norm_1_gamma: Vec<f32>, // [D]
    pub norm_1_beta: Vec<f32>,  // [D]
    pub query_w: Vec<f32>,      // [D, D]
    pub query_b: Vec<f32>,      // [D]
    pub key_w: Vec<f32>,        // [D, D]
    pub key_b: Vec<f32>,        // [D]
    pub value_w: Vec<f32>,      // [D, D]
    pub value_b: Vec<f32>,      // [D]
    pub output_w: Vec<f32>,     // [D, D]
    pub output_b: Vec<f32>,     // [D]
    pub norm_2_gamma: Vec<f32>, // [D]
    pub norm_2_beta: Vec<f32>,  // [D]
    pub inner_w: Vec<f32>,      // [D, F]
    pub inner_b: Vec<f32>,      // [F]
    pub outer_w: Vec<f32>,      // [F, D]
    pub outer_b: Vec<f32>,      // [D]
}

/// All parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub config: ModelConfig,
    pub embedding: Vec<f32>, // [V, D]
    pub layers: Vec<LayerWeights>,
    pub final_norm_gamma: Vec<f32>, // [D]
    pub final_norm_beta: Vec<f32>,  // [D]
    pub predictor_w: Vec<f32>,      // [D, V]
    pub predictor_b: Vec<f32>,      // [V]
}

/// Name and shape of one tensor in the canonical file layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Weights {
    /// Every tensor of `config` in file order, with its canonical name and shape.
    pub fn specs(config: &ModelConfig) -> Vec<TensorSpec> {
        let mut specs = Vec::new();
        visit_specs(config, |name, shape| specs.push(TensorSpec { name, shape }));
        specs
    }

    /// Zero-filled weights of the right shapes.
    pub fn zeros(config: ModelConfig) -> Self {
        let d = config.embedding_dim;
        let f = config.pwff_hidden_dim;
        let v = config.vocab_size;
        let layer = LayerWeights {
            norm_1_gamma: vec![0.0; d],
            norm_1_beta: vec![0.0; d],
            query_w: vec![0.0; d * d],
            query_b: vec![0.0; d],
            key_w: vec![0.0; d * d],
            key_b: vec![0.0; d],
            value_w: vec![0.0; d * d],
            value_b: vec![0.0; d],
            output_w: vec![0.0; d * d],
            output_b: vec![0.0; d],
            norm_2_gamma: vec![0.0; d],
            norm_2_beta: vec![0.0; d],
            inner_w: vec![0.0; d * f],
            inner_b: vec![0.0; f],
            outer_w: vec![0.0; f * d],
            outer_b: vec![0.0; d],
        };
        Weights {
            config,
            embedding: vec![0.0; v * d],
            layers: vec![layer; config.num_layers],
            final_norm_gamma: vec![0.0; d],
            final_norm_beta: vec![0.0; d],
            predictor_w: vec![0.0; d * v],
            predictor_b: vec![0.0; v],
        }
    }

    /// Freshly initialised weights, deterministic in `seed`: the embedding N(0, 1), every linear
    /// weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norms gamma 1 and beta 0 (the
    /// PyTorch defaults the reference trainer starts from).
    pub fn init(config: ModelConfig, seed: u64) -> Self {
        let mut weights = Self::zeros(config);
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
        let d = config.embedding_dim;
        let f = config.pwff_hidden_dim;
        for x in &mut weights.embedding {
            *x = normal.sample(&mut rng);
        }
        let fill_uniform = |buf: &mut [f32], fan_in: usize, rng: &mut StdRng| {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let uniform = Uniform::new_inclusive(-bound, bound).expect("valid bounds");
            for x in buf {
                *x = uniform.sample(rng);
            }
        };
        for layer in &mut weights.layers {
            layer.norm_1_gamma.fill(1.0);
            layer.norm_2_gamma.fill(1.0);
            for (w, b) in [
                (&mut layer.query_w, &mut layer.query_b),
                (&mut layer.key_w, &mut layer.key_b),
                (&mut layer.value_w, &mut layer.value_b),
                (&mut layer.output_w, &mut layer.output_b),
                (&mut layer.inner_w, &mut layer.inner_b),
            ] {
                fill_uniform(w, d, &mut rng);
                fill_uniform(b, d, &mut rng);
            }
            fill_uniform(&mut layer.outer_w, f, &mut rng);
            fill_uniform(&mut layer.outer_b, f, &mut rng);
        }
        weights.final_norm_gamma.fill(1.0);
        fill_uniform(&mut weights.predictor_w, d, &mut rng);
        fill_uniform(&mut weights.predictor_b, d, &mut rng);
        weights
    }

    /// Every tensor with its canonical name, in file order.
    pub fn tensors(&self) -> Vec<(String, &[f32])> {
        let mut out: Vec<(String, &[f32])> = vec![("embedding.weight".into(), &self.embedding)];
        for (l, layer) in self.layers.iter().enumerate() {
            for (suffix, t) in layer.named() {
                out.push((format!("encoder.layers.{l}.{suffix}"), t));
            }
        }
        out.push(("final_norm.gamma".into(), &self.final_norm_gamma));
        out.push(("final_norm.beta".into(), &self.final_norm_beta));
        out.push(("predictor.weight".into(), &self.predictor_w));
        out.push(("predictor.bias".into(), &self.predictor_b));
        out
    }

    /// Mutable view of every tensor, in the same order as [`Weights::tensors`].
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        let mut out: Vec<(String, &mut Vec<f32>)> =
            vec![("embedding.weight".into(), &mut self.embedding)];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (suffix, t) in layer.named_mut() {
                out.push((format!("encoder.layers.{l}.{suffix}"), t));
            }
        }
        out.push(("final_norm.gamma".into(), &mut self.final_norm_gamma));
        out.push(("final_norm.beta".into(), &mut self.final_norm_beta));
        out.push(("predictor.weight".into(), &mut self.predictor_w));
        out.push(("predictor.bias".into(), &mut self.predictor_b));
        out
    }
}

impl LayerWeights {
    fn named(&self) -> [(&'static str, &[f32]); 16] {
        [
            ("norm_1.gamma", &self.norm_1_gamma),
            ("norm_1.beta", &self.norm_1_beta),
            ("attention.query.weight", &self.query_w),
            ("attention.query.bias", &self.query_b),
            ("attention.key.weight", &self.key_w),
            ("attention.key.bias", &self.key_b),
            ("attention.value.weight", &self.value_w),
            ("attention.value.bias", &self.value_b),
            ("attention.output.weight", &self.output_w),
            ("attention.output.bias", &self.output_b),
            ("norm_2.gamma", &self.norm_2_gamma),
            ("norm_2.beta", &self.norm_2_beta),
            ("pwff.linear_inner.weight", &self.inner_w),
            ("pwff.linear_inner.bias", &self.inner_b),
            ("pwff.linear_outer.weight", &self.outer_w),
            ("pwff.linear_outer.bias", &self.outer_b),
        ]
    }

    fn named_mut(&mut self) -> [(&'static str, &mut Vec<f32>); 16] {
        [
            ("norm_1.gamma", &mut self.norm_1_gamma),
            ("norm_1.beta", &mut self.norm_1_beta),
            ("attention.query.weight", &mut self.query_w),
            ("attention.query.bias", &mut self.query_b),
            ("attention.key.weight", &mut self.key_w),
            ("attention.key.bias", &mut self.key_b),
            ("attention.value.weight", &mut self.value_w),
            ("attention.value.bias", &mut self.value_b),
            ("attention.output.weight", &mut self.output_w),
            ("attention.output.bias", &mut self.output_b),
            ("norm_2.gamma", &mut self.norm_2_gamma),
            ("norm_2.beta", &mut self.norm_2_beta),
            ("pwff.linear_inner.weight", &mut self.inner_w),
            ("pwff.linear_inner.bias", &mut self.inner_b),
            ("pwff.linear_outer.weight", &mut self.outer_w),
            ("pwff.linear_outer.bias", &mut self.outer_b),
        ]
    }
}

fn visit_specs(config: &ModelConfig, mut emit: impl FnMut(String, Vec<usize>)) {
    let d = config.embedding_dim;
    let f = config.pwff_hidden_dim;
    let v = config.vocab_size;
    emit("embedding.weight".into(), vec![v, d]);
    for l in 0..config.num_layers {
        let p = format!("encoder.layers.{l}");
        emit(format!("{p}.norm_1.gamma"), vec![d]);
        emit(format!("{p}.norm_1.beta"), vec![d]);
        for name in ["query", "key", "value", "output"] {
            emit(format!("{p}.attention.{name}.weight"), vec![d, d]);
            emit(format!("{p}.attention.{name}.bias"), vec![d]);
        }
        emit(format!("{p}.norm_2.gamma"), vec![d]);
        emit(format!("{p}.norm_2.beta"), vec![d]);
        emit(format!("{p}.pwff.linear_inner.weight"), vec![d, f]);
        emit(format!("{p}.pwff.linear_inner.bias"), vec![f]);
        emit(format!("{p}.pwff.linear_outer.weight"), vec![f, d]);
        emit(format!("{p}.pwff.linear_outer.bias"), vec![d]);
    }
    emit("final_norm.gamma".into(), vec![d]);
    emit("final_norm.beta".into(), vec![d]);
    emit("predictor.weight".into(), vec![d, v]);
    emit("predictor.bias".into(), vec![v]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn specs_and_tensors_agree() {
        let config = Preset::Tiny.config();
        let weights = Weights::init(config, 1);
        let specs = Weights::specs(&config);
        let tensors = weights.tensors();
        assert_eq!(specs.len(), 16 * config.num_layers + 5);
        assert_eq!(specs.len(), tensors.len());
        for (spec, (name, data)) in specs.iter().zip(&tensors) {
            assert_eq!(&spec.name, name);
            assert_eq!(spec.len(), data.len(), "{name}");
        }
        let total: usize = specs.iter().map(TensorSpec::len).sum();
        assert_eq!(total as u64, config.parameter_count());
        assert_eq!(Weights::specs(&Preset::V1.config()).len(), 389);
    }

    #[test]
    fn init_is_deterministic() {
        let config = Preset::Tiny.config();
        assert_eq!(Weights::init(config, 5), Weights::init(config, 5));
        assert_ne!(Weights::init(config, 5), Weights::init(config, 6));
    }
}
