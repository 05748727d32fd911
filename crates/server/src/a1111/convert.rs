//! An A1111 request turned into a native one: samplers, adapters named by A1111 model titles,
//! modes given as indices or names, ControlNet units into controls.
use serde_json::Value;
use std::collections::BTreeMap;

use super::fields::UnitField;
use super::types::{A1111Request, ControlNetUnit, IndexOrName};
use crate::api::{self, ControlModeApi, ControlRequest, GenerateRequest, ResizeModeApi};
use crate::error::{from_json_value as from_value, ApiError};
use crate::images::{self, OutputFormat};
use crate::AppState;

/// A1111 sampler (and scheduler) → our scheduler name.
pub fn map_sampler(
    sampler: Option<&str>,
    scheduler: Option<&str>,
) -> Result<&'static str, ApiError> {
    let sampler = sampler.map(str::trim).filter(|s| !s.is_empty());
    let name = sampler.unwrap_or("Euler a");
    let base = match SAMPLER_NAMES.iter().find(|s| s.0 == name) {
        Some(s) => s.1,
        None => {
            return Err(ApiError::invalid(
                "sampler_name",
                format!(
                    "unknown sampler `{name}`; one of {} (see GET /sdapi/v1/samplers)",
                    SAMPLERS.map(|s| s.0).join(", ")
                ),
            ))
        }
    };
    let scheduler = scheduler
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty());
    match scheduler.as_deref() {
        None | Some("automatic") => Ok(base),
        Some("karras") if base == "dpmpp-2m" || base == "dpmpp-2m-karras" => {
            Ok("dpmpp-2m-karras")
        }
        Some("uniform") if base != "dpmpp-2m-karras" => Ok(base),
        Some(other) => Err(ApiError::invalid(
            "scheduler",
            format!(
                "scheduler `{other}` is not available with this sampler: Automatic, or Karras with DPM++ 2M"
            ),
        )),
    }
}

/// Every sampler name taken (A1111's, their aliases, a few lower-case ones) → our scheduler.
pub const SAMPLER_NAMES: [(&str, &str); 13] = [
    ("Euler", "euler"),
    ("k_euler", "euler"),
    ("Euler a", "euler-a"),
    ("k_euler_a", "euler-a"),
    ("k_euler_ancestral", "euler-a"),
    ("DDIM", "ddim"),
    ("ddim", "ddim"),
    ("DPM++ 2M", "dpmpp-2m"),
    ("k_dpmpp_2m", "dpmpp-2m"),
    ("DPM++ 2M Karras", "dpmpp-2m-karras"),
    ("k_dpmpp_2m_ka", "dpmpp-2m-karras"),
    ("UniPC", "unipc"),
    ("unipc", "unipc"),
];

/// A1111 samplers: name, aliases, our scheduler.
pub const SAMPLERS: [(&str, &[&str], &str); 6] = [
    ("Euler a", &["k_euler_a", "k_euler_ancestral"], "euler-a"),
    ("Euler", &["k_euler"], "euler"),
    ("DDIM", &[], "ddim"),
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp-2m"),
    ("DPM++ 2M Karras", &["k_dpmpp_2m_ka"], "dpmpp-2m-karras"),
    ("UniPC", &[], "unipc"),
];

/// Strips A1111's trailing ` [hash]` from a model title.
pub fn strip_hash(name: &str) -> &str {
    let name = name.trim();
    match name.rfind(" [") {
        Some(i) if name.ends_with(']') => name[..i].trim_end(),
        _ => name,
    }
}

/// The adapter an A1111 model name means (see the module docs for the rule).
pub fn resolve_adapter(model: &str, adapters: &[String]) -> Result<String, String> {
    let wanted = strip_hash(model);
    if let Some(a) = adapters.iter().find(|a| a.as_str() == wanted) {
        return Ok(a.clone());
    }
    let lower = wanted.to_lowercase();
    let matches: Vec<&String> = adapters
        .iter()
        .filter(|a| {
            let a = a.to_lowercase();
            !a.is_empty() && (lower.contains(&a) || a.contains(&lower))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "unknown ControlNet model `{model}` (see GET /controlnet/model_list)"
        )),
        many => Err(format!(
            "ControlNet model `{model}` is ambiguous: it matches {}",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn resize_mode(field: &str, v: &Option<IndexOrName>) -> Result<Option<ResizeModeApi>, ApiError> {
    Ok(Some(match v {
        None => return Ok(None),
        Some(IndexOrName::Index(0)) => ResizeModeApi::JustResize,
        Some(IndexOrName::Index(1)) => ResizeModeApi::CropAndResize,
        Some(IndexOrName::Index(2)) => ResizeModeApi::ResizeAndFill,
        Some(IndexOrName::Name(n)) => match n.as_str() {
            "Just Resize" => ResizeModeApi::JustResize,
            "Crop and Resize" | "Scale to Fit (Inner Fit)" => ResizeModeApi::CropAndResize,
            "Resize and Fill" | "Envelope (Outer Fit)" => ResizeModeApi::ResizeAndFill,
            _ => return Err(bad_mode(field, v)),
        },
        Some(_) => return Err(bad_mode(field, v)),
    }))
}

fn bad_mode(field: &str, v: &Option<IndexOrName>) -> ApiError {
    ApiError::invalid(
        field,
        format!("unknown {field} {v:?}: \"Just Resize\", \"Crop and Resize\", \"Resize and Fill\" or 0, 1, 2"),
    )
}

fn control_mode(field: &str, v: &Option<IndexOrName>) -> Result<ControlModeApi, ApiError> {
    Ok(match v {
        None => ControlModeApi::Balanced,
        Some(IndexOrName::Index(0)) => ControlModeApi::Balanced,
        Some(IndexOrName::Index(1)) => ControlModeApi::PromptMoreImportant,
        Some(IndexOrName::Index(2)) => ControlModeApi::ControlnetMoreImportant,
        Some(IndexOrName::Name(n)) if n == "Balanced" => ControlModeApi::Balanced,
        Some(IndexOrName::Name(n)) if n == "My prompt is more important" => {
            ControlModeApi::PromptMoreImportant
        }
        Some(IndexOrName::Name(n)) if n == "ControlNet is more important" => {
            ControlModeApi::ControlnetMoreImportant
        }
        Some(other) => {
            return Err(ApiError::invalid(
                field,
                format!("unknown control_mode {other:?}: \"Balanced\", \"My prompt is more important\", \"ControlNet is more important\" or 0, 1, 2"),
            ))
        }
    })
}

/// Where each native control came from, to name fields and pick detected maps.
pub struct UnitSource {
    /// `alwayson_scripts.<key>.args[j]`
    pub field: String,
    pub module: Option<&'static annotators::Preprocessor>,
    pub save_map: bool,
    /// For the infotext.
    pub summary: String,
}

impl UnitSource {
    pub fn as_field(&self) -> UnitField<'_> {
        UnitField {
            field: &self.field,
            module: self.module,
        }
    }
}

/// The A1111 request as a native one.
pub struct Converted {
    pub native: GenerateRequest,
    pub units: Vec<UnitSource>,
    pub sampler_label: String,
    /// A1111's (1 = none).
    pub clip_skip: usize,
}

pub fn convert(req: &A1111Request, img2img: bool, state: &AppState) -> Result<Converted, ApiError> {
    let sampler = req.sampler_name.as_deref().or(req.sampler_index.as_deref());
    let scheduler = map_sampler(sampler, req.scheduler.as_deref())?;
    if req.batch_size == 0 {
        return Err(ApiError::invalid("batch_size", "batch_size must be ≥ 1"));
    }
    if req.n_iter == 0 {
        return Err(ApiError::invalid("n_iter", "n_iter must be ≥ 1"));
    }
    let total = req.batch_size.saturating_mul(req.n_iter);
    let max = state.config.limits.max_images;
    if total > max {
        return Err(ApiError::invalid(
            "batch_size",
            format!("batch_size × n_iter = {total} images, over the limit of {max}"),
        ));
    }
    let clip_skip = match req.clip_skip {
        Some(n) => n,
        None => match req.override_settings.get("CLIP_stop_at_last_layers") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().ok_or_else(|| {
                ApiError::invalid(
                    "override_settings.CLIP_stop_at_last_layers",
                    "a whole number ≥ 1",
                )
            })? as usize,
        },
    };
    let model = match req.override_settings.get("sd_model_checkpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(title)) => {
            let name = strip_hash(title);
            if !state.engine.models().iter().any(|m| m.name == name) {
                return Err(ApiError::invalid(
                    "override_settings.sd_model_checkpoint",
                    format!("unknown model `{title}` (see GET /sdapi/v1/sd-models)"),
                ));
            }
            Some(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "override_settings.sd_model_checkpoint",
                "a model title",
            ))
        }
    };

    let mut native = GenerateRequest {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        width: Some(req.width),
        height: Some(req.height),
        steps: Some(req.steps),
        guidance_scale: req.cfg_scale,
        scheduler: scheduler.to_string(),
        seed: Some(req.seed),
        num_images: total,
        model,
        clip_skip: clip_skip.saturating_sub(1),
        // A1111 clients write A1111's prompt syntax.
        prompt_syntax: api::PromptSyntaxApi::A1111,
        eta: req.eta.unwrap_or(0.0),
        init_image: None,
        mask: None,
        // txt2img ignores `denoising_strength` (A1111 uses it only for hires fix).
        strength: if img2img {
            req.denoising_strength
        } else {
            api::GenerateRequest::DEFAULT_STRENGTH
        },
        resize_mode: resize_mode("resize_mode", &req.resize_mode)?
            .unwrap_or(ResizeModeApi::JustResize),
        controls: Vec::new(),
        output_format: OutputFormat::Png,
        priority: api::PriorityApi::Normal,
        return_hints: true,
    };
    if img2img {
        let first = req
            .init_images
            .first()
            .ok_or_else(|| ApiError::invalid("init_images", "img2img needs an init image"))?;
        native.init_image = Some(first.clone());
        native.mask = req.mask.clone().filter(|m| !m.is_empty());
        if native.mask.is_some() && req.inpainting_mask_invert == 1 {
            native.mask = Some(invert_mask(
                native.mask.as_deref().unwrap_or_default(),
                state.config.limits.max_input_pixels,
            )?);
        }
    }

    let mut units = Vec::new();
    let adapters: Vec<String> = state
        .engine
        .adapters()
        .list()
        .into_iter()
        .map(|a| a.name)
        .collect();
    for (key, script) in &req.alwayson_scripts {
        if !key.eq_ignore_ascii_case("controlnet") {
            continue;
        }
        let args = match script.get("args") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("alwayson_scripts.{key}.args"),
                    "a list of ControlNet units",
                ))
            }
        };
        for (j, arg) in args.iter().enumerate() {
            let field = format!("alwayson_scripts.{key}.args[{j}]");
            if !arg.is_object() {
                // `[false]` and the like: nothing to run.
                continue;
            }
            let unit: ControlNetUnit = from_value(arg, &field)?;
            let model = unit.model.as_deref().unwrap_or("").trim();
            if !unit.enabled || model.is_empty() || model == "None" || model == "none" {
                continue;
            }
            let adapter = resolve_adapter(model, &adapters)
                .map_err(|m| ApiError::invalid(format!("{field}.model"), m))?;
            let image = match unit
                .image
                .as_ref()
                .or(unit.input_image.as_ref())
                .map(|i| i.data())
                .filter(|d| !d.trim().is_empty())
            {
                Some(d) => d.to_string(),
                None => match native.init_image.clone() {
                    Some(i) => i,
                    None => {
                        return Err(ApiError::invalid(
                            format!("{field}.image"),
                            "a ControlNet unit needs an image",
                        ))
                    }
                },
            };
            let pre = annotators::find(unit.module.trim()).ok_or_else(|| {
                ApiError::invalid(
                    format!("{field}.module"),
                    format!(
                        "unknown module `{}` (see GET /controlnet/module_list)",
                        unit.module
                    ),
                )
            })?;
            let is_none = pre.name == "none";
            let processor_res = if unit.pixel_perfect {
                Some(req.width.min(req.height) as u32)
            } else {
                processor_res(&format!("{field}.processor_res"), unit.processor_res)?
            };
            let control = ControlRequest {
                adapter: adapter.clone(),
                image: Some(image),
                pose: None,
                preprocessor: (!is_none).then(|| pre.name.to_string()),
                params: if is_none {
                    BTreeMap::new()
                } else {
                    pre.params_from_thresholds(unit.threshold_a, unit.threshold_b)
                },
                processor_res: if is_none { None } else { processor_res },
                scale: unit.weight,
                start: unit.guidance_start,
                end: unit.guidance_end,
                resize_mode: Some(
                    resize_mode(&format!("{field}.resize_mode"), &unit.resize_mode)?
                        .unwrap_or(ResizeModeApi::CropAndResize),
                ),
                control_mode: control_mode(&format!("{field}.control_mode"), &unit.control_mode)?,
            };
            units.push(UnitSource {
                summary: format!(
                    "Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}",
                    pre.name, adapter, unit.weight, unit.guidance_start, unit.guidance_end
                ),
                field,
                module: (!is_none).then_some(pre),
                save_map: unit.save_detected_map,
            });
            native.controls.push(control);
        }
    }
    let sampler_label = SAMPLERS
        .iter()
        .find(|s| s.2 == scheduler)
        .map(|s| s.0)
        .unwrap_or(scheduler)
        .to_string();
    Ok(Converted {
        native,
        units,
        sampler_label,
        clip_skip,
    })
}

/// A1111's `processor_res`: zero or less (−1) is the module's default, else whole pixels.
pub fn processor_res(field: &str, v: f64) -> Result<Option<u32>, ApiError> {
    if v <= 0.0 {
        Ok(None)
    } else if v.is_finite() && v <= u32::MAX as f64 {
        Ok(Some(v as u32))
    } else {
        Err(ApiError::invalid(field, "a resolution in pixels, or -1"))
    }
}

fn invert_mask(data: &str, max_pixels: u64) -> Result<String, ApiError> {
    let mut mask = images::decode_base64("mask", data, max_pixels)?;
    image::imageops::invert(&mut mask);
    images::encode_base64(&mask, OutputFormat::Png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_map() {
        assert_eq!(map_sampler(Some("Euler a"), None).unwrap(), "euler-a");
        assert_eq!(map_sampler(None, Some("automatic")).unwrap(), "euler-a");
        assert_eq!(
            map_sampler(Some("DPM++ 2M"), Some("Karras")).unwrap(),
            "dpmpp-2m-karras"
        );
        assert_eq!(
            map_sampler(Some("Euler"), Some("Karras"))
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("scheduler")
        );
        assert_eq!(
            map_sampler(Some("LMS"), None)
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("sampler_name")
        );
    }

    #[test]
    fn adapters_resolve() {
        let names: Vec<String> = ["canny", "depth", "openpose", "scribble"]
            .map(String::from)
            .into();
        assert_eq!(resolve_adapter("canny", &names).unwrap(), "canny");
        assert_eq!(
            resolve_adapter("control_v11p_sd15_canny [d14c016b]", &names).unwrap(),
            "canny"
        );
        assert!(resolve_adapter("control_v11p_sd15_lineart", &names).is_err());
        let names: Vec<String> = ["canny", "canny_v2"].map(String::from).into();
        assert!(resolve_adapter("sd15_canny_v2_x", &names).is_err());
        assert!(resolve_adapter("control_canny", &names).is_ok());
        assert!(resolve_adapter("can", &names).is_err());
    }
}
