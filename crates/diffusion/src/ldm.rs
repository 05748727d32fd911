//! The original (LDM / lllyasviel) single-file layout, converted to diffusers names at load.
//!
//! Original ControlNet files (`control_v11p_sd15_canny.safetensors`, `.pth`) keep the model under
//! `control_model.` with the LDM UNet names (`input_blocks.N.M`, `middle_block.N`, `time_embed`)
//! plus `input_hint_block`, `zero_convs` and `middle_block_out`. They carry no config, so the
//! config is read off the tensor shapes; the one thing shapes cannot tell is the head count,
//! which follows the two families' conventions (SD 1.x: 8 heads; SD 2.x, recognisable by its
//! linear attention projections: 64-wide heads).
//!
//! Original SD checkpoints (`v1-5-pruned-emaonly.safetensors`) hold the VAE under
//! `first_stage_model.` (LDM names: `encoder.down.N.block.M`, `mid.attn_1` with 1×1-conv
//! q/k/v/proj_out, `norm_out`, …) and, for SD 1.x, the text encoder under
//! `cond_stage_model.transformer.` with transformers' names (with or without `text_model.`).
//! SD 2.x files keep an OpenCLIP model there (`cond_stage_model.model.*`, fused attention
//! projections), which is not supported: such models load from their diffusers folder.
use std::collections::{BTreeSet, HashMap};

use crate::clip::ClipTextConfig;
use crate::config::{ControlNetConfig, EncoderSpec, UNetConfig};
use crate::vae::VaeConfig;
use crate::weights::{StoredTensor, WeightFile};
use crate::{Error, Result};

const CONTROL_PREFIX: &str = "control_model.";
/// How errors name these layouts.
pub const ORIGINAL_CONTROLNET_LAYOUT: &str = "original ControlNet (`control_model.*` keys)";

pub fn is_original_controlnet(file: &WeightFile) -> bool {
    file.keys().iter().any(|k| k.starts_with(CONTROL_PREFIX))
}

/// LDM `ResBlock` inner names → diffusers `ResnetBlock2D` names.
fn resnet_inner(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|t| format!("{to}{t}")))
}

/// Splits `"{n}.{rest}"` into `(n, rest)`.
fn index_and_rest(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The diffusers name of an LDM UNet-encoder key (`time_embed`, `input_blocks`, `middle_block`),
/// for a UNet with `layers` resnets per down level.
pub fn unet_encoder_key(key: &str, layers: usize) -> Option<String> {
    if let Some(rest) = key.strip_prefix("time_embed.") {
        let (i, rest) = index_and_rest(rest)?;
        let linear = match i {
            0 => "linear_1",
            2 => "linear_2",
            _ => return None,
        };
        return Some(format!("time_embedding.{linear}.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (n, rest) = index_and_rest(rest)?;
        let (m, rest) = index_and_rest(rest)?;
        if n == 0 {
            return (m == 0).then(|| format!("conv_in.{rest}"));
        }
        let level = (n - 1) / (layers + 1);
        let j = (n - 1) % (layers + 1);
        if j == layers {
            let rest = rest.strip_prefix("op.")?;
            return (m == 0).then(|| format!("down_blocks.{level}.downsamplers.0.conv.{rest}"));
        }
        return match m {
            0 => Some(format!(
                "down_blocks.{level}.resnets.{j}.{}",
                resnet_inner(rest)?
            )),
            1 => Some(format!("down_blocks.{level}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (m, rest) = index_and_rest(rest)?;
        return match m {
            0 => Some(format!("mid_block.resnets.0.{}", resnet_inner(rest)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            2 => Some(format!("mid_block.resnets.1.{}", resnet_inner(rest)?)),
            _ => None,
        };
    }
    None
}

/// The diffusers name of a key of an original ControlNet file, without its `control_model.`.
fn controlnet_key(key: &str, layers: usize, n_hint_blocks: usize) -> Option<String> {
    if let Some(rest) = key.strip_prefix("input_hint_block.") {
        let (k, rest) = index_and_rest(rest)?;
        let name = if k == 0 {
            "conv_in".to_string()
        } else if k == 2 + 2 * n_hint_blocks {
            "conv_out".to_string()
        } else if k >= 2 && k % 2 == 0 {
            format!("blocks.{}", (k - 2) / 2)
        } else {
            return None;
        };
        return Some(format!("controlnet_cond_embedding.{name}.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("zero_convs.") {
        let (i, rest) = index_and_rest(rest)?;
        let rest = rest.strip_prefix("0.")?;
        return Some(format!("controlnet_down_blocks.{i}.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("middle_block_out.0.") {
        return Some(format!("controlnet_mid_block.{rest}"));
    }
    unet_encoder_key(key, layers)
}

/// The table diffusers name → stored key for an original ControlNet file.
pub fn controlnet_renames(
    file: &WeightFile,
    spec: &EncoderSpec,
) -> Result<HashMap<String, String>> {
    let layers = uniform_layers(spec)?;
    let n_hint_blocks = hint_indices(file).len().saturating_sub(2);
    let mut map = HashMap::new();
    for stored in file.keys() {
        let Some(key) = stored.strip_prefix(CONTROL_PREFIX) else {
            continue;
        };
        if let Some(name) = controlnet_key(key, layers, n_hint_blocks) {
            map.insert(name, stored.clone());
        }
    }
    Ok(map)
}

fn uniform_layers(spec: &EncoderSpec) -> Result<usize> {
    let layers = spec.blocks[0].layers;
    if spec.blocks.iter().any(|b| b.layers != layers) {
        return Err(Error::Config(
            "the original single-file layout needs the same layers_per_block on every level".into(),
        ));
    }
    Ok(layers)
}

/// Sorted indices `k` of the `input_hint_block.{k}.weight` convs.
fn hint_indices(file: &WeightFile) -> Vec<usize> {
    let set: BTreeSet<usize> = file
        .keys()
        .iter()
        .filter_map(|k| {
            let rest = k
                .strip_prefix(CONTROL_PREFIX)?
                .strip_prefix("input_hint_block.")?;
            let (i, rest) = index_and_rest(rest)?;
            (rest == "weight").then_some(i)
        })
        .collect();
    set.into_iter().collect()
}

/// Reads a tensor's stored shape under a key prefix, as an error naming the key if missing.
struct Shapes<'a> {
    file: &'a WeightFile,
    prefix: &'a str,
}

impl Shapes<'_> {
    fn get(&self, key: &str) -> Result<Vec<usize>> {
        let full = format!("{}{key}", self.prefix);
        self.file.stored_shape(&full).ok_or_else(|| {
            Error::Weights(format!(
                "{}: tensor `{full}` is missing",
                self.file.path().display()
            ))
        })
    }

    fn has(&self, key: &str) -> bool {
        self.file
            .stored_shape(&format!("{}{key}", self.prefix))
            .is_some()
    }
}

/// The encoder half of a diffusers config (the fields the UNet and the ControlNet share), read
/// off the LDM `input_blocks` under `prefix`.
fn infer_encoder_fields(
    file: &WeightFile,
    prefix: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = file.path().display().to_string();
    let shapes = Shapes { file, prefix };
    let in_channels = shapes.get("input_blocks.0.0.weight")?[1];
    // Input block indices that are downsamplers, in order: they end every level but the last.
    let mut input_indices = BTreeSet::new();
    let mut downsamplers = BTreeSet::new();
    for k in file.keys() {
        let Some(rest) = k
            .strip_prefix(prefix)
            .and_then(|k| k.strip_prefix("input_blocks."))
        else {
            continue;
        };
        if let Some((n, rest)) = index_and_rest(rest) {
            input_indices.insert(n);
            if rest.starts_with("0.op.") {
                downsamplers.insert(n);
            }
        }
    }
    let n_inputs = input_indices.len();
    let layers = match downsamplers.first() {
        Some(&first) => first - 1,
        None => n_inputs - 1,
    };
    let n_levels = downsamplers.len() + 1;
    if layers == 0 || 1 + n_levels * (layers + 1) - 1 != n_inputs {
        return Err(Error::Weights(format!(
            "{path}: cannot read the block layout off {n_inputs} input blocks and {} downsamplers",
            downsamplers.len()
        )));
    }
    let mut channels = Vec::new();
    let mut down_types = Vec::new();
    let mut cross = 0;
    let mut depth = 1;
    let mut linear = false;
    for level in 0..n_levels {
        let n = 1 + level * (layers + 1);
        channels.push(shapes.get(&format!("input_blocks.{n}.0.out_layers.3.weight"))?[0]);
        let attn = format!("input_blocks.{n}.1.");
        if shapes.has(&format!("{attn}proj_in.weight")) {
            down_types.push("CrossAttnDownBlock2D");
            linear = shapes.get(&format!("{attn}proj_in.weight"))?.len() == 2;
            cross = shapes.get(&format!("{attn}transformer_blocks.0.attn2.to_k.weight"))?[1];
            depth = (0..)
                .take_while(|t| shapes.has(&format!("{attn}transformer_blocks.{t}.norm1.weight")))
                .count();
        } else {
            down_types.push("DownBlock2D");
        }
    }
    if cross == 0 {
        return Err(Error::Weights(format!(
            "{path}: no cross-attention found in the input blocks under `{prefix}`"
        )));
    }
    // SD 1.x: 8 heads everywhere; SD 2.x (linear projections): 64-wide heads.
    let heads: Vec<usize> = channels
        .iter()
        .map(|c| if linear { (c / 64).max(1) } else { 8 })
        .collect();
    let fields = serde_json::json!({
        "in_channels": in_channels,
        "down_block_types": down_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        "upcast_attention": linear,
    });
    match fields {
        serde_json::Value::Object(map) => Ok(map),
        _ => unreachable!("a JSON object literal"),
    }
}

/// Reads a ControlNet config off an original-layout file's tensor shapes. `name` (the file
/// stem) tells the one thing shapes cannot: shuffle models pool their residuals globally, which
/// A1111 also recognises by name.
pub fn infer_controlnet_config(file: &WeightFile, name: &str) -> Result<ControlNetConfig> {
    let path = file.path().display().to_string();
    let shapes = Shapes {
        file,
        prefix: CONTROL_PREFIX,
    };
    let mut fields = infer_encoder_fields(file, CONTROL_PREFIX)?;
    let hint = hint_indices(file);
    if hint.len() < 2 {
        return Err(Error::Weights(format!(
            "{path}: no input_hint_block convs found"
        )));
    }
    let conv_in = shapes.get("input_hint_block.0.weight")?;
    let mut hint_channels = vec![conv_in[0]];
    // Blocks come in pairs (same width, then stride-2 to the next width).
    for pair in hint[1..hint.len() - 1].chunks(2) {
        if let [_, second] = pair {
            hint_channels.push(shapes.get(&format!("input_hint_block.{second}.weight"))?[0]);
        }
    }
    fields.insert("conditioning_channels".into(), conv_in[1].into());
    fields.insert(
        "conditioning_embedding_out_channels".into(),
        hint_channels.into(),
    );
    fields.insert(
        "global_pool_conditions".into(),
        name.to_ascii_lowercase().contains("shuffle").into(),
    );
    serde_json::from_value(fields.into()).map_err(|e| Error::Config(format!("{path}: {e}")))
}

/// Where the UNet lives in an original single-file SD checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// Reads a UNet config off a single-file SD checkpoint's shapes (`model.diffusion_model.*`).
pub fn infer_unet_config(file: &WeightFile) -> Result<UNetConfig> {
    let path = file.path().display().to_string();
    let shapes = Shapes {
        file,
        prefix: UNET_PREFIX,
    };
    let mut fields = infer_encoder_fields(file, UNET_PREFIX)?;
    let down: Vec<String> = serde_json::from_value(fields["down_block_types"].clone())
        .map_err(|e| Error::Config(e.to_string()))?;
    let up: Vec<&str> = down
        .iter()
        .rev()
        .map(|t| match t.as_str() {
            "CrossAttnDownBlock2D" => "CrossAttnUpBlock2D",
            _ => "UpBlock2D",
        })
        .collect();
    fields.insert("up_block_types".into(), up.into());
    fields.insert("out_channels".into(), shapes.get("out.2.weight")?[0].into());
    serde_json::from_value(fields.into()).map_err(|e| Error::Config(format!("{path}: {e}")))
}

/// The diffusers name of an LDM UNet key (whole model), `layers` resnets per down level.
fn unet_key(key: &str, layers: usize) -> Option<String> {
    if let Some(rest) = key.strip_prefix("out.") {
        let (i, rest) = index_and_rest(rest)?;
        return match i {
            0 => Some(format!("conv_norm_out.{rest}")),
            2 => Some(format!("conv_out.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        // Up level b eats `layers + 1` output blocks; the upsampler sits in the last one, after
        // the resnet (and the transformer where the level has one).
        let (n, rest) = index_and_rest(rest)?;
        let (m, rest) = index_and_rest(rest)?;
        let (level, j) = (n / (layers + 1), n % (layers + 1));
        return match (m, rest.strip_prefix("conv.")) {
            (0, _) => Some(format!(
                "up_blocks.{level}.resnets.{j}.{}",
                resnet_inner(rest)?
            )),
            (1 | 2, Some(conv)) => Some(format!("up_blocks.{level}.upsamplers.0.conv.{conv}")),
            (1, None) => Some(format!("up_blocks.{level}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    unet_encoder_key(key, layers)
}

/// The table diffusers name → stored key for the UNet of a single-file SD checkpoint.
pub fn unet_renames(file: &WeightFile, spec: &EncoderSpec) -> Result<HashMap<String, String>> {
    let layers = uniform_layers(spec)?;
    Ok(file
        .keys()
        .into_iter()
        .filter_map(|stored| {
            let name = unet_key(stored.strip_prefix(UNET_PREFIX)?, layers)?;
            Some((name, stored))
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Original SD checkpoints: VAE and SD 1.x text encoder.

/// How errors name this layout.
pub const ORIGINAL_SD_LAYOUT: &str =
    "original SD single file (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` keys)";
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// Whether the file is an original SD checkpoint (UNet, VAE and text encoder in one file).
pub fn is_original_sd_checkpoint(file: &WeightFile) -> bool {
    file.keys().iter().any(|k| {
        [
            "model.diffusion_model.",
            "first_stage_model.",
            "cond_stage_model.",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    })
}

/// The table diffusers name (as [`crate::clip::ClipTextModel`] reads it, without `text_model.`)
/// → stored key for the SD 1.x text encoder of an original checkpoint.
pub fn clip_renames(file: &WeightFile) -> Result<HashMap<String, String>> {
    let keys = file.keys();
    if keys.iter().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
        return Err(Error::Weights(format!(
            "{}: the text encoder is an OpenCLIP model (`{OPEN_CLIP_PREFIX}*`, an SD 2.x \
             checkpoint); single-file SD 2.x text encoders are not supported, load the model's \
             diffusers folder instead",
            file.path().display()
        )));
    }
    let map: HashMap<String, String> = keys
        .iter()
        .filter_map(|stored| {
            let rest = stored.strip_prefix(CLIP_PREFIX)?;
            let name = rest.strip_prefix("text_model.").unwrap_or(rest);
            Some((name.to_string(), stored.clone()))
        })
        .collect();
    if map.is_empty() {
        return Err(Error::Weights(format!(
            "{}: no SD 1.x text encoder (`{CLIP_PREFIX}*` keys) in this file",
            file.path().display()
        )));
    }
    Ok(map)
}

/// Reads the text encoder's config off an original SD 1.x checkpoint. Shapes give every size
/// but the head count, which follows CLIP's 64-wide heads (12 for SD 1.x's 768 wide model);
/// the activation is OpenAI CLIP's `quick_gelu`.
pub fn infer_clip_config(file: &WeightFile) -> Result<ClipTextConfig> {
    let renames = clip_renames(file)?;
    let path = file.path().display().to_string();
    let shape = |name: &str| -> Result<Vec<usize>> {
        renames
            .get(name)
            .and_then(|k| file.stored_shape(k))
            .ok_or_else(|| {
                Error::Weights(format!(
                    "{path}: tensor `{name}` of the text encoder is missing ({ORIGINAL_SD_LAYOUT})"
                ))
            })
    };
    let token = shape("embeddings.token_embedding.weight")?;
    let positions = shape("embeddings.position_embedding.weight")?;
    let fc1 = shape("encoder.layers.0.mlp.fc1.weight")?;
    let layers = (0..)
        .take_while(|i| renames.contains_key(&format!("encoder.layers.{i}.mlp.fc1.weight")))
        .count();
    let hidden = token[1];
    Ok(ClipTextConfig {
        vocab_size: token[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: positions[0],
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
    })
}

/// Where the VAE's keys start: `first_stage_model.` (SD checkpoints), `vae.`, or nothing (a
/// standalone LDM VAE file such as `vae-ft-mse-840000-ema-pruned.safetensors`).
fn vae_prefix(file: &WeightFile) -> Result<&'static str> {
    let keys = file.keys();
    for prefix in VAE_PREFIXES {
        if keys.iter().any(|k| k.starts_with(prefix)) {
            return Ok(prefix);
        }
    }
    if file.stored_shape("encoder.conv_in.weight").is_some() {
        return Ok("");
    }
    Err(Error::Weights(format!(
        "{}: no VAE (`first_stage_model.*` or `encoder.*` / `decoder.*` keys) in this file",
        file.path().display()
    )))
}

/// LDM VAE resnet inner names → diffusers `ResnetBlock2D` names.
fn vae_resnet_inner(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(t) => format!("conv_shortcut.{t}"),
        None => rest.to_string(),
    }
}

/// The diffusers name of an LDM VAE key (without its prefix) for a VAE with `n_levels` levels,
/// and whether the tensor is a 1×1 conv kernel that diffusers stores as a linear weight.
pub fn vae_key(key: &str, n_levels: usize) -> Option<(String, bool)> {
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some((key.to_string(), false));
    }
    let (part, rest) = key.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let plain = |name: String| Some((format!("{part}.{name}"), false));
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(rest.to_string());
    }
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return plain(format!("conv_norm_out.{t}"));
    }
    if let Some(t) = rest.strip_prefix("mid.attn_1.") {
        const MAP: [(&str, &str); 5] = [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ];
        let (old, new) = MAP.iter().find(|(old, _)| t.starts_with(old))?;
        let tail = &t[old.len()..];
        let conv = *old != "norm." && tail == "weight";
        return Some((format!("{part}.mid_block.attentions.0.{new}{tail}"), conv));
    }
    if let Some(t) = rest.strip_prefix("mid.block_") {
        let (k, inner) = index_and_rest(t)?;
        return (k == 1 || k == 2).then(|| {
            (
                format!(
                    "{part}.mid_block.resnets.{}.{}",
                    k - 1,
                    vae_resnet_inner(inner)
                ),
                false,
            )
        });
    }
    // down.{i} (encoder) and up.{b} (decoder, numbered bottom-up: diffusers' up_blocks.{n-1-b}).
    let (kind, t) = if part == "encoder" {
        ("down", rest.strip_prefix("down.")?)
    } else {
        ("up", rest.strip_prefix("up.")?)
    };
    let (i, t) = index_and_rest(t)?;
    if i >= n_levels {
        return None;
    }
    let level = if kind == "up" { n_levels - 1 - i } else { i };
    if let Some(t) = t.strip_prefix("block.") {
        let (j, inner) = index_and_rest(t)?;
        return plain(format!(
            "{kind}_blocks.{level}.resnets.{j}.{}",
            vae_resnet_inner(inner)
        ));
    }
    let resample = if kind == "up" {
        "upsample"
    } else {
        "downsample"
    };
    let t = t.strip_prefix(resample)?.strip_prefix(".conv.")?;
    plain(format!("{kind}_blocks.{level}.{resample}rs.0.conv.{t}"))
}

/// The table diffusers name → stored tensor for the VAE of an original checkpoint (or a
/// standalone LDM VAE file).
pub fn vae_layout(file: &WeightFile, config: &VaeConfig) -> Result<HashMap<String, StoredTensor>> {
    let prefix = vae_prefix(file)?;
    let n_levels = config.block_out_channels.len();
    let mut table = HashMap::new();
    for stored in file.keys() {
        let Some(key) = stored.strip_prefix(prefix) else {
            continue;
        };
        if let Some((name, conv_as_linear)) = vae_key(key, n_levels) {
            table.insert(
                name,
                StoredTensor {
                    key: stored.clone(),
                    conv_as_linear,
                },
            );
        }
    }
    Ok(table)
}

/// Reads a VAE config off an original checkpoint's tensor shapes. Shapes give every size but
/// the norm group count (SD's 32) and the scaling factor (SD 1.x / 2.x's 0.18215).
pub fn infer_vae_config(file: &WeightFile) -> Result<VaeConfig> {
    let prefix = vae_prefix(file)?;
    let path = file.path().display().to_string();
    let has = |key: &str| file.stored_shape(&format!("{prefix}{key}")).is_some();
    let shape = |key: &str| -> Result<Vec<usize>> {
        file.stored_shape(&format!("{prefix}{key}"))
            .ok_or_else(|| Error::Weights(format!("{path}: tensor `{prefix}{key}` is missing")))
    };
    let channels: Vec<usize> = (0..)
        .map_while(|i| file.stored_shape(&format!("{prefix}encoder.down.{i}.block.0.conv1.weight")))
        .map(|s| s[0])
        .collect();
    if channels.is_empty() {
        return Err(Error::Weights(format!(
            "{path}: no `{prefix}encoder.down.0.block.0.conv1.weight`: not an LDM VAE"
        )));
    }
    let layers = (0..)
        .take_while(|j| has(&format!("encoder.down.0.block.{j}.conv1.weight")))
        .count();
    let n = channels.len();
    let config = serde_json::json!({
        "in_channels": shape("encoder.conv_in.weight")?[1],
        "out_channels": shape("decoder.conv_out.weight")?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.weight")?[1],
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": has("quant_conv.weight"),
        "use_post_quant_conv": has("post_quant_conv.weight"),
        "mid_block_add_attention": has("encoder.mid.attn_1.q.weight"),
    });
    serde_json::from_value(config).map_err(|e| Error::Config(format!("{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_vae_names() {
        // SD's VAE: 4 levels; LDM numbers the decoder's levels bottom-up.
        let k = |s| vae_key(s, 4);
        let plain = |s: &str| Some((s.to_string(), false));
        assert_eq!(
            k("encoder.down.1.block.0.nin_shortcut.weight"),
            plain("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            k("encoder.down.2.downsample.conv.bias"),
            plain("encoder.down_blocks.2.downsamplers.0.conv.bias")
        );
        assert_eq!(
            k("decoder.up.3.block.2.conv1.weight"),
            plain("decoder.up_blocks.0.resnets.2.conv1.weight")
        );
        assert_eq!(
            k("decoder.up.1.upsample.conv.weight"),
            plain("decoder.up_blocks.2.upsamplers.0.conv.weight")
        );
        assert_eq!(
            k("decoder.mid.block_2.norm2.bias"),
            plain("decoder.mid_block.resnets.1.norm2.bias")
        );
        assert_eq!(
            k("encoder.mid.attn_1.proj_out.weight"),
            Some((
                "encoder.mid_block.attentions.0.to_out.0.weight".into(),
                true
            ))
        );
        assert_eq!(
            k("encoder.mid.attn_1.q.bias"),
            plain("encoder.mid_block.attentions.0.to_q.bias")
        );
        assert_eq!(
            k("encoder.mid.attn_1.norm.weight"),
            plain("encoder.mid_block.attentions.0.group_norm.weight")
        );
        assert_eq!(
            k("decoder.norm_out.weight"),
            plain("decoder.conv_norm_out.weight")
        );
        assert_eq!(k("post_quant_conv.bias"), plain("post_quant_conv.bias"));
        assert_eq!(k("encoder.down.4.block.0.conv1.weight"), None);
        assert_eq!(k("loss.discriminator.main.0.weight"), None);
    }

    #[test]
    fn sd15_input_block_numbering() {
        // SD 1.5: 2 resnets per level, so input_blocks 1,2 | 3 (down) | 4,5 | 6 | 7,8 | 9 | 10,11.
        let k = |s| unet_encoder_key(s, 2);
        assert_eq!(k("input_blocks.0.0.weight").unwrap(), "conv_in.weight");
        assert_eq!(
            k("input_blocks.2.0.in_layers.2.weight").unwrap(),
            "down_blocks.0.resnets.1.conv1.weight"
        );
        assert_eq!(
            k("input_blocks.4.1.proj_in.bias").unwrap(),
            "down_blocks.1.attentions.0.proj_in.bias"
        );
        assert_eq!(
            k("input_blocks.9.0.op.weight").unwrap(),
            "down_blocks.2.downsamplers.0.conv.weight"
        );
        assert_eq!(
            k("input_blocks.11.0.skip_connection.bias"),
            Some("down_blocks.3.resnets.1.conv_shortcut.bias".into())
        );
        assert_eq!(
            k("middle_block.2.emb_layers.1.weight").unwrap(),
            "mid_block.resnets.1.time_emb_proj.weight"
        );
        assert_eq!(
            k("time_embed.2.bias").unwrap(),
            "time_embedding.linear_2.bias"
        );
        assert_eq!(k("out.0.weight"), None);
    }

    #[test]
    fn sd15_output_block_numbering() {
        // SD 1.5 up path: output_blocks 0-2 (1280, no attention, upsampler in 2 at `.1`),
        // 3-5 | 6-8 | 9-11 with attention, upsamplers at `.2` in 5 and 8.
        let k = |s| unet_key(s, 2);
        assert_eq!(
            k("output_blocks.2.1.conv.weight").unwrap(),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            k("output_blocks.5.2.conv.bias").unwrap(),
            "up_blocks.1.upsamplers.0.conv.bias"
        );
        assert_eq!(
            k("output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight").unwrap(),
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(
            k("output_blocks.11.0.skip_connection.weight").unwrap(),
            "up_blocks.3.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(k("out.0.weight").unwrap(), "conv_norm_out.weight");
        assert_eq!(k("out.2.bias").unwrap(), "conv_out.bias");
        assert_eq!(k("input_blocks.0.0.bias").unwrap(), "conv_in.bias");
    }

    #[test]
    fn controlnet_specific_keys() {
        // The standard hint encoder: convs at 0, 2, ..., 12 and the zero conv_out at 14.
        let k = |s| controlnet_key(s, 2, 6);
        assert_eq!(
            k("input_hint_block.0.weight").unwrap(),
            "controlnet_cond_embedding.conv_in.weight"
        );
        assert_eq!(
            k("input_hint_block.12.bias").unwrap(),
            "controlnet_cond_embedding.blocks.5.bias"
        );
        assert_eq!(
            k("input_hint_block.14.weight").unwrap(),
            "controlnet_cond_embedding.conv_out.weight"
        );
        assert_eq!(
            k("zero_convs.11.0.weight").unwrap(),
            "controlnet_down_blocks.11.weight"
        );
        assert_eq!(
            k("middle_block_out.0.bias").unwrap(),
            "controlnet_mid_block.bias"
        );
        assert_eq!(k("input_hint_block.1.weight"), None);
    }
}
