//! Errors name fields as the client sent them: the native checks name native fields
//! (`guidance_scale`, `controls[0].scale`, `params.low_threshold`), which are renamed here to the
//! A1111 field each came from, by one table.
use crate::error::ApiError;

/// Where a native field sits in an A1111 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The top level of txt2img / img2img.
    Request,
    /// A ControlNet unit (`alwayson_scripts.controlnet.args[j]`), for native `controls[i].*`.
    Unit,
    /// `POST /controlnet/detect`.
    Detect,
}

/// A preprocessor's first and second parameter, whatever their names: native
/// `params.<name>` is looked up as `params#0` / `params#1` (A1111's thresholds).
const THRESHOLD_A: &str = "params#0";
const THRESHOLD_B: &str = "params#1";

/// Native field path → A1111 field, per scope. Fields not listed keep their name (`prompt`,
/// `steps`, a unit's `processor_res`, ...). In the detect scope `[]` stands for the image's
/// index in `controlnet_input_images`.
pub const FIELDS: &[(Scope, &str, &str)] = &[
    (Scope::Request, "guidance_scale", "cfg_scale"),
    (Scope::Request, "strength", "denoising_strength"),
    (Scope::Request, "init_image", "init_images[0]"),
    (Scope::Request, "num_images", "batch_size"),
    (Scope::Request, "scheduler", "sampler_name"),
    (
        Scope::Request,
        "model",
        "override_settings.sd_model_checkpoint",
    ),
    (Scope::Unit, "adapter", "model"),
    (Scope::Unit, "preprocessor", "module"),
    (Scope::Unit, "scale", "weight"),
    (Scope::Unit, "start", "guidance_start"),
    (Scope::Unit, "end", "guidance_end"),
    (Scope::Unit, THRESHOLD_A, "threshold_a"),
    (Scope::Unit, THRESHOLD_B, "threshold_b"),
    (Scope::Detect, "preprocessor", "controlnet_module"),
    (Scope::Detect, "processor_res", "controlnet_processor_res"),
    (Scope::Detect, "image", "controlnet_input_images[]"),
    (Scope::Detect, THRESHOLD_A, "controlnet_threshold_a"),
    (Scope::Detect, THRESHOLD_B, "controlnet_threshold_b"),
];

/// The A1111 name of native `field` in `scope`; `module` is the preprocessor whose
/// `params.<name>` are the thresholds.
pub fn a1111_name(
    scope: Scope,
    field: &str,
    module: Option<&annotators::Preprocessor>,
) -> Option<&'static str> {
    let key = match field.strip_prefix("params.") {
        Some(p) => match module.and_then(|m| m.params.iter().position(|x| x.name == p)) {
            Some(0) => THRESHOLD_A,
            Some(1) => THRESHOLD_B,
            _ => return None,
        },
        None => field,
    };
    FIELDS
        .iter()
        .find(|(s, native, _)| *s == scope && *native == key)
        .map(|(_, _, a1111)| *a1111)
}

/// Where each native control came from.
pub struct UnitField<'a> {
    /// `alwayson_scripts.<key>.args[j]`
    pub field: &'a str,
    pub module: Option<&'static annotators::Preprocessor>,
}

/// Renames the field of an error from a native txt2img/img2img request to the A1111 one.
pub fn rename_request(mut e: ApiError, units: &[UnitField]) -> ApiError {
    let Some(field) = e.body.field.take() else {
        return e;
    };
    let renamed = match field.strip_prefix("controls[") {
        Some(rest) => {
            let (index, sub) = rest.split_once(']').unwrap_or((rest, ""));
            let sub = sub.trim_start_matches('.');
            match index.parse::<usize>().ok().and_then(|i| units.get(i)) {
                Some(u) if sub.is_empty() => u.field.to_string(),
                Some(u) => {
                    let sub = a1111_name(Scope::Unit, sub, u.module).unwrap_or(sub);
                    format!("{}.{sub}", u.field)
                }
                None => field,
            }
        }
        None => a1111_name(Scope::Request, &field, None)
            .map(String::from)
            .unwrap_or(field),
    };
    e.body.field = Some(renamed);
    e
}

/// Renames the field of an error from running `module` on `controlnet_input_images[index]`.
pub fn rename_detect(mut e: ApiError, module: &annotators::Preprocessor, index: usize) -> ApiError {
    let Some(field) = e.body.field.take() else {
        return e;
    };
    e.body.field = Some(match a1111_name(Scope::Detect, &field, Some(module)) {
        Some(name) => name.replace("[]", &format!("[{index}]")),
        None => field,
    });
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_fields_get_their_a1111_names() {
        let canny = annotators::find("canny").unwrap();
        let units = [UnitField {
            field: "alwayson_scripts.controlnet.args[1]",
            module: Some(canny),
        }];
        let renamed = |f: &str| {
            rename_request(ApiError::invalid(f, "x"), &units)
                .body
                .field
                .unwrap()
        };
        assert_eq!(renamed("guidance_scale"), "cfg_scale");
        assert_eq!(renamed("prompt"), "prompt");
        assert_eq!(
            renamed("controls[0].scale"),
            "alwayson_scripts.controlnet.args[1].weight"
        );
        let first = canny.params[0].name;
        assert_eq!(
            renamed(&format!("controls[0].params.{first}")),
            "alwayson_scripts.controlnet.args[1].threshold_a"
        );
        assert_eq!(
            renamed("controls[0]"),
            "alwayson_scripts.controlnet.args[1]"
        );
        assert_eq!(renamed("controls[5].scale"), "controls[5].scale");
        let d = |f: &str| {
            rename_detect(ApiError::invalid(f, "x"), canny, 2)
                .body
                .field
                .unwrap()
        };
        assert_eq!(d("image"), "controlnet_input_images[2]");
        assert_eq!(d("preprocessor"), "controlnet_module");
        assert_eq!(
            d(&format!("params.{}", canny.params[1].name)),
            "controlnet_threshold_b"
        );
    }
}
