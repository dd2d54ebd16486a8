//! Connection and subscription tokens (JWT).
//!
//! The algorithm is pinned by configuration: HS256 with the shared secret, or RS256 when a
//! public key is configured. A token signed any other way (including `none`) is invalid.
//! `exp` is optional, as in Centrifugo; when present it is enforced with no leeway. `aud` and
//! `iss` are required and checked when configured.
//!
//! Connection and subscription tokens are told apart by the `channel` claim, which only a
//! subscription token has: one is never accepted as the other (as in Centrifugo).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::TokenConfig;

#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Well signed but past `exp`: the SDK fetches a new token (error 109).
    Expired,
    /// Anything else: bad signature, wrong algorithm, malformed (disconnect 3500).
    Invalid,
}

/// Claims of a connection token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectClaims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Server-side subscriptions made at connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Server-side subscriptions with options, keyed by channel.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub subs: HashMap<String, SubOptions>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Claims of a subscription token (for protected channels).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscribeClaims {
    pub sub: String,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// What a connection token is decoded as: its claims, and whether it has a `channel`
/// claim, which makes it a subscription token.
#[derive(Deserialize)]
struct ConnectToken {
    #[serde(flatten)]
    claims: ConnectClaims,
    #[serde(default)]
    channel: Option<serde::de::IgnoredAny>,
}

pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// Builds the verifier; `hmac_secret` is the effective secret (configured or generated).
    pub fn new(cfg: &TokenConfig, hmac_secret: &str) -> anyhow::Result<Self> {
        let (key, alg) = if !cfg.rsa_public_key.is_empty() {
            let pem = if cfg.rsa_public_key.contains("-----BEGIN") {
                cfg.rsa_public_key.clone().into_bytes()
            } else {
                std::fs::read(&cfg.rsa_public_key).map_err(|e| {
                    anyhow::anyhow!("cannot read RSA public key {}: {e}", cfg.rsa_public_key)
                })?
            };
            (DecodingKey::from_rsa_pem(&pem)?, Algorithm::RS256)
        } else {
            (
                DecodingKey::from_secret(hmac_secret.as_bytes()),
                Algorithm::HS256,
            )
        };
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_aud = !cfg.audience.is_empty();
        if !cfg.audience.is_empty() {
            validation.set_audience(&[&cfg.audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&[&cfg.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(TokenVerifier { key, validation })
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        match jsonwebtoken::decode::<T>(token, &self.key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(TokenError::Expired),
            Err(_) => Err(TokenError::Invalid),
        }
    }

    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        let token: ConnectToken = self.decode(token)?;
        if token.claims.sub.is_empty() || token.channel.is_some() {
            return Err(TokenError::Invalid);
        }
        Ok(token.claims)
    }

    pub fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        self.decode(token)
    }
}

/// Signs HS256 tokens with the shared secret (the `token` CLI command and tests).
pub fn sign_hs256<T: Serialize>(secret: &str, claims: &T) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(&TokenConfig::default(), "s3cret").unwrap()
    }

    #[test]
    fn accepts_valid_and_rejects_expired_forged_and_none() {
        let v = verifier();
        let claims = ConnectClaims {
            sub: "42".into(),
            exp: Some(now_secs() + 60),
            ..Default::default()
        };
        assert_eq!(
            v.verify_connect(&sign_hs256("s3cret", &claims))
                .unwrap()
                .sub,
            "42"
        );
        let expired = ConnectClaims {
            exp: Some(now_secs() - 1),
            ..claims.clone()
        };
        assert_eq!(
            v.verify_connect(&sign_hs256("s3cret", &expired))
                .unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            v.verify_connect(&sign_hs256("other", &claims)).unwrap_err(),
            TokenError::Invalid
        );
        // alg "none": header {"alg":"none","typ":"JWT"}, claims {"sub":"42"}, empty signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI0MiJ9.";
        assert_eq!(v.verify_connect(none).unwrap_err(), TokenError::Invalid);
        assert_eq!(
            v.verify_connect("garbage").unwrap_err(),
            TokenError::Invalid
        );
    }

    #[test]
    fn connection_and_subscription_tokens_are_not_interchangeable() {
        let v = verifier();
        let sub = sign_hs256(
            "s3cret",
            &SubscribeClaims {
                sub: "42".into(),
                channel: "news".into(),
                ..Default::default()
            },
        );
        assert_eq!(v.verify_subscribe(&sub).unwrap().channel, "news");
        assert_eq!(v.verify_connect(&sub).unwrap_err(), TokenError::Invalid);
        let conn = sign_hs256(
            "s3cret",
            &ConnectClaims {
                sub: "42".into(),
                ..Default::default()
            },
        );
        assert_eq!(v.verify_connect(&conn).unwrap().sub, "42");
        assert_eq!(v.verify_subscribe(&conn).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let cfg = TokenConfig {
            audience: "app".into(),
            issuer: "me".into(),
            ..Default::default()
        };
        let v = TokenVerifier::new(&cfg, "k").unwrap();
        let mut claims = serde_json::json!({"sub": "1", "aud": "app", "iss": "me"});
        assert!(v.verify_connect(&sign_hs256("k", &claims)).is_ok());
        claims["aud"] = "other".into();
        assert_eq!(
            v.verify_connect(&sign_hs256("k", &claims)).unwrap_err(),
            TokenError::Invalid
        );
    }
}
