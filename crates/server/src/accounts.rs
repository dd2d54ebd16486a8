//! Accounts without HTTP: input rules, argon2id password hashing off the runtime, access
//! tokens (HS256 connection JWTs) and refresh tokens, and the login rate limiter. The
//! `/v1/auth`, `/v1/users` and `/v1/admin` routes in [`crate::rest`] and the `admin create`
//! command are thin layers over this.
//!
//! - **Access tokens** are connection tokens: `sub` is the user id, signed with the node's
//!   HS256 secret, with `aud`/`iss` when `[token]` asks for them. They are stateless: logout
//!   and password changes revoke refresh tokens, and an access token lives until its `exp`.
//! - **Refresh tokens** are 32 random bytes (base64url); the store keeps only their SHA-256.
//!   Each use rotates the token; presenting an already used (revoked) token again revokes
//!   every refresh token of its user (theft detection).
//! - **Password hashing** runs on the blocking pool, at most [`Hasher`]'s number of permits at
//!   a time (argon2id needs 19 MiB per hash: this bounds memory under a login flood).

pub mod limiter;

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use sha2::Digest;
use tokio::sync::Semaphore;

use crate::auth::now_secs;
use crate::config::{AccountsConfig, Config, PasswordHashCost};
use limiter::LoginLimiter;

/// Usernames: 3 to 32 of `a-z`, `0-9`, `_`, `.`, `-` (stored lower-cased).
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;
/// Passwords: at least 8 characters; the upper bound only keeps requests sane.
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;
/// Display names: 1 to 64 characters after trimming, no control characters.
pub const DISPLAY_NAME_LEN: std::ops::RangeInclusive<usize> = 1..=64;

/// Usernames are case-insensitive: they are stored and looked up lower-cased.
pub fn normalize_username(username: &str) -> String {
    username.to_ascii_lowercase()
}

/// Checks a username as given (before normalizing).
pub fn validate_username(username: &str) -> Result<(), String> {
    let n = username.chars().count();
    if !USERNAME_LEN.contains(&n) {
        return Err(format!(
            "username must be {} to {} characters long",
            USERNAME_LEN.start(),
            USERNAME_LEN.end()
        ));
    }
    if let Some(c) = username
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "username may contain only letters a-z, digits, '_', '.' and '-' (found {c:?})"
        ));
    }
    Ok(())
}

pub fn validate_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < *PASSWORD_LEN.start() {
        return Err(format!(
            "password must be at least {} characters long",
            PASSWORD_LEN.start()
        ));
    }
    if n > *PASSWORD_LEN.end() {
        return Err(format!(
            "password must be at most {} characters long",
            PASSWORD_LEN.end()
        ));
    }
    Ok(())
}

/// Returns the display name trimmed, or what is wrong with it.
pub fn validate_display_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let n = name.chars().count();
    if !DISPLAY_NAME_LEN.contains(&n) {
        return Err(format!(
            "display_name must be {} to {} characters long",
            DISPLAY_NAME_LEN.start(),
            DISPLAY_NAME_LEN.end()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("display_name must not contain control characters".into());
    }
    Ok(name.to_string())
}

/// A fresh refresh token (32 random bytes, base64url without padding) and its hash.
pub fn new_refresh_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = refresh_token_hash(&token);
    (token, hash)
}

/// What the store keeps of a refresh token: its SHA-256, hex. (The token has 256 random
/// bits, so a plain hash is enough: there is nothing to brute-force.)
pub fn refresh_token_hash(token: &str) -> String {
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The claims of an access token: a connection token as [`crate::auth::ConnectClaims`]
/// reads it, plus `aud`/`iss` when the verifier requires them.
#[derive(Serialize)]
struct AccessClaims<'a> {
    sub: String,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    aud: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    iss: &'a str,
}

/// Argon2id hashing and verification on the blocking pool, with bounded concurrency.
pub struct Hasher {
    params: Params,
    /// Permits for hashes in flight; each argon2id hash holds `params.m_cost()` KiB.
    slots: Arc<Semaphore>,
    /// A hash verified against when the username is unknown, so that an unknown user costs
    /// as much time as a wrong password and usernames cannot be probed by timing.
    dummy: OnceLock<String>,
}

/// Failures of [`Hasher`] calls: a bug or a stored hash that is not a PHC string.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

impl Hasher {
    pub fn new(cost: PasswordHashCost) -> Hasher {
        let params = match cost {
            PasswordHashCost::Default => Params::DEFAULT,
            PasswordHashCost::Test => {
                Params::new(64, 1, 1, None).expect("valid test argon2 parameters")
            }
        };
        let permits = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2);
        Hasher {
            params,
            slots: Arc::new(Semaphore::new(permits)),
            dummy: OnceLock::new(),
        }
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    fn hash_blocking(&self, password: &str) -> Result<String, HashError> {
        let salt: [u8; 16] = rand::random();
        self.argon2()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| HashError(e.to_string()))
    }

    /// The argon2id PHC string of `password`, with a fresh random salt.
    pub async fn hash(self: &Arc<Self>, password: String) -> Result<String, HashError> {
        let me = self.clone();
        self.run(move || me.hash_blocking(&password)).await?
    }

    /// Whether `password` matches the PHC string `hash` (constant time, with the hash's own
    /// parameters). `None` for the hash means "unknown user": the same work is done against
    /// a dummy hash and the answer is false.
    pub async fn verify(
        self: &Arc<Self>,
        hash: Option<String>,
        password: String,
    ) -> Result<bool, HashError> {
        let me = self.clone();
        self.run(move || {
            // An unusable stored hash (e.g. "" for users whose app mints their tokens) is
            // treated like an unknown user: same work, never a match.
            let (hash, known) = match hash.filter(|h| h.starts_with("$argon2")) {
                Some(h) => (h, true),
                None => {
                    let dummy = match me.dummy.get() {
                        Some(d) => d.clone(),
                        None => {
                            let d = me.hash_blocking("not a password of anyone")?;
                            me.dummy.get_or_init(|| d).clone()
                        }
                    };
                    (dummy, false)
                }
            };
            let ok = me
                .argon2()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok();
            Ok(ok && known)
        })
        .await?
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| HashError(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let out = f();
            drop(permit);
            out
        })
        .await
        .map_err(|e| HashError(e.to_string()))
    }
}

/// A node's account machinery (one per [`crate::node::Node`]).
pub struct Accounts {
    pub config: AccountsConfig,
    pub hasher: Arc<Hasher>,
    pub limiter: LoginLimiter,
    /// `None` when the node verifies RS256 tokens: it cannot sign, so password login is off.
    signer: Option<EncodingKey>,
    audience: String,
    issuer: String,
    /// When expired refresh tokens were last purged (ms), to purge at most hourly.
    pub last_purge_ms: std::sync::atomic::AtomicI64,
}

impl Accounts {
    /// `hmac_secret` is the effective token secret (configured or generated).
    pub fn new(config: &Config, hmac_secret: &str) -> Accounts {
        let signer = if config.token.rsa_public_key.is_empty() {
            Some(EncodingKey::from_secret(hmac_secret.as_bytes()))
        } else {
            tracing::warn!(
                "tokens are RS256: this node cannot sign access tokens, so /v1/auth/login \
                 and /v1/auth/refresh are disabled (apps mint connection tokens themselves)"
            );
            None
        };
        let a = &config.accounts;
        if a.password_hash_cost == PasswordHashCost::Test {
            tracing::warn!("accounts.password_hash_cost = \"test\": weak password hashes, for test suites only");
        }
        Accounts {
            config: a.clone(),
            hasher: Arc::new(Hasher::new(a.password_hash_cost)),
            limiter: LoginLimiter::new(
                a.login_max_failures,
                a.login_max_failures_per_ip,
                a.login_lockout,
            ),
            signer,
            audience: config.token.audience.clone(),
            issuer: config.token.issuer.clone(),
            last_purge_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Whether this node can issue access tokens (false with RS256).
    pub fn can_sign(&self) -> bool {
        self.signer.is_some()
    }

    /// An access token for `user_id` and its lifetime in seconds; `None` if this node cannot
    /// sign (RS256).
    pub fn access_token(&self, user_id: i64) -> Option<(String, u64)> {
        self.access_token_for(user_id, self.config.access_token_ttl.as_secs())
    }

    /// An access token for `user_id` valid for `ttl` seconds (site tokens choose their own
    /// lifetime); `None` if this node cannot sign (RS256).
    pub fn access_token_for(&self, user_id: i64, ttl: u64) -> Option<(String, u64)> {
        let key = self.signer.as_ref()?;
        let now = now_secs();
        let claims = AccessClaims {
            sub: user_id.to_string(),
            exp: now + ttl,
            iat: now,
            aud: &self.audience,
            iss: &self.issuer,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, key)
            .expect("HS256 signing cannot fail");
        Some((token, ttl))
    }

    /// The expiry (ms since the epoch) of a refresh token issued now.
    pub fn refresh_expiry_ms(&self) -> i64 {
        switchboard_store::now_ms() + self.config.refresh_token_ttl.as_millis() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_rules() {
        assert!(validate_username("al").is_err());
        assert!(validate_username("alice.b-c_9").is_ok());
        assert!(validate_username(&"a".repeat(33)).is_err());
        let e = validate_username("al ice").unwrap_err();
        assert!(e.contains("' '"), "{e}");
        assert!(validate_username("éléonore").is_err());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password("12345678").is_ok());
        assert_eq!(validate_display_name("  Al  ").unwrap(), "Al");
        assert!(validate_display_name("   ").is_err());
        assert!(validate_display_name(&"x".repeat(65)).is_err());
        assert!(validate_display_name("a\u{7}b").is_err());
        assert_eq!(normalize_username("Alice"), "alice");
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let (a, ha) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(ha, refresh_token_hash(&a));
        assert_eq!(ha.len(), 64);
    }

    #[test]
    fn access_tokens_are_connection_tokens_with_aud_and_iss_when_required() {
        let mut config = Config::default();
        config.token.audience = "app".into();
        config.token.issuer = "me".into();
        let accounts = Accounts::new(&config, "secret");
        let (token, ttl) = accounts.access_token(42).unwrap();
        assert_eq!(ttl, 900);
        let verifier = crate::auth::TokenVerifier::new(&config.token, "secret").unwrap();
        let claims = verifier.verify_connect(&token).unwrap();
        assert_eq!(claims.sub, "42");
        assert!(claims.exp.unwrap() >= now_secs() + 899);
        let other = crate::auth::TokenVerifier::new(&config.token, "other").unwrap();
        assert!(other.verify_connect(&token).is_err());
        config.token.rsa_public_key = "/nonexistent.pem".into();
        assert!(Accounts::new(&config, "secret").access_token(42).is_none());
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        for cost in [PasswordHashCost::Test, PasswordHashCost::Default] {
            let h = Arc::new(Hasher::new(cost));
            let start = std::time::Instant::now();
            let hash = h.hash("correct horse".into()).await.unwrap();
            eprintln!("{cost:?}: hash in {:?}", start.elapsed());
            assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
            assert!(h
                .verify(Some(hash.clone()), "correct horse".into())
                .await
                .unwrap());
            assert!(!h.verify(Some(hash), "wrong horse".into()).await.unwrap());
            assert!(!h
                .verify(None, "not a password of anyone".into())
                .await
                .unwrap());
            assert!(!h.verify(Some(String::new()), "x".into()).await.unwrap());
        }
    }
}
