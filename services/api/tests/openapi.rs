//! The OpenAPI document against the router: every documented operation is routed (neither 404
//! nor 405), nothing else is, `/openapi.json` serves the same document, and every secured
//! operation refuses a request without a key with a JSON 401. Needs no broker or ClickHouse
//! (librdkafka connects lazily; no handler here gets past authentication).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser as _;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

fn app() -> axum::Router {
    let meters = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/meters.toml");
    let catalog = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/catalog.toml");
    let cfg = meterflow_api::Config::try_parse_from(["meterflow-api", "--meters", meters, "--catalog", catalog]).expect("config");
    meterflow_api::router(meterflow_api::AppState::from_config(&cfg).expect("state"))
}

fn operations(doc: &utoipa::openapi::OpenApi) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [("GET", &item.get), ("POST", &item.post), ("PUT", &item.put), ("DELETE", &item.delete), ("PATCH", &item.patch)] {
            if op.is_some() {
                out.insert((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

async fn call(app: &axum::Router, method: &str, path: &str) -> (StatusCode, Vec<u8>) {
    let req = Request::builder().method(method).uri(path).header("content-type", "application/json").body(Body::from("{}")).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn document_matches_router() {
    let doc = meterflow_api::openapi();
    let expected: BTreeSet<(String, String)> = [
        ("POST", "/v1/events"),
        ("POST", "/v1/wallets/{tenant}/adjustments"),
        ("GET", "/v1/wallets/{tenant}"),
        ("GET", "/v1/customers/{tenant}/balance"),
        ("POST", "/v1/entitlements/check"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/customers/{tenant}/invoice"),
        ("POST", "/v1/portal/tokens"),
        ("GET", "/portal/{token}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(operations(&doc), expected);
    let app = app();

    for (method, path) in operations(&doc) {
        let concrete = path.replace("{tenant}", "tenant-001");
        let (status, body) = call(&app, &method, &concrete).await;
        assert!(status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {status}");
        let item = &doc.paths.paths[&path];
        let op = match method.as_str() {
            "GET" => item.get.as_ref(),
            _ => item.post.as_ref(),
        }
        .unwrap();
        if op.security.is_some() {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} without a key");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "unauthorized", "{method} {path}: {v}");
            assert!(op.responses.responses.contains_key("401"), "{method} {path} documents its 401");
        }
        // Whatever the handler answered is documented.
        assert!(op.responses.responses.contains_key(status.as_str()) || status == StatusCode::SERVICE_UNAVAILABLE, "{method} {path}: {status} undocumented");
        // The other methods are not routed.
        for other in ["GET", "POST", "PUT", "DELETE"] {
            if !operations(&doc).contains(&(other.to_owned(), path.clone())) {
                let (s, _) = call(&app, other, &concrete).await;
                assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{other} {path}");
            }
        }
    }
    for undocumented in ["/v1/customers/tenant-001", "/v1/events/x", "/api/v1/events", "/v1/wallets"] {
        assert_eq!(call(&app, "GET", undocumented).await.0, StatusCode::NOT_FOUND, "{undocumented}");
    }
    let ingest = doc.paths.paths["/v1/events"].post.as_ref().unwrap();
    for code in ["202", "400", "401", "403", "413", "415", "429", "503"] {
        assert!(ingest.responses.responses.contains_key(code), "POST /v1/events documents {code}");
    }

    // /openapi.json is this document.
    let (status, body) = call(&app, "GET", "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, serde_json::to_value(&doc).unwrap());
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[tokio::test]
async fn not_ready_until_keys_are_loaded() {
    let app = app();
    assert_eq!(call(&app, "GET", "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(call(&app, "GET", "/healthz").await.0, StatusCode::OK);
}
