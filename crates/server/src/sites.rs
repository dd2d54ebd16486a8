//! Multi-site: several websites share one deployment. Each site has allowed origins and a
//! site key with which its backend mints connection tokens for its own users
//! (`POST /v1/sites/{id}/tokens`, see [`crate::rest::sites`]).
//!
//! This module holds what the REST handlers and the WebSocket upgrade share: the node's
//! cached set of site origins (so an upgrade never queries the database), site keys, origin
//! normalization, and the usernames given to site users.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use switchboard_store::{Site, Store, StoreError};

use crate::accounts::USERNAME_LEN;

/// The origins of every site, lower-cased. Replaced whole when sites change.
#[derive(Default)]
pub struct SiteOrigins {
    set: RwLock<Arc<HashSet<String>>>,
}

impl SiteOrigins {
    /// The current set (cheap: an `Arc` clone).
    pub fn get(&self) -> Arc<HashSet<String>> {
        self.set.read().expect("site origins lock poisoned").clone()
    }

    /// Replaces the set with the origins of `sites`.
    pub fn set(&self, sites: &[Site]) {
        let set: HashSet<String> = sites
            .iter()
            .flat_map(|s| s.allowed_origins.iter())
            .map(|o| o.to_ascii_lowercase())
            .collect();
        *self.set.write().expect("site origins lock poisoned") = Arc::new(set);
    }

    /// Reloads the set from the store (at start-up, and after a site is created or changed).
    pub async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let sites = store.sites().await?;
        self.set(&sites);
        Ok(())
    }
}

/// A fresh site key (`sk_` + 32 random bytes, base64url) and the hash the store keeps.
pub fn new_site_key() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let key = format!(
        "sk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = site_key_hash(&key);
    (key, hash)
}

/// What the store keeps of a site key: its SHA-256, hex (256 random bits: nothing to
/// brute-force, as with refresh tokens).
pub fn site_key_hash(key: &str) -> String {
    crate::accounts::refresh_token_hash(key)
}

/// Checks an origin as configured for a site and returns it normalized: `scheme://host[:port]`
/// with scheme `http` or `https`, lower-cased, no path, no trailing slash.
pub fn normalize_origin(origin: &str) -> Result<String, String> {
    let o = origin.trim().to_ascii_lowercase();
    let (scheme, rest) = if let Some(rest) = o.strip_prefix("https://") {
        ("https://", rest)
    } else if let Some(rest) = o.strip_prefix("http://") {
        ("http://", rest)
    } else {
        return Err(format!(
            "origin {origin:?} must start with http:// or https://"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty()
        || rest.len() > 253
        || !rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    {
        return Err(format!(
            "origin {origin:?} must be scheme://host[:port], without a path"
        ));
    }
    Ok(format!("{scheme}{rest}"))
}

/// The username of a site user: `s{site_id}_{external_id}`, lower-cased, with characters a
/// username may not hold replaced by `-`, and cut to the username length limit. `attempt`
/// 0 is that name; on a collision (another account holds it) attempt `n > 0` ends in `-`
/// plus 8 hex digits of the external id's hash, plus `n` from the second retry on, so
/// distinct external ids whose names collide after sanitizing still get distinct names.
pub fn site_username(site_id: i64, external_id: &str, attempt: u32) -> String {
    let max = *USERNAME_LEN.end();
    let clean: String = external_id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let base = format!("s{site_id}_{clean}");
    let suffix = match attempt {
        0 => String::new(),
        1 => format!("-{}", &site_key_hash(external_id)[..8]),
        n => format!("-{}{n}", &site_key_hash(external_id)[..8]),
    };
    let keep = max.saturating_sub(suffix.len());
    let mut name: String = base.chars().take(keep).collect();
    name.push_str(&suffix);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalize() {
        assert_eq!(
            normalize_origin("HTTPS://Shop.Example/").unwrap(),
            "https://shop.example"
        );
        assert_eq!(
            normalize_origin("http://localhost:3000").unwrap(),
            "http://localhost:3000"
        );
        for bad in [
            "shop.example",
            "https://",
            "https://a/b",
            "ftp://a",
            "https://a b",
        ] {
            assert!(normalize_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usernames_are_valid_and_distinct() {
        let long = "X".repeat(100);
        for ext in ["42", "alice@example.com", long.as_str(), "ü"] {
            for attempt in 0..3 {
                let name = site_username(7, ext, attempt);
                crate::accounts::validate_username(&name).unwrap();
                assert!(name.starts_with("s7_"), "{name}");
            }
        }
        assert_eq!(site_username(3, "Bob@X", 0), "s3_bob-x");
        assert_ne!(site_username(3, "a@b", 1), site_username(3, "a#b", 1));
        assert_ne!(site_username(3, "a@b", 1), site_username(3, "a@b", 2));
    }
}
