//! Formula weights: every annotator network filled with values that are a pure function of
//! (tensor name, index), computed the same way here and in `tools/parity/neural/formula.py`.
//!
//! Real annotator weights cannot be downloaded where the tests run, so the parity fixtures hold
//! only inputs and the reference's outputs; both sides regenerate the weights from this formula.
//! The tests also write these weights into real `.pth` containers and load them back through
//! the same loader users' files go through.
//!
//! For tensor `key` (its name in the reference's `state_dict`, without `module.` prefixes) and
//! flat index `i`:
//!
//! ```text
//! x = splitmix64(fnv1a64(key) + i * 0x9E3779B97F4A7C15)        (wrapping u64 arithmetic)
//! u = (x >> 40) * 2^-23 - 1                                     (in [-1, 1), 24 bits)
//! v = 1 + 0.25 u         for `*running_var`
//!     0.1 u              for `*running_mean`
//!     1 + 0.1 u          for other tensors of rank ≤ 1 named `*weight` (norm scales)
//!     0.1 u              for other tensors of rank ≤ 1 (biases)
//!     u sqrt(6 / fan_in) otherwise (fan_in = product of the dims after the first)
//! value = f16(v) as f32   (rounded to nearest even, so f16 files hold the same values)
//! ```
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// SplitMix64's output function applied to `z` (after its increment).
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The values of tensor `key` with `shape`, row-major.
pub fn values(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let h = fnv1a64(key.as_bytes());
    let rank1 = shape.len() <= 1;
    let fan_in: usize = shape.iter().skip(1).product();
    let (offset, scale) = if key.ends_with("running_var") {
        (1.0, 0.25)
    } else if key.ends_with("running_mean") {
        (0.0, 0.1)
    } else if rank1 && key.ends_with("weight") {
        (1.0, 0.1)
    } else if rank1 {
        (0.0, 0.1)
    } else {
        (0.0, (6.0 / fan_in.max(1) as f64).sqrt())
    };
    (0..n as u64)
        .map(|i| {
            let x = splitmix64(h.wrapping_add(i.wrapping_mul(0x9E3779B97F4A7C15)));
            let u = (x >> 40) as f64 * (2.0f64).powi(-23) - 1.0;
            f16_nearest(offset + scale * u)
        })
        .collect()
}

/// `v` rounded once to the nearest f16 (ties to even), as f32. Not `half::f16::from_f64`: on
/// x86 with F16C that converts through f32, rounding twice, and about one value in 16 000 then
/// lands one f16 step away from numpy's (single) rounding.
pub fn f16_nearest(v: f64) -> f32 {
    let mag = v.abs();
    let a = half::f16::from_f32(mag as f32).to_bits();
    let best = [a.saturating_sub(1), a, a.saturating_add(1)]
        .into_iter()
        .min_by(|&p, &q| {
            let dp = (half::f16::from_bits(p).to_f64() - mag).abs();
            let dq = (half::f16::from_bits(q).to_f64() - mag).abs();
            dp.total_cmp(&dq).then((p & 1).cmp(&(q & 1)))
        })
        .expect("three candidates");
    let r = half::f16::from_bits(best).to_f32();
    if v < 0.0 {
        -r
    } else {
        r
    }
}

/// A `VarBuilder` source that answers every request with [`values`] for the requested name and
/// shape (names are the `VarBuilder` paths, which the networks keep equal to the reference's
/// `state_dict` keys).
pub struct FormulaWeights;

impl FormulaWeights {
    pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(FormulaWeights), dtype, device.clone())
    }
}

impl SimpleBackend for FormulaWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let v = values(name, shape.dims());
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("formula weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Every tensor `network` reads (in its default architecture), as (name, shape), in the order
/// it reads them, each once: the network is built once on formula weights, recording what it
/// asks for. These are the reference's state-dict keys.
pub fn shapes(network: crate::Network) -> crate::Result<Vec<(String, Vec<usize>)>> {
    shapes_of(|vb| network.build(vb).map(drop))
}

/// The tensors `build` reads (name, shape), in order, each once.
pub fn shapes_of(
    build: impl FnOnce(VarBuilder<'static>) -> crate::Result<()>,
) -> crate::Result<Vec<(String, Vec<usize>)>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Recording { seen: seen.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    build(vb)?;
    let names: Vec<(String, Vec<usize>)> = seen.lock().expect("not poisoned").clone();
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (name, shape) in names {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, shape));
        }
    }
    Ok(out)
}

/// One state-dict entry: name, shape, values (row-major).
pub type Entry = (String, Vec<usize>, Vec<f32>);

/// [`shapes`] with each tensor's formula values: the reference's state dict.
pub fn state_dict(network: crate::Network) -> crate::Result<Vec<Entry>> {
    Ok(shapes(network)?
        .into_iter()
        .map(|(name, shape)| {
            let v = values(&name, &shape);
            (name, shape, v)
        })
        .collect())
}

/// Writes `network`'s formula state dict as a `.safetensors` file (f32) at `path`.
pub fn write_safetensors(network: crate::Network, path: &std::path::Path) -> crate::Result<()> {
    save_shapes(shapes(network)?, path)
}

/// Writes the formula values of tensors `shapes` as a `.safetensors` file (f32) at `path`.
pub fn save_shapes(shapes: Vec<(String, Vec<usize>)>, path: &std::path::Path) -> crate::Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in shapes {
        let v = values(&name, &shape);
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// OpenPose's three state dicts (body, hand, face), each as its own file holds it: the three
/// networks share key names (`conv1_1.weight`, …), so they cannot be one state dict.
pub fn openpose_shapes() -> crate::Result<[Vec<(String, Vec<usize>)>; 3]> {
    use crate::openpose::{body::BodyNet, face::FaceNet, hand::HandNet};
    Ok([
        shapes_of(|vb| BodyNet::new(vb).map(drop))?,
        shapes_of(|vb| HandNet::new(vb).map(drop))?,
        shapes_of(|vb| FaceNet::new(vb).map(drop))?,
    ])
}

/// `config.json` of the SegFormer [`crate::Network::default_architecture`] (MiT-b0, the 150
/// ADE20K classes), as the hub's `nvidia/segformer-b0-finetuned-ade-512-512` has it (the
/// fields the loader reads).
pub const SEGFORMER_B0_CONFIG: &str = r#"{
  "model_type": "segformer",
  "num_channels": 3,
  "num_encoder_blocks": 4,
  "depths": [2, 2, 2, 2],
  "sr_ratios": [8, 4, 2, 1],
  "hidden_sizes": [32, 64, 160, 256],
  "patch_sizes": [7, 3, 3, 3],
  "strides": [4, 2, 2, 2],
  "num_attention_heads": [1, 2, 5, 8],
  "mlp_ratios": [4, 4, 4, 4],
  "hidden_act": "gelu",
  "decoder_hidden_size": 256,
  "reshape_last_stage": true,
  "num_labels": 150
}
"#;

/// Writes `network`'s formula weights (f32 `.safetensors`, [`crate::Network::default_architecture`])
/// into `folder` where [`crate::Network::find_file`] finds them — the usual name with the
/// `.safetensors` extension; `depth_anything_v2_vits.safetensors`; `segformer/model.safetensors`
/// with its `config.json`; OpenPose's three files — and returns the path it is loaded from.
pub fn write_into_folder(
    network: crate::Network,
    folder: &std::path::Path,
) -> crate::Result<std::path::PathBuf> {
    let path = match network {
        crate::Network::DepthAnythingV2 => folder.join("depth_anything_v2_vits.safetensors"),
        crate::Network::Segformer => {
            let dir = folder.join("segformer");
            let io = |source| diffusion::Error::Io {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(io)?;
            std::fs::write(dir.join("config.json"), SEGFORMER_B0_CONFIG).map_err(io)?;
            dir.join("model.safetensors")
        }
        crate::Network::Openpose => {
            let [body, hand, face] = openpose_shapes()?;
            for (shapes, name) in [(hand, "hand_pose_model"), (face, "facenet")] {
                save_shapes(shapes, &folder.join(name).with_extension("safetensors"))?;
            }
            let path = folder.join("body_pose_model.safetensors");
            save_shapes(body, &path)?;
            return Ok(path);
        }
        _ => folder
            .join(network.file_name())
            .with_extension("safetensors"),
    };
    write_safetensors(network, &path)?;
    Ok(path)
}

struct Recording {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .expect("not poisoned")
            .push((name.to_string(), shape.dims().to_vec()));
        FormulaWeights.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("formula weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: `tools/parity/neural/formula.py` prints the same (run it with `--check`).
    #[test]
    fn formula_is_pinned() {
        let w = values("block1.convs.0.weight", &[2, 3, 1, 1]);
        let b = values("block1.convs.0.bias", &[2]);
        let g = values("bn.weight", &[2]);
        let v = values("bn.running_var", &[2]);
        let all: Vec<f32> = [w, b, g, v].concat();
        let bits: Vec<String> = all.iter().map(|x| format!("{x:.8}")).collect();
        assert_eq!(bits.join(","), PINNED);
    }

    /// A large tensor, where double rounding would show (one value in ~16 000): the sum of the
    /// f16 bit patterns equals `formula.py --check`'s.
    #[test]
    fn large_tensor_matches_numpys_rounding() {
        let v = values(
            "model.model.1.model.3.model.3.model.3.model.1.weight",
            &[512, 512, 4, 4],
        );
        let sum: u64 = v
            .iter()
            .map(|x| half::f16::from_f32(*x).to_bits() as u64)
            .sum();
        assert_eq!(sum, PINNED_LARGE_BITS_SUM);
    }

    const PINNED_LARGE_BITS_SUM: u64 = 104395980989;

    const PINNED: &str = "-1.13867188,-0.51220703,1.05761719,-0.54150391,-0.21337891,1.06640625,0.03448486,-0.06835938,1.01562500,0.96923828,1.18066406,0.93212891";
}
