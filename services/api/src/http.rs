//! The router, authentication and JSON errors.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::keys::Scope;
use crate::{control, events, invoice, portal, usage, wallets, AppState};

/// The JSON body of every error: a stable machine-readable `code` and a message for humans.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `unauthorized`, `forbidden`, `bad_request`, `payload_too_large`,
    /// `unsupported_media_type`, `rate_limited`, `overloaded`, `conflict`, `unavailable`.
    pub code: &'static str,
    pub message: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after_secs: None }
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    /// A request body as JSON, or 400 naming what is wrong with it.
    pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Self> {
        serde_json::from_slice(body).map_err(|e| Self::bad_request(format!("invalid body: {e}")))
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }
    pub fn too_many(code: &'static str, m: impl Into<String>, retry_after_secs: u64) -> Self {
        Self { retry_after_secs: Some(retry_after_secs.max(1)), ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, m) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message } };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_secs {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "meterflow API", description = "Usage ingest (meterflow JSON, CloudEvents 1.0 as OpenMeter takes them), wallet top-ups, balances, real-time balances and entitlement checks, usage queries, invoice previews, customer pages."),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail, Scope))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("mf_<key_id>_<secret>").build()),
        );
    }
}

fn parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::ingest))
        .routes(routes!(wallets::adjust))
        .routes(routes!(wallets::balance))
        .routes(routes!(control::customer_balance))
        .routes(routes!(control::check))
        .routes(routes!(usage::get_usage))
        .routes(routes!(invoice::get_invoice))
        .routes(routes!(portal::create_token))
        .routes(routes!(portal::page))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
        .split_for_parts()
}

/// The OpenAPI document, generated from the handlers' annotations. The router is built from
/// the same annotations ([`router`]), so a route cannot exist undocumented.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

/// The API's router, `/openapi.json` included.
pub fn router(state: AppState) -> Router {
    let (r, doc) = parts();
    let doc = std::sync::Arc::new(doc);
    r.route("/openapi.json", axum::routing::get(move || std::future::ready(Json(doc.as_ref().clone()))))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Request counts and latency per matched route (bounded: the route templates).
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics::counter!(crate::metrics::REQUESTS, "route" => route.clone(), "status" => resp.status().as_u16().to_string()).increment(1);
    metrics::histogram!(crate::metrics::REQUEST_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
    resp
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: API keys loaded from ClickHouse.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "ready", body = String),
    (status = 503, description = "API keys not loaded yet", body = String)))]
async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", body = String)))]
async fn metrics_text() -> String {
    meterflow_runtime::http::prometheus().render()
}
