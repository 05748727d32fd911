//! The A1111 API's request and answer types (as the OpenAPI document shows them).
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// An integer or a name (A1111 accepts both for modes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum IndexOrName {
    Index(i64),
    Name(String),
}

/// A unit's image: base64, or `{image, mask}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UnitImage {
    Base64(String),
    WithMask {
        image: String,
        #[serde(default)]
        mask: Option<String>,
    },
}

impl UnitImage {
    pub fn data(&self) -> &str {
        match self {
            UnitImage::Base64(s) => s,
            UnitImage::WithMask { image, .. } => image,
        }
    }
}

/// One ControlNet extension unit (`alwayson_scripts.controlnet.args[i]`). Fields not listed are
/// accepted and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ControlNetUnit {
    pub enabled: bool,
    /// `none`, or a preprocessor (see `GET /controlnet/module_list`).
    pub module: String,
    /// An adapter (see `GET /controlnet/model_list`); `None` or empty skips the unit.
    pub model: Option<String>,
    pub weight: f64,
    pub image: Option<UnitImage>,
    /// Legacy name of `image`.
    pub input_image: Option<UnitImage>,
    /// "Just Resize", "Crop and Resize", "Resize and Fill" or 0, 1, 2.
    pub resize_mode: Option<IndexOrName>,
    /// −1: the module's default.
    pub processor_res: f64,
    /// The module's first parameter; −1: its default.
    pub threshold_a: f64,
    /// The module's second parameter; −1: its default.
    pub threshold_b: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// "Balanced", "My prompt is more important", "ControlNet is more important" or 0, 1, 2.
    pub control_mode: Option<IndexOrName>,
    /// processor_res = the shorter side of the generation size.
    pub pixel_perfect: bool,
    /// Append this unit's detected map to the images (when its module is not `none`).
    pub save_detected_map: bool,
}

impl Default for ControlNetUnit {
    fn default() -> Self {
        Self {
            enabled: true,
            module: "none".into(),
            model: None,
            weight: 1.0,
            image: None,
            input_image: None,
            resize_mode: None,
            processor_res: -1.0,
            threshold_a: -1.0,
            threshold_b: -1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            control_mode: None,
            pixel_perfect: false,
            save_detected_map: true,
        }
    }
}

/// `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img` (the `init_images`, `denoising_strength`,
/// `mask`, `resize_mode` and `inpainting_mask_invert` fields are img2img's). Fields not listed
/// are accepted and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct A1111Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    /// −1: random.
    pub seed: i64,
    /// Euler, Euler a, DDIM, DPM++ 2M, DPM++ 2M Karras or UniPC.
    pub sampler_name: Option<String>,
    /// Older name of `sampler_name`.
    pub sampler_index: Option<String>,
    /// Automatic or Karras.
    pub scheduler: Option<String>,
    pub batch_size: usize,
    pub n_iter: usize,
    /// A1111's clip skip: 1 = none.
    pub clip_skip: Option<usize>,
    /// DDIM's eta.
    pub eta: Option<f64>,
    /// False: no images in the answer.
    pub send_images: bool,
    /// `sd_model_checkpoint` (the base model) and `CLIP_stop_at_last_layers` are read.
    #[schema(value_type = Object)]
    pub override_settings: BTreeMap<String, Value>,
    /// `controlnet` (any case): `{args: [ControlNetUnit...]}`; other scripts are ignored.
    #[schema(value_type = Object)]
    pub alwayson_scripts: BTreeMap<String, Value>,
    /// img2img: base64 images; the first is used.
    pub init_images: Vec<String>,
    /// img2img: how much to repaint, (0, 1].
    pub denoising_strength: f64,
    /// img2img: inpainting mask, white = repaint.
    pub mask: Option<String>,
    /// img2img: 1 inverts the mask.
    pub inpainting_mask_invert: i64,
    /// img2img: 0 just resize, 1 crop and resize, 2 resize and fill.
    pub resize_mode: Option<IndexOrName>,
}

impl Default for A1111Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            seed: -1,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            clip_skip: None,
            eta: None,
            send_images: true,
            override_settings: BTreeMap::new(),
            alwayson_scripts: BTreeMap::new(),
            init_images: Vec::new(),
            denoising_strength: 0.75,
            mask: None,
            inpainting_mask_invert: 0,
            resize_mode: None,
        }
    }
}

/// The answer of txt2img / img2img.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct A1111Response {
    /// Base64 PNGs: the generated images, then the detected maps.
    pub images: Vec<String>,
    /// The request as sent.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON document as a string: seed, all_seeds, prompt, infotexts, ...
    pub info: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SdModel {
    pub title: String,
    pub model_name: String,
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sampler {
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionBody {
    pub version: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub model_list: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Slider {
    pub name: String,
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub step: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModuleDetail {
    /// A1111: usable without a ControlNet model. False for all of ours.
    pub model_free: bool,
    /// The resolution slider (if any), then threshold_a's and threshold_b's.
    pub sliders: Vec<Slider>,
    /// Ours, not A1111's: runs here now (weight-free, or its weights are in the folder).
    pub available: bool,
    /// Ours, not A1111's: annotator weight files it needs that are not in the folder.
    pub missing_weights: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModuleList {
    pub module_list: Vec<String>,
    pub module_detail: BTreeMap<String, ModuleDetail>,
}

/// `POST /controlnet/detect`. Fields not listed are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct A1111DetectRequest {
    pub controlnet_module: String,
    /// Base64 images (webuiapi calls this `controlnet_images`).
    #[serde(alias = "controlnet_images")]
    pub controlnet_input_images: Vec<String>,
    /// −1: the module's default.
    pub controlnet_processor_res: f64,
    /// −1: the module's default.
    pub controlnet_threshold_a: f64,
    /// −1: the module's default.
    pub controlnet_threshold_b: f64,
}

impl Default for A1111DetectRequest {
    fn default() -> Self {
        Self {
            controlnet_module: "none".into(),
            controlnet_input_images: Vec::new(),
            controlnet_processor_res: -1.0,
            controlnet_threshold_a: -1.0,
            controlnet_threshold_b: -1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct A1111DetectResponse {
    /// The detected maps, PNG base64, one per input image.
    pub images: Vec<String>,
    /// For the OpenPose modules, as the extension answers: one OpenPose JSON per image (see
    /// the native `DetectResponse.pose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub poses: Option<Vec<Option<serde_json::Value>>>,
    /// "Success".
    pub info: String,
}
