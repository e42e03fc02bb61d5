//! Who may call an endpoint. A handler names what it needs in its signature ([`Key`] of a
//! scope, or [`TenantPath`] for the `{tenant}` routes), so the check cannot be forgotten, and
//! its OpenAPI `responses` list the same type for the 401 and 403 answers it implies.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::IntoResponses;

use crate::http::ApiError;
use crate::keys::{KeyInfo, Scope};
use crate::AppState;

/// The scope an endpoint needs (admin keys have every scope).
pub trait Needs: Send + Sync + 'static {
    /// `None`: any valid key.
    const SCOPE: Option<Scope>;

    fn allows(scope: Scope) -> bool {
        Self::SCOPE.is_none_or(|needed| scope.allows(needed))
    }

    /// What a 403 says the key lacked.
    fn name() -> &'static str {
        Self::SCOPE.map_or("read, ingest or admin", Scope::as_str)
    }
}

/// `GET` endpoints of the key's tenant.
#[derive(Debug)]
pub struct Read;
impl Needs for Read {
    const SCOPE: Option<Scope> = Some(Scope::Read);
}

/// `POST /v1/events`.
#[derive(Debug)]
pub struct Ingest;
impl Needs for Ingest {
    const SCOPE: Option<Scope> = Some(Scope::Ingest);
}

/// Wallet adjustments, customer-page links, any tenant.
#[derive(Debug)]
pub struct Admin;
impl Needs for Admin {
    const SCOPE: Option<Scope> = Some(Scope::Admin);
}

/// Any valid key (entitlement checks: the service about to serve usage holds an ingest key,
/// a dashboard a read key).
#[derive(Debug)]
pub struct AnyScope;
impl Needs for AnyScope {
    const SCOPE: Option<Scope> = None;
}

/// The key behind `Authorization: Bearer <key>`, of a scope `S` allows: 401 without a
/// (known, unrevoked) key, 403 with a key of another scope.
#[derive(Debug)]
pub struct Key<S>(pub KeyInfo, pub PhantomData<S>);

impl<S: Needs> FromRequestParts<AppState> for Key<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = bearer_key(state, &parts.headers)?;
        if !S::allows(key.scope) {
            return Err(ApiError::forbidden(format!(
                "this key has scope {}; this endpoint needs {}",
                key.scope.as_str(),
                S::name()
            )));
        }
        Ok(Key(key, PhantomData))
    }
}

/// The `{tenant}` of the route, with a key of scope `S` that may act for it: its own
/// tenant's, or an admin key (403 otherwise).
#[derive(Debug)]
pub struct TenantPath<S> {
    pub key: KeyInfo,
    pub tenant: String,
    scope: PhantomData<S>,
}

impl<S: Needs> FromRequestParts<AppState> for TenantPath<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Key(key, _) = Key::<S>::from_request_parts(parts, state).await?;
        let Path(tenant) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        authorize_tenant(&key, &tenant)?;
        Ok(TenantPath { key, tenant, scope: PhantomData })
    }
}

fn bearer_key(state: &AppState, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <API key>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <API key>"))?;
    state.keys.lookup(token).ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))
}

/// `tenant` is the key's own, or the key is an admin key: 403 otherwise.
fn authorize_tenant(key: &KeyInfo, tenant: &str) -> Result<(), ApiError> {
    if key.scope == Scope::Admin || key.tenant == tenant {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("this key belongs to tenant {:?}, not {tenant:?}", key.tenant)))
    }
}

/// The tenant a request about a tenant named in its body or query is for: a tenant key's own
/// (naming another is 403), or the one an admin key names (it must name one: 400).
pub fn named_tenant(key: &KeyInfo, named: Option<&str>) -> Result<String, ApiError> {
    match (key.scope, named) {
        (Scope::Admin, Some(t)) if !t.is_empty() => Ok(t.to_owned()),
        (Scope::Admin, _) => Err(ApiError::bad_request("an admin key must name the tenant")),
        (_, Some(t)) => authorize_tenant(key, t).map(|()| t.to_owned()),
        (_, None) => Ok(key.tenant.clone()),
    }
}

fn error_responses(forbidden: String) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    let answer = |description: String| {
        let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
        RefOr::T(ResponseBuilder::new().description(description).content("application/json", body).build())
    };
    BTreeMap::from([
        ("401".to_owned(), answer("no or unknown API key".to_owned())),
        ("403".to_owned(), answer(forbidden)),
    ])
}

impl<S: Needs> IntoResponses for Key<S> {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(format!("a key without {} scope", S::name()))
    }
}

impl<S: Needs> IntoResponses for TenantPath<S> {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(format!("a key of another tenant, or without {} scope", S::name()))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn key(tenant: &str, scope: Scope) -> KeyInfo {
        KeyInfo { key_id: "k".into(), tenant: tenant.into(), scope }
    }

    #[test]
    fn named_tenant_of_each_scope() {
        assert_eq!(named_tenant(&key("a", Scope::Read), None).unwrap(), "a");
        assert_eq!(named_tenant(&key("a", Scope::Ingest), Some("a")).unwrap(), "a");
        assert_eq!(named_tenant(&key("a", Scope::Read), Some("b")).unwrap_err().status, StatusCode::FORBIDDEN);
        assert_eq!(named_tenant(&key("", Scope::Admin), Some("b")).unwrap(), "b");
        assert_eq!(named_tenant(&key("", Scope::Admin), None).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(named_tenant(&key("", Scope::Admin), Some("")).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn scopes_allow_as_documented() {
        assert!(Read::allows(Scope::Read) && Read::allows(Scope::Admin) && !Read::allows(Scope::Ingest));
        assert!(Ingest::allows(Scope::Ingest) && !Ingest::allows(Scope::Read));
        assert!(Admin::allows(Scope::Admin) && !Admin::allows(Scope::Read) && !Admin::allows(Scope::Ingest));
        assert!([Scope::Read, Scope::Ingest, Scope::Admin].into_iter().all(AnyScope::allows));
    }

    #[test]
    fn documented_errors_name_the_scope() {
        let r = <TenantPath<Read> as IntoResponses>::responses();
        assert_eq!(r.keys().collect::<Vec<_>>(), ["401", "403"]);
        let RefOr::T(forbidden) = &r["403"] else { panic!("inline response") };
        assert_eq!(forbidden.description, "a key of another tenant, or without read scope");
    }
}
