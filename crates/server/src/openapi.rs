//! The OpenAPI document, generated from the route and type definitions, then completed with
//! what depends on the configuration: the limits (`[limits]`: sizes, steps, images, controls,
//! prompt length), the base models' names, and the preprocessors that can run here (each with
//! its parameters' ranges). `GET /openapi.yaml` serves the document of the running server;
//! `openapi.yaml` at the repository root is the one of `config/default.toml` (a test fails when
//! they differ; regenerate with `controlnet-serve openapi > openapi.yaml`).
//!
//! What JSON Schema cannot say is said in the descriptions: an image field must hold a real
//! image, an adapter must exist (`GET /v1/adapters`), `end` ≥ `start`, width × height ≤
//! `limits.max_pixels` and, for A1111, batch_size × n_iter ≤ `limits.max_images`.
use serde_json::{json, Value as Json};
use serde_norway::Value as Yaml;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::config::{Config, Limits, MIN_SIDE};
use crate::{a1111, api, error, images, page, routes, AppState};

struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "api_key",
                "A generation key (auth.api_keys); not needed when none are configured",
            ),
            ("admin_key", "An adapter-management key (auth.admin_keys)"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "controlnet-serve",
        description = "Stable Diffusion 1.5 with ControlNet: a native API, progress over server-sent events, and an AUTOMATIC1111-compatible API. Errors are `{error, type, field}` JSON. The limits in this document (sizes, steps, images, controls, prompt length), the model names and the preprocessors listed are those of the server that serves it (`GET /openapi.yaml`); they are configurable (`[limits]` in config/default.toml).",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::generate,
        routes::generate_stream,
        routes::detect,
        routes::preprocessors,
        routes::models,
        routes::limits,
        routes::adapters,
        routes::put_adapter,
        routes::delete_adapter,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::openapi,
        page::index,
        page::app_js,
        page::style_css,
    ),
    components(schemas(
        api::GenerateRequest,
        api::GenerateResponse,
        api::ControlRequest,
        api::Timings,
        api::ResizeModeApi,
        api::ControlModeApi,
        api::PriorityApi,
        api::DetectRequest,
        api::DetectResponse,
        api::PreprocessorInfo,
        api::ParamInfo,
        api::ModelInfoApi,
        api::LimitsInfo,
        api::AdapterInfoApi,
        api::PutAdapterRequest,
        images::OutputFormat,
        error::ErrorBody,
        routes::HealthBody,
    )),
    modifiers(&BearerKeys)
)]
pub struct ApiDoc;

/// What the document depends on besides the code.
#[derive(Debug, Clone)]
pub struct Facts {
    pub limits: Limits,
    /// Base model names.
    pub models: Vec<String>,
    /// The preprocessors that can run here.
    pub preprocessors: Vec<&'static annotators::Preprocessor>,
    /// The most layers `clip_skip` may skip with every model.
    pub max_clip_skip: usize,
}

impl Facts {
    /// For a server started with `config` (without starting it).
    pub fn from_config(config: &Config) -> Self {
        let models = if config.models.is_empty() {
            vec!["embedded".to_string()]
        } else {
            config.models.iter().map(|m| m.name.clone()).collect()
        };
        let root = &config.annotators.root;
        let pool = engine::AnnotatorPool::new(engine::AnnotatorSettings {
            root: (!root.as_os_str().is_empty()).then(|| root.clone()),
            budget_bytes: None,
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
        });
        // A configured model's layers are known once it is loaded (the served document).
        let max_clip_skip = if config.models.is_empty() {
            diffusion::embedded::clip_config().num_hidden_layers
        } else {
            api::MAX_CLIP_SKIP
        };
        Self {
            limits: config.limits.clone(),
            models,
            preprocessors: runnable(&pool),
            max_clip_skip: max_clip_skip.min(api::MAX_CLIP_SKIP),
        }
    }

    /// For the running server.
    pub fn from_state(state: &AppState) -> Self {
        Self {
            limits: state.config.limits.clone(),
            models: state.engine.models().into_iter().map(|m| m.name).collect(),
            preprocessors: runnable(state.engine.annotators()),
            max_clip_skip: state
                .clip_layers
                .values()
                .copied()
                .fold(api::MAX_CLIP_SKIP, usize::min),
        }
    }
}

fn runnable(pool: &engine::AnnotatorPool) -> Vec<&'static annotators::Preprocessor> {
    annotators::list()
        .iter()
        .filter(|p| pool.availability(p) == engine::Availability::Ready)
        .collect()
}

/// The document for `facts`, its keys in the order utoipa writes them.
pub fn document_for(facts: &Facts) -> Yaml {
    let mut doc = ApiDoc::openapi();
    doc.merge(a1111::A1111Doc::openapi());
    let mut doc = serde_norway::to_value(&doc).expect("the OpenAPI document serialises");
    complete(&mut doc, facts);
    doc
}

/// The document of `config/default.toml`, as JSON (for tests).
pub fn document() -> Json {
    serde_json::to_value(document_for(&Facts::from_config(&Config::defaults())))
        .expect("the document is JSON")
}

pub fn yaml_for(facts: &Facts) -> String {
    serde_norway::to_string(&document_for(facts)).expect("the OpenAPI document serialises")
}

/// What `openapi.yaml` holds.
pub fn yaml() -> String {
    yaml_for(&Facts::from_config(&Config::defaults()))
}

// ---------------------------------------------------------------------------------------------
// Completing the generated document

fn y(v: Json) -> Yaml {
    serde_norway::to_value(v).expect("JSON is YAML")
}

/// The value at `path` (made, as an empty mapping, where missing).
fn at<'a>(v: &'a mut Yaml, path: &[&str]) -> &'a mut Yaml {
    let mut cur = v;
    for k in path {
        if !cur.is_mapping() {
            *cur = Yaml::Mapping(Default::default());
        }
        cur = cur
            .as_mapping_mut()
            .expect("a mapping")
            .entry(Yaml::String(k.to_string()))
            .or_insert(Yaml::Null);
    }
    cur
}

/// Sets each key of the JSON object `fields` at `path`.
fn merge(doc: &mut Yaml, path: &[&str], fields: Json) {
    let target = at(doc, path);
    for (k, v) in fields.as_object().expect("an object") {
        *at(target, &[k]) = y(v.clone());
    }
}

fn schema<'a>(doc: &'a mut Yaml, name: &str) -> &'a mut Yaml {
    at(doc, &["components", "schemas", name])
}

/// A preprocessor's names: its own, then its aliases.
fn names(p: &annotators::Preprocessor) -> Vec<&'static str> {
    std::iter::once(p.name)
        .chain(p.aliases.iter().copied())
        .collect()
}

/// A number in a parameter's range.
fn range(spec: &annotators::ParamSpec) -> Json {
    json!({"type": "number", "minimum": spec.min, "maximum": spec.max})
}

/// The native preprocessor fields (`preprocessor`, `params`, `processor_res`) for each
/// preprocessor that can run here: one schema per preprocessor, for `anyOf`.
fn native_preprocessors(facts: &Facts) -> Vec<Json> {
    facts
        .preprocessors
        .iter()
        .map(|p| {
            let params: serde_json::Map<String, Json> = p
                .params
                .iter()
                .map(|s| (s.name.to_string(), range(s)))
                .collect();
            let mut props = json!({
                "preprocessor": {"enum": names(p)},
                "params": {"type": "object", "properties": params, "additionalProperties": false},
            });
            if let Some(r) = &p.resolution {
                props["processor_res"] = json!({
                    "type": ["integer", "null"], "minimum": r.min, "maximum": r.max
                });
            }
            json!({"title": p.name, "required": ["preprocessor"], "properties": props})
        })
        .collect()
}

/// The A1111 module fields (`module`, `threshold_a`, `threshold_b`, `processor_res`, with
/// `prefix`) for each preprocessor that can run here. `-1` is a parameter's default; a
/// resolution of 0 or less is the module's default, a fraction is cut to whole pixels.
fn a1111_modules(facts: &Facts, prefix: &str, module_default: bool) -> Vec<Json> {
    facts
        .preprocessors
        .iter()
        .map(|p| {
            let mut props = serde_json::Map::new();
            // The module is trimmed before it is looked up.
            let pattern = format!(
                r"^\s*({})\s*$",
                names(p)
                    .iter()
                    .map(|n| regex_escape(n))
                    .collect::<Vec<_>>()
                    .join("|")
            );
            props.insert(
                format!("{prefix}module"),
                json!({"type": "string", "pattern": pattern}),
            );
            for (spec, key) in p.params.iter().zip(["threshold_a", "threshold_b"]) {
                props.insert(
                    format!("{prefix}{key}"),
                    json!({"anyOf": [{"const": -1}, range(spec)]}),
                );
            }
            if let Some(r) = &p.resolution {
                props.insert(
                    format!("{prefix}processor_res"),
                    json!({"anyOf": [
                        {"type": "number", "maximum": 0},
                        {"type": "number", "minimum": r.min, "exclusiveMaximum": r.max + 1.0}
                    ]}),
                );
            }
            let mut branch = json!({"title": p.name, "properties": props});
            if !(module_default && p.name == "none") {
                branch["required"] = json!([format!("{prefix}module")]);
            }
            branch
        })
        .collect()
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A pattern matching `word` in any case, with surrounding white space.
fn any_case(words: &[&str]) -> String {
    let alternatives: Vec<String> = words
        .iter()
        .map(|w| {
            w.chars()
                .map(|c| {
                    if c.is_ascii_alphabetic() {
                        format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
                    } else {
                        regex_escape(&c.to_string())
                    }
                })
                .collect()
        })
        .collect();
    format!(r"^\s*({})\s*$", alternatives.join("|"))
}

fn complete(doc: &mut Yaml, facts: &Facts) {
    let l = &facts.limits;
    let side = json!({
        "type": "integer", "minimum": MIN_SIDE, "maximum": l.max_side(), "multipleOf": 8,
        "default": l.default_side(),
    });
    let prompt = json!({"type": "string", "maxLength": l.max_prompt_chars});
    let products = format!(
        " width × height must be at most {} pixels (limits.max_pixels).",
        l.max_pixels
    );

    // Errors: the kinds.
    merge(
        doc,
        &["components", "schemas", "ErrorBody", "properties", "type"],
        json!({"enum": error::ErrorKind::types()}),
    );

    // The native generation request.
    let g = schema(doc, "GenerateRequest");
    merge(
        g,
        &["properties"],
        json!({
            "prompt": prompt,
            "negative_prompt": prompt,
            "width": side,
            "height": side,
            "steps": {"type": "integer", "minimum": 1, "maximum": l.max_steps, "default": l.default_steps()},
            "num_images": {"type": "integer", "minimum": 1, "maximum": l.max_images, "default": 1},
            "model": {"type": ["string", "null"], "enum": facts.models.iter().map(|m| json!(m)).chain([Json::Null]).collect::<Vec<_>>()},
            "scheduler": {"type": "string", "enum": diffusion::schedulers::SchedulerKind::ALL.map(|k| k.name()), "default": "unipc"},
            "seed": {"type": ["integer", "null"], "minimum": -1, "maximum": i64::MAX},
            "clip_skip": {"type": "integer", "minimum": 0, "maximum": facts.max_clip_skip, "default": 0},
        }),
    );
    merge(
        g,
        &["properties", "controls"],
        json!({"maxItems": l.max_controls}),
    );
    merge(
        g,
        &[],
        json!({
            "description": format!("`POST /v1/generate`.{products}"),
            // A mask needs an init image.
            "anyOf": [
                {"properties": {"mask": {"type": "null"}}},
                {"required": ["init_image"], "properties": {"init_image": {"type": "string"}}},
            ],
        }),
    );
    // A control: its preprocessor's parameters, or none.
    let mut branches = vec![json!({
        "title": "no preprocessor",
        "properties": {"preprocessor": {"type": "null"}, "params": {"maxProperties": 0}}
    })];
    branches.extend(native_preprocessors(facts));
    merge(
        schema(doc, "ControlRequest"),
        &[],
        json!({"anyOf": branches, "description": "One ControlNet of a request. `adapter` must be loaded (`GET /v1/adapters`), `image` a real image, and `end` at least `start`."}),
    );
    merge(
        schema(doc, "ControlRequest"),
        &["properties", "adapter"],
        json!({"pattern": r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"}),
    );
    // `image` or `pose`, not both; a pose is drawn, so it takes no preprocessor parameters
    // (its preprocessor, if any, only says which parts are drawn).
    merge(
        schema(doc, "ControlRequest"),
        &[],
        json!({"oneOf": [
            {"title": "image", "required": ["image"],
             "properties": {"image": {"type": "string"}, "pose": {"type": "null"}}},
            {"title": "pose", "required": ["pose"],
             "properties": {
                 "pose": {"type": "object"},
                 "image": {"type": "null"},
                 "preprocessor": {"enum": [null, "none", "openpose", "openpose_hand",
                     "openpose_face", "openpose_faceonly", "openpose_full"]},
                 "params": {"maxProperties": 0},
                 "processor_res": {"type": "null"},
             }},
        ]}),
    );
    merge(
        schema(doc, "DetectRequest"),
        &[],
        json!({"anyOf": native_preprocessors(facts)}),
    );
    merge(
        schema(doc, "DetectRequest"),
        &["properties", "seed"],
        json!({"maximum": u64::MAX}),
    );

    // Adapter names in paths.
    for method in ["put", "delete"] {
        let params = at(doc, &["paths", "/v1/adapters/{name}", method, "parameters"]);
        if let Some(list) = params.as_sequence_mut() {
            for p in list {
                merge(
                    p,
                    &["schema"],
                    json!({"pattern": r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"}),
                );
            }
        }
    }

    // The event stream: one schema per event, `data` a JSON document.
    merge(
        doc,
        &[
            "paths",
            "/v1/generate/stream",
            "post",
            "responses",
            "200",
            "content",
            "text/event-stream",
        ],
        json!({"schema": stream_events()}),
    );

    a1111(doc, facts, &side, &prompt, &products);
}

fn stream_events() -> Json {
    let event = |name: &str, data: Json| {
        json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": name},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
            },
        })
    };
    json!({"oneOf": [
        event("queued", json!({"type": "object", "required": ["position"], "properties": {"position": {"type": "integer", "minimum": 0}}})),
        event("started", json!({"type": "object"})),
        event("step", json!({"type": "object", "required": ["step", "total"], "properties": {"step": {"type": "integer", "minimum": 0}, "total": {"type": "integer", "minimum": 1}}})),
        event("done", json!({"$ref": "#/components/schemas/GenerateResponse"})),
        event("error", json!({"$ref": "#/components/schemas/ErrorBody"})),
    ]})
}

fn a1111(doc: &mut Yaml, facts: &Facts, side: &Json, prompt: &Json, products: &str) {
    let l = &facts.limits;
    let not_object = json!({"type": ["null", "boolean", "number", "string", "array"]});
    let samplers: Vec<&str> = a1111::SAMPLER_NAMES.iter().map(|s| s.0).collect();
    let karras_ok: Vec<&str> = a1111::SAMPLER_NAMES
        .iter()
        .filter(|s| s.1 == "dpmpp-2m" || s.1 == "dpmpp-2m-karras")
        .map(|s| s.0)
        .collect();
    let uniform_ok: Vec<&str> = a1111::SAMPLER_NAMES
        .iter()
        .filter(|s| s.1 != "dpmpp-2m-karras")
        .map(|s| s.0)
        .chain([""])
        .collect();
    // The sampler in effect is `sampler_name`, or `sampler_index` when that is absent.
    let sampler_in = |allowed: &[&str]| {
        json!({"anyOf": [
            {"required": ["sampler_name"], "properties": {"sampler_name": {"enum": allowed}}},
            {"required": ["sampler_index"], "properties": {"sampler_name": {"type": "null"}, "sampler_index": {"enum": allowed}}},
        ]})
    };
    let scheduler_rule = json!({"anyOf": [
        {"properties": {"scheduler": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": any_case(&["automatic", ""])}]}}},
        {"allOf": [{"required": ["scheduler"], "properties": {"scheduler": {"type": "string", "pattern": any_case(&["karras"])}}}, sampler_in(&karras_ok)]},
        {"allOf": [{"required": ["scheduler"], "properties": {"scheduler": {"type": "string", "pattern": any_case(&["uniform"])}}},
                   {"anyOf": [sampler_in(&uniform_ok), {"properties": {"sampler_name": {"type": "null"}, "sampler_index": {"type": "null"}}}]}]},
    ]});
    let sampler_field = json!({"type": ["string", "null"], "enum": samplers.iter().map(|s| json!(s)).chain([json!(""), Json::Null]).collect::<Vec<_>>()});
    let mode = |names: &[&str]| json!({"anyOf": [{"type": "null"}, {"type": "integer", "enum": [0, 1, 2]}, {"type": "string", "enum": names}]});
    let resize = mode(&[
        "Just Resize",
        "Crop and Resize",
        "Scale to Fit (Inner Fit)",
        "Resize and Fill",
        "Envelope (Outer Fit)",
    ]);
    let control = mode(&[
        "Balanced",
        "My prompt is more important",
        "ControlNet is more important",
    ]);
    let models: Vec<Json> = facts
        .models
        .iter()
        .map(|m| json!(m))
        .chain([Json::Null])
        .collect();
    let scripts = json!({
        "type": "object",
        "description": "`controlnet` (any case): `{args: [ControlNetUnit, ...]}`; other scripts are ignored.",
        "patternProperties": {
            any_case(&["controlnet"]).replace(r"^\s*(", "^(").replace(r")\s*$", ")$"): {"anyOf": [
                not_object,
                {"type": "object", "properties": {"args": {"anyOf": [
                    {"type": "null"},
                    {"type": "array", "items": {"anyOf": [not_object, {"$ref": "#/components/schemas/ControlNetUnit"}]}},
                ]}}},
            ]},
        },
    });
    // A1111 counts the last layer: 1 (or 0) is none.
    let clip_layers = json!({"type": "integer", "minimum": 0, "maximum": facts.max_clip_skip + 1});
    let r = schema(doc, "A1111Request");
    merge(
        r,
        &["properties"],
        json!({
            "prompt": prompt,
            "negative_prompt": prompt,
            "width": side,
            "height": side,
            "steps": {"type": "integer", "minimum": 1, "maximum": l.max_steps, "default": l.default_steps()},
            "cfg_scale": {"type": "number", "minimum": 0, "maximum": 50, "default": 7.0},
            "seed": {"type": "integer", "minimum": -1, "maximum": i64::MAX, "default": -1},
            "sampler_name": sampler_field,
            "sampler_index": sampler_field,
            "batch_size": {"type": "integer", "minimum": 1, "maximum": l.max_images, "default": 1},
            "n_iter": {"type": "integer", "minimum": 1, "maximum": l.max_images, "default": 1},
            "clip_skip": {"type": ["integer", "null"], "minimum": 0, "maximum": facts.max_clip_skip + 1},
            "eta": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "override_settings": {
                "type": "object",
                "description": "`sd_model_checkpoint` (a base model; a trailing ` [hash]` is ignored) and `CLIP_stop_at_last_layers` are read; other settings are ignored.",
                "properties": {"sd_model_checkpoint": {"enum": models}},
            },
            "alwayson_scripts": scripts,
            "resize_mode": resize,
        }),
    );
    merge(
        r,
        &[],
        json!({
            "description": format!("`POST /sdapi/v1/txt2img` (and img2img, see A1111Img2ImgRequest). Fields not listed are accepted and ignored. batch_size × n_iter must be at most {} (limits.max_images);{products}", l.max_images),
            "allOf": [
                scheduler_rule,
                // `CLIP_stop_at_last_layers` is read when `clip_skip` is not given.
                {"anyOf": [
                    {"required": ["clip_skip"], "properties": {"clip_skip": {"type": "integer"}}},
                    {"properties": {"override_settings": {"properties": {"CLIP_stop_at_last_layers": {"anyOf": [{"type": "null"}, clip_layers]}}}}},
                ]},
            ],
        }),
    );
    // img2img: an init image, and the strength that applies to it.
    merge(
        schema(doc, "A1111Img2ImgRequest"),
        &[],
        json!({
            "description": "`POST /sdapi/v1/img2img`: A1111Request with an init image.",
            "allOf": [
                {"$ref": "#/components/schemas/A1111Request"},
                {
                    "type": "object",
                    "required": ["init_images"],
                    "properties": {
                        "init_images": {"type": "array", "minItems": 1, "prefixItems": [{"type": "string", "minLength": 1}]},
                        "denoising_strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.75},
                    },
                },
            ],
        }),
    );
    merge(
        doc,
        &[
            "paths",
            "/sdapi/v1/img2img",
            "post",
            "requestBody",
            "content",
            "application/json",
            "schema",
        ],
        json!({"$ref": "#/components/schemas/A1111Img2ImgRequest"}),
    );

    // A unit: skipped when disabled or without a model; else its module's thresholds.
    let unit_image = json!({"anyOf": [
        {"type": "null"},
        {"type": "string"},
        {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}, "mask": {"type": ["string", "null"]}}},
    ]});
    let u = schema(doc, "ControlNetUnit");
    merge(
        u,
        &["properties"],
        json!({
            "image": unit_image,
            "input_image": unit_image,
        }),
    );
    // The modes are read only from units in use.
    let used = json!({
        "required": ["model"],
        "properties": {
            "resize_mode": resize,
            "control_mode": control,
            "model": {"type": "string", "minLength": 1},
            "weight": {"type": "number", "minimum": 0, "maximum": 2},
            "guidance_start": {"type": "number", "minimum": 0, "maximum": 1},
            "guidance_end": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "anyOf": a1111_modules(facts, "", true),
    });
    merge(
        u,
        &[],
        json!({
            "description": "One ControlNet extension unit. A unit with `enabled: false` or no model (absent, null, empty, `None`) is skipped. Otherwise `model` must name an adapter (`GET /controlnet/model_list`), the unit needs an image (or img2img's init image), and `guidance_end` must be at least `guidance_start`. Fields not listed are accepted and ignored.",
            "anyOf": [
                {"required": ["enabled"], "properties": {"enabled": {"const": false}}},
                {"properties": {"model": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": r"^\s*(None|none)?\s*$"}]}}},
                used,
            ],
        }),
    );

    // /controlnet/detect
    let images =
        json!({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}});
    let d = schema(doc, "A1111DetectRequest");
    merge(
        d,
        &["properties"],
        json!({"controlnet_input_images": images, "controlnet_images": images}),
    );
    merge(
        d,
        &[],
        json!({
            "description": "`POST /controlnet/detect`: the images (`controlnet_input_images`, or webuiapi's `controlnet_images`), the module and its thresholds. Fields not listed are ignored.",
            "allOf": [
                {"oneOf": [{"required": ["controlnet_input_images"]}, {"required": ["controlnet_images"]}]},
                {"anyOf": a1111_modules(facts, "controlnet_", true)},
            ],
        }),
    );
}
