//! One error type for every route, mapped to HTTP here and nowhere else:
//! `{"error": message, "type": kind, "field": the offending field or null}`.
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::EngineError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable kind: invalid_json, invalid_request, payload_too_large, unauthorized,
    /// forbidden, not_found, method_not_allowed, not_acceptable, overloaded, not_ready,
    /// out_of_memory, timeout, cancelled, internal.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (JSON path such as `controls[0].image`), if one is.
    pub field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: message.into(),
                kind: kind.into(),
                field: None,
            },
        }
    }

    /// 422 naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message);
        e.body.field = Some(field.into());
        e
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the service is starting or shutting down",
        )
    }

    /// The label requests are counted under in metrics.
    pub fn outcome(&self) -> &str {
        &self.body.kind
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Overloaded(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            }
            EngineError::MemoryBudget(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            }
            EngineError::Invalid(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            EngineError::UnknownModel(_) => Self::invalid("model", message),
            EngineError::UnknownAdapter(_) | EngineError::NotFound(_) => Self::not_found(message),
            EngineError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", message),
            EngineError::AdapterLoad(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            EngineError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message),
            EngineError::Cancelled => Self::new(
                StatusCode::from_u16(499).expect("valid code"),
                "cancelled",
                message,
            ),
            EngineError::Annotator(_) => Self::invalid("preprocessor", message),
            // The server's own weight file is unreadable: not the client's fault.
            EngineError::AnnotatorLoad(_) | EngineError::Failed(_) => Self::internal(message),
            EngineError::Stopped => Self::not_ready(),
            // The job ran out of device memory alone (batches are retried smaller first): a
            // smaller request fits, or the same one may once other jobs have left.
            EngineError::OutOfMemory(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "out_of_memory", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// JSON body extractor whose errors are [`ApiError`]s naming the field: a syntax error is 400
/// `invalid_json`, a wrong type or missing field is 422 with its path, a body over the limit
/// is 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "send the body as application/json",
            ));
        }
        let bytes =
            axum::body::Bytes::from_request(req, state)
                .await
                .map_err(|e: BytesRejection| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "payload_too_large",
                            e.body_text(),
                        )
                    } else {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
                    }
                })?;
        // Every request body is an object; serde would take an array for a struct.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|&b| b != b'{')
            && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok()
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "the body must be a JSON object",
            ));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not valid JSON: {inner}"),
                ))
            } else {
                let mut field = if path == "." { None } else { Some(path) };
                // A missing field is reported at its parent: name the field itself.
                let message = inner.to_string();
                if let Some(name) = message
                    .strip_prefix("missing field `")
                    .and_then(|r| r.split('`').next())
                {
                    field = Some(match field {
                        Some(parent) => format!("{parent}.{name}"),
                        None => name.to_string(),
                    });
                }
                let mut err = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    inner.to_string(),
                );
                err.body.field = field;
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        scale: f64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Outer {
        steps: usize,
        controls: Vec<Inner>,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<Outer>(br#"{"steps": 1, "controls": [{"scale": "x"}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.field.as_deref(), Some("controls[0].scale"));
        let e = parse_json::<Outer>(br#"{"steps": 1, "#).unwrap_err();
        assert_eq!(
            (e.status, e.body.kind.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_json")
        );
        let e = parse_json::<Outer>(br#"{"steps": -1, "controls": []}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("steps"));
        let e = parse_json::<Outer>(br#"{"controls": []}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("steps"));
        let e = parse_json::<Outer>(br#"{"steps": 1, "controls": [{}]}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("controls[0].scale"));
    }

    #[test]
    fn out_of_device_memory_is_a_503_saying_what_to_do() {
        let e = ApiError::from(EngineError::OutOfMemory("denoising".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body.kind, "out_of_memory");
        assert_eq!(e.body.field, None);
        assert!(
            e.body.error.contains("out of device memory")
                && e.body.error.contains("smaller size or fewer images"),
            "{}",
            e.body.error
        );
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
    }
}
