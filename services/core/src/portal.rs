//! Customer-page tokens: short-lived bearer links to one tenant's page (`GET /portal/{token}`),
//! like OpenMeter's portal tokens, created with an admin key and handed to the customer.
//!
//! A token is `mfp1_<hex(tenant)>_<expires_at_ms>_<hex(tag)>`, where the tag is the deployment
//! record key's truncated HMAC-SHA256 ([`crate::auth`]) over [`PURPOSE_PORTAL`], the tenant and
//! the expiry. Why stateless: checking one costs a MAC and no lookup, nothing has to be stored
//! or cleaned up, and the short lifetime ([`MAX_TTL_MS`] at most) stands in for revocation
//! (rotating the record key revokes every token at once). Only characters safe in a URL path
//! segment are used. The tenant is hex so that any tenant name round-trips unambiguously.

use crate::auth::{self, RecordKey};

/// Purpose of a portal token's tag: a tag made for another kind of record never verifies.
pub const PURPOSE_PORTAL: &[u8] = b"meterflow.portal.v1";
/// Longest lifetime a token may be given: 24 hours.
pub const MAX_TTL_MS: i64 = 86_400_000;
const PREFIX: &str = "mfp1";

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalClaims {
    pub tenant: String,
    pub expires_at_ms: i64,
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a portal token")]
    Malformed,
    #[error("the token's signature is not valid")]
    Forged,
    #[error("the token has expired")]
    Expired,
}

impl TokenError {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed | Self::Forged => "invalid",
            Self::Expired => "expired",
        }
    }
}

fn parts(tenant: &str, expires_at_ms: i64) -> [Vec<u8>; 3] {
    [PURPOSE_PORTAL.to_vec(), tenant.as_bytes().to_vec(), expires_at_ms.to_string().into_bytes()]
}

/// A token for `tenant` valid until `expires_at_ms`.
pub fn issue(key: &RecordKey, tenant: &str, expires_at_ms: i64) -> String {
    let p = parts(tenant, expires_at_ms);
    let tag = auth::sign(key, &[&p[0], &p[1], &p[2]]);
    format!("{PREFIX}_{}_{expires_at_ms}_{}", hex::encode(tenant), hex::encode(tag))
}

/// The claims of `token` if it was issued with `key` and is still valid at `now_ms`. The
/// signature is checked before the expiry, so a forged token is never reported as expired.
pub fn verify(key: &RecordKey, token: &str, now_ms: i64) -> Result<PortalClaims, TokenError> {
    let mut it = token.split('_');
    let (Some(PREFIX), Some(tenant_hex), Some(expiry), Some(tag_hex), None) = (it.next(), it.next(), it.next(), it.next(), it.next()) else {
        return Err(TokenError::Malformed);
    };
    let tenant = hex::decode(tenant_hex).ok().and_then(|b| String::from_utf8(b).ok()).ok_or(TokenError::Malformed)?;
    // Canonical decimal only, so one expiry has one spelling and one tag.
    if expiry.is_empty() || expiry.starts_with('0') || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed);
    }
    let expires_at_ms: i64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
    let tag = hex::decode(tag_hex).map_err(|_| TokenError::Malformed)?;
    let p = parts(&tenant, expires_at_ms);
    if !auth::verify(key, &[&p[0], &p[1], &p[2]], &tag) {
        return Err(TokenError::Forged);
    }
    if now_ms >= expires_at_ms {
        return Err(TokenError::Expired);
    }
    Ok(PortalClaims { tenant, expires_at_ms })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(b: u8) -> RecordKey {
        RecordKey::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn issue_verify_expire_and_forge() {
        let k = key(1);
        let t = issue(&k, "tenant-001", 2_000);
        assert!(t.starts_with("mfp1_74656e616e742d303031_2000_"), "{t}");
        assert_eq!(verify(&k, &t, 1_999), Ok(PortalClaims { tenant: "tenant-001".into(), expires_at_ms: 2_000 }));
        assert_eq!(verify(&k, &t, 2_000), Err(TokenError::Expired));
        assert_eq!(verify(&key(2), &t, 0), Err(TokenError::Forged), "another deployment's key");
        // Another tenant or a later expiry under the same tag.
        let other = t.replacen("74656e616e742d303031", "74656e616e742d303032", 1);
        assert_eq!(verify(&k, &other, 0), Err(TokenError::Forged));
        assert_eq!(verify(&k, &t.replacen("_2000_", "_9000_", 1), 0), Err(TokenError::Forged));
        // A tag made for another purpose over the same bytes does not pass.
        let foreign = auth::sign(&k, &[auth::PURPOSE_AGGREGATE, b"tenant-001", b"2000"]);
        assert_eq!(verify(&k, &format!("mfp1_74656e616e742d303031_2000_{}", hex::encode(foreign)), 0), Err(TokenError::Forged));
        for bad in ["", "mfp1", "mfp2_00_1_00", "mfp1_zz_1_00", "mfp1_61_01_00", "mfp1_61_-1_00", "mfp1_61_1_00_00", &t[..t.len() - 1]] {
            assert!(matches!(verify(&k, bad, 0), Err(TokenError::Malformed | TokenError::Forged)), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_tenant_round_trips_and_any_change_is_refused(tenant in "\\PC{1,40}", expiry in 1i64..i64::MAX, flip in 0usize..200) {
            let k = key(7);
            let t = issue(&k, &tenant, expiry);
            prop_assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            prop_assert_eq!(verify(&k, &t, expiry - 1), Ok(PortalClaims { tenant: tenant.clone(), expires_at_ms: expiry }));
            let mut bytes = t.clone().into_bytes();
            let i = flip % bytes.len();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(bytes).unwrap();
            if changed != t {
                prop_assert!(verify(&k, &changed, expiry - 1).is_err());
            }
        }
    }
}
