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

/// Why a request failed: each kind has its JSON `type` ([`ErrorKind::as_str`]) and its HTTP
/// status ([`ErrorKind::status`]), here and nowhere else. Two kinds may share a `type` (what
/// clients see stays as it was) while their statuses differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the body is not JSON.
    InvalidJson,
    /// 415: the body is not sent as `application/json` (`type` `invalid_request`).
    UnsupportedMediaType,
    /// 422: a field is invalid (named in `field`).
    InvalidRequest,
    /// 413: the body is over `server.max_body_bytes`.
    PayloadTooLarge,
    /// 401: a key is missing or unknown.
    Unauthorized,
    /// 403: the key may not do this, or the path is outside the adapter roots.
    Forbidden,
    /// 404: no such route, adapter or file.
    NotFound,
    /// 405: the route does not take that method.
    MethodNotAllowed,
    /// 406: the answer asked for in `Accept` cannot hold the result.
    NotAcceptable,
    /// 429: the queue is full.
    Overloaded,
    /// 503: the adapter memory budget is held by adapters in use (`type` `overloaded`).
    MemoryBudget,
    /// 503: starting, draining or stopped.
    NotReady,
    /// 503: the job ran out of device memory alone.
    OutOfMemory,
    /// 504: not done within `server.request_timeout_secs`.
    Timeout,
    /// 499: the client went away (nobody reads this answer).
    Cancelled,
    /// 500: the server's fault.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 16] = [
        Self::InvalidJson,
        Self::UnsupportedMediaType,
        Self::InvalidRequest,
        Self::PayloadTooLarge,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::NotAcceptable,
        Self::Overloaded,
        Self::MemoryBudget,
        Self::NotReady,
        Self::OutOfMemory,
        Self::Timeout,
        Self::Cancelled,
        Self::Internal,
    ];

    /// The JSON `type` clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::UnsupportedMediaType | Self::InvalidRequest => "invalid_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotAcceptable => "not_acceptable",
            Self::Overloaded | Self::MemoryBudget => "overloaded",
            Self::NotReady => "not_ready",
            Self::OutOfMemory => "out_of_memory",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidRequest => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::MemoryBudget | Self::NotReady | Self::OutOfMemory => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Cancelled => StatusCode::from_u16(499).expect("valid code"),
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Every distinct `type` value, for the OpenAPI document.
    pub fn types() -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for k in Self::ALL {
            if !out.contains(&k.as_str()) {
                out.push(k.as_str());
            }
        }
        out
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable kind (the list is in the schema).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (JSON path such as `controls[0].image`), if one is.
    pub field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub status: StatusCode,
    pub body: ErrorBody,
    /// The whole cause, for the log only, where it says more than `body.error`.
    pub cause: Option<String>,
}

/// What the error log line needs, left on the response for the layer that writes it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: ErrorKind,
    /// The whole cause (the answer's message, or more).
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: kind.status(),
            body: ErrorBody {
                error: message.into(),
                kind: kind.as_str().into(),
                field: None,
            },
            cause: None,
        }
    }

    /// 422 naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message).with_field(field)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn not_ready() -> Self {
        Self::new(
            ErrorKind::NotReady,
            "the service is starting or shutting down",
        )
    }

    /// The label requests are counted under in metrics.
    pub fn outcome(&self) -> &str {
        self.kind.as_str()
    }

    fn failure(&self) -> Failure {
        Failure {
            kind: self.kind,
            message: self
                .cause
                .clone()
                .unwrap_or_else(|| self.body.error.clone()),
            field: self.body.field.clone(),
        }
    }

    /// Writes this failure to the log with the request it belongs to: 5xx at warn (the
    /// server's or the device's trouble), the client's own errors at info.
    pub fn log(&self, request_id: &str) {
        log_failure(request_id, &self.failure());
    }
}

/// See [`ApiError::log`].
pub fn log_failure(request_id: &str, f: &Failure) {
    let status = f.kind.status().as_u16();
    let field = f.field.as_deref().unwrap_or("-");
    let kind = f.kind.as_str();
    if status >= 500 {
        tracing::warn!(request_id, status, kind, field, cause = %f.message, "request failed");
    } else {
        tracing::info!(request_id, status, kind, field, cause = %f.message, "request refused");
    }
}

/// An engine error's text without the backtrace a device error may carry (`RUST_BACKTRACE`):
/// clients get the message, the log gets the whole text.
fn without_backtrace(text: &str) -> &str {
    let mut end = text.len();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if at > 0 && (t.starts_with("0: ") || t.starts_with("Stack backtrace")) {
            end = at;
            break;
        }
        at += line.len();
    }
    text[..end].trim_end()
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let full = e.to_string();
        let message = without_backtrace(&full).to_string();
        let mut out = Self::from_engine(e, message.clone());
        if full.len() != message.len() {
            out.cause = Some(full);
        }
        out
    }
}

impl ApiError {
    fn from_engine(e: EngineError, message: String) -> Self {
        match e {
            EngineError::Overloaded(_) => Self::new(ErrorKind::Overloaded, message),
            EngineError::MemoryBudget(_) => Self::new(ErrorKind::MemoryBudget, message),
            EngineError::Invalid(_) => Self::new(ErrorKind::InvalidRequest, message),
            EngineError::UnknownModel(_) => Self::invalid("model", message),
            EngineError::UnknownAdapter(_) | EngineError::NotFound(_) => Self::not_found(message),
            EngineError::Forbidden(_) => Self::new(ErrorKind::Forbidden, message),
            EngineError::AdapterLoad(_) => Self::new(ErrorKind::InvalidRequest, message),
            EngineError::Timeout => Self::new(ErrorKind::Timeout, message),
            EngineError::Cancelled => Self::new(ErrorKind::Cancelled, message),
            EngineError::Annotator(_) => Self::invalid("preprocessor", message),
            // The server's own weight file is unreadable: not the client's fault.
            EngineError::AnnotatorLoad(_) | EngineError::Failed(_) => Self::internal(message),
            EngineError::Stopped => Self::not_ready(),
            // The job ran out of device memory alone (batches are retried smaller first): a
            // smaller request fits, or the same one may once other jobs have left.
            EngineError::OutOfMemory(_) => Self::new(ErrorKind::OutOfMemory, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let failure = self.failure();
        let mut response = (self.status, axum::Json(self.body)).into_response();
        // For the layer that logs failures with the request id (crate::log_failures).
        response.extensions_mut().insert(failure);
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
        let bytes = json_body(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON object body as sent (no number is rewritten), with [`ApiJson`]'s refusals: for
/// answers that echo the request.
pub struct RawJson(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(RawJson)
            .map_err(|inner| {
                ApiError::new(
                    ErrorKind::InvalidJson,
                    format!("the body is not valid JSON: {inner}"),
                )
            })
    }
}

/// The body of a request sent as JSON, refused unless it could be a JSON object.
async fn json_body<S: Send + Sync>(req: Request, state: &S) -> Result<axum::body::Bytes, ApiError> {
    {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("application/json") {
            return Err(ApiError::new(
                ErrorKind::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
        let bytes =
            axum::body::Bytes::from_request(req, state)
                .await
                .map_err(|e: BytesRejection| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::new(ErrorKind::PayloadTooLarge, e.body_text())
                    } else {
                        ApiError::new(ErrorKind::InvalidJson, e.body_text())
                    }
                })?;
        // Every request body is an object; serde would take an array for a struct.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|&b| b != b'{')
            && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok()
        {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                "the body must be a JSON object",
            ));
        }
        Ok(bytes)
    }
}

/// Parses JSON, naming the field at fault. Whole numbers written with a fraction or an exponent
/// (`11.0`, `1e3`) are taken where an integer is expected: JSON (and JSON Schema) does not tell
/// them apart, and Python clients write them.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|inner| {
        ApiError::new(
            ErrorKind::InvalidJson,
            format!("the body is not valid JSON: {inner}"),
        )
    })?;
    whole_numbers(&mut value);
    from_json_value(&value, "")
}

/// Turns every integral floating-point number in `v` into an integer (where one holds it).
pub fn whole_numbers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Beyond 2^53 a float may be an integer literal out of range, rounded.
            if f.fract() == 0.0 && f.abs() <= (1u64 << 53) as f64 {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(whole_numbers),
        Value::Object(o) => o.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// Deserialises a JSON value, a 422 naming `prefix` + the path at fault (a missing field is
/// named itself, not its parent).
pub fn from_json_value<T: DeserializeOwned>(
    value: &serde_json::Value,
    prefix: &str,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mut parts: Vec<String> = Vec::new();
        if !prefix.is_empty() {
            parts.push(prefix.to_string());
        }
        if path != "." {
            parts.push(path);
        }
        let message = inner.to_string();
        if let Some(name) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            parts.push(name.to_string());
        }
        let mut err = ApiError::new(ErrorKind::InvalidRequest, message);
        err.body.field = (!parts.is_empty()).then(|| parts.join("."));
        err
    })
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
        // Whole numbers may be written as floats; fractions stay refused.
        let o = parse_json::<Outer>(br#"{"steps": 2.0, "controls": [{"scale": 1}]}"#).unwrap();
        assert_eq!((o.steps, o.controls[0].scale), (2, 1.0));
        let e = parse_json::<Outer>(br#"{"steps": 2.5, "controls": []}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("steps"));
    }

    #[test]
    fn backtraces_stay_in_the_log() {
        let text = "invalid request: clip_skip 8 is more than the 2 encoder layers\n   0: bt\n             at ./vendor/x.rs:1:2\n   1: run";
        assert_eq!(
            without_backtrace(text),
            "invalid request: clip_skip 8 is more than the 2 encoder layers"
        );
        assert_eq!(without_backtrace("one line"), "one line");
        let e = ApiError::from(EngineError::Invalid(text.into()));
        assert!(!e.body.error.contains("bt"), "{}", e.body.error);
        assert!(e.cause.unwrap().contains("0: bt"));
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
