//! AUTOMATIC1111-compatible routes (filled in next).
use axum::Router;
use utoipa::OpenApi;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}

#[derive(OpenApi)]
#[openapi()]
pub struct A1111Doc;
