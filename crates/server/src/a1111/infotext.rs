//! What txt2img / img2img answer in `info`: A1111's JSON document (as a string), with an
//! infotext line per image.
use serde_json::{json, Value};

use super::convert::UnitSource;
use super::types::A1111Request;
use crate::api::Timings;

/// What the `info` document is made of.
pub struct Info<'a> {
    pub req: &'a A1111Request,
    pub img2img: bool,
    pub sampler_label: &'a str,
    /// Our scheduler name.
    pub scheduler: &'a str,
    /// A1111's (1 = none).
    pub clip_skip: usize,
    pub units: &'a [UnitSource],
    pub model: &'a str,
    pub seeds: &'a [u64],
    pub timings: &'a Timings,
}

impl Info<'_> {
    /// The `info` field: a JSON document, as a string.
    pub fn to_json_string(&self) -> String {
        let req = self.req;
        let seeds = self.seeds;
        let first = seeds.first().copied().unwrap_or_default();
        let n = seeds.len();
        json!({
            "prompt": req.prompt,
            "all_prompts": vec![req.prompt.clone(); n],
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": vec![req.negative_prompt.clone(); n],
            "seed": first,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": vec![-1; n],
            "subseed_strength": 0,
            "width": req.width,
            "height": req.height,
            "sampler_name": self.sampler_label,
            "scheduler": self.scheduler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "clip_skip": self.clip_skip,
            "denoising_strength": if self.img2img { json!(req.denoising_strength) } else { Value::Null },
            "sd_model_name": self.model,
            "sd_model_hash": Value::Null,
            "restore_faces": false,
            "styles": [],
            "is_using_inpainting_conditioning": false,
            "index_of_first_image": 0,
            "infotexts": seeds
                .iter()
                .map(|s| infotext(req, self.sampler_label, self.clip_skip, self.units, self.img2img, *s, self.model))
                .collect::<Vec<_>>(),
            "timings": self.timings,
            // Extra-network tags (`<lora:…>`, `<hypernet:…>`) are removed from the prompt and
            // not applied: say which, so a client knows its LoRA did nothing.
            "ignored_extra_networks": diffusion::prompt_syntax::parse(&req.prompt)
                .ignored_tags
                .iter()
                .map(|t| t.text.clone())
                .collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// A1111's one-line summary of an image's settings. `img2img` requests always have an init
/// image (convert refuses them without one).
fn infotext(
    req: &A1111Request,
    sampler_label: &str,
    clip_skip: usize,
    units: &[UnitSource],
    img2img: bool,
    seed: u64,
    model: &str,
) -> String {
    let mut parts = vec![
        format!("Steps: {}", req.steps),
        format!("Sampler: {sampler_label}"),
        format!("CFG scale: {}", req.cfg_scale),
        format!("Seed: {seed}"),
        format!("Size: {}x{}", req.width, req.height),
        format!("Model: {model}"),
    ];
    if img2img {
        parts.push(format!("Denoising strength: {}", req.denoising_strength));
    }
    if clip_skip > 1 {
        parts.push(format!("Clip skip: {clip_skip}"));
    }
    for (i, u) in units.iter().enumerate() {
        parts.push(format!("ControlNet {i}: \"{}\"", u.summary));
    }
    let mut text = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
    }
    text.push('\n');
    text.push_str(&parts.join(", "));
    text
}
