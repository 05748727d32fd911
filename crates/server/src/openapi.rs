//! The OpenAPI document, generated from the route and type definitions. `openapi.yaml` at the
//! repository root is this document; a test fails when they differ (regenerate with
//! `cargo run -p server -- openapi > openapi.yaml`).
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{a1111, api, error, images, routes};

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
        description = "Stable Diffusion 1.5 with ControlNet: a native API, progress over server-sent events, and an AUTOMATIC1111-compatible API. Errors are `{error, type, field}` JSON.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::generate,
        routes::generate_stream,
        routes::detect,
        routes::preprocessors,
        routes::models,
        routes::adapters,
        routes::put_adapter,
        routes::delete_adapter,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::openapi,
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
        api::AdapterInfoApi,
        api::PutAdapterRequest,
        images::OutputFormat,
        error::ErrorBody,
        routes::HealthBody,
    )),
    modifiers(&BearerKeys)
)]
pub struct ApiDoc;

/// The whole document: the native API and the A1111-compatible one (merged rather than
/// nested: a nest under `/` would make `//sdapi/...` paths).
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(a1111::A1111Doc::openapi());
    doc
}

pub fn yaml() -> String {
    document()
        .to_yaml()
        .expect("the OpenAPI document serialises")
}
