//! JWT connection tokens (SERVER_API.md section 6): apps with their own login hand their clients a
//! short-lived JWT instead of a chatsync session token.
//!
//! The key is configured once ([`JwtVerifier::from_config`]): an HS256 secret, or a PEM public key
//! whose kind pins the algorithm (RSA: RS256 only; EC P-256: ES256 only). Any other `alg`, `none`
//! included, is refused, so a token signed with HS256 using the public key as the secret (algorithm
//! confusion) never verifies, and so is a header with `crit` (no extension is understood). Required claims: `sub` (a valid user id) and `exp`; `nbf` and `iat` are
//! checked when present; `aud` / `iss` when configured. Errors name the reason for the log, never the
//! token.

use crate::config::Config;
use anyhow::{bail, Context as _};
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest JWT accepted (an RS256 signature of a 4096-bit key alone is 683 characters); longer ones are
/// `Invalid session` without being parsed.
pub const MAX_JWT_LEN: usize = 8192;

/// Shortest HS256 secret accepted, in bytes: the size of the SHA-256 output (RFC 7518 section 3.2).
pub const MIN_HS256_SECRET_LEN: usize = 32;

/// DER of the OID of the P-256 curve (1.2.840.10045.3.1.7), as found in an EC public key's PEM.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Whether `token` has the shape of a JWT (JWS compact serialization): three base64url segments
/// separated by two dots, header and claims non-empty (the signature is empty in an unsecured
/// `alg: none` token, which is then refused by verification, and logged as such). chatsync session
/// tokens (`cs_` + base64url) never contain a dot.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    let base64url = |p: &str| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    parts.len() == 3 && !parts[0].is_empty() && !parts[1].is_empty() && parts.iter().all(|p| base64url(p))
}

/// The claims chatsync reads. Everything else in the token is ignored. `sub` and `exp` are optional
/// here only so that the library's required-claims check (which runs after this is deserialized) is
/// what reports them missing.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<u64>,
    #[serde(default)]
    device: Option<String>,
}

/// An RFC 7519 NumericDate (seconds since the epoch), which may be a non-integer number: rounded to whole
/// seconds, as the library rounds the `exp` and `nbf` it checks, so that both read the same value. A negative,
/// non-finite or non-numeric value is a malformed claim.
fn numeric_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let Some(value) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(secs) = value.as_u64() {
        return Ok(Some(secs));
    }
    match value.as_f64() {
        Some(secs) if secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64 => Ok(Some(secs.round() as u64)),
        _ => Err(serde::de::Error::custom("a NumericDate is a non-negative number of seconds")),
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user id (`sub`).
    pub user_id: String,
    /// The device id the token is bound to (`device`), if any.
    pub device_id: Option<String>,
    /// When the token stops being valid, leeway included (unix milliseconds).
    pub expires_at: i64,
}

/// Verifies connection JWTs with the configured key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material (an HMAC secret).
        f.debug_struct("JwtVerifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// The verifier the configuration asks for: `None` without `jwt_hs256_secret` or
    /// `jwt_public_key_file`. Fails (the server refuses to start) when both are set, the secret is
    /// shorter than [`MIN_HS256_SECRET_LEN`] bytes, or the key file cannot be read or is neither an RSA
    /// nor a P-256 EC public key.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<JwtVerifier>> {
        let (key, alg) = match (&config.jwt_hs256_secret, &config.jwt_public_key_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => bail!("jwt_hs256_secret and jwt_public_key_file are exclusive: configure one"),
            (Some(secret), None) => {
                // RFC 7518 section 3.2: a key of at least the hash's size MUST be used with HS256. A shorter
                // secret (a password) can be recovered offline from any one token, by brute force, and with
                // it a token forged for any user (created on its first connection).
                if secret.expose().len() < MIN_HS256_SECRET_LEN {
                    bail!(
                        "jwt_hs256_secret must be at least {MIN_HS256_SECRET_LEN} bytes (256 bits, RFC 7518 section \
                         3.2): a shorter one can be found by brute force from any token"
                    );
                }
                (DecodingKey::from_secret(secret.expose().as_bytes()), Algorithm::HS256)
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read jwt_public_key_file {}", path.display()))?;
                Self::public_key(&pem).with_context(|| format!("jwt_public_key_file {}", path.display()))?
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = config.jwt_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // No audience configured: a token's `aud` is not checked (the library would refuse any).
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(JwtVerifier { key, validation, leeway_secs: config.jwt_leeway_secs }))
    }

    /// An RSA key allows RS256 only; an EC key, ES256 only (so it must be on P-256). Only a public key
    /// (`PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`): the library would also take an RSA private key, whose
    /// bytes then verify nothing, so the server would start and refuse every token.
    fn public_key(pem: &[u8]) -> anyhow::Result<(DecodingKey, Algorithm)> {
        if !matches!(pem_label(pem), Some("PUBLIC KEY" | "RSA PUBLIC KEY")) {
            bail!("not a PEM RSA or EC (P-256) public key (a private key or a certificate is not one)");
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok((key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            if !pem_der(pem).is_some_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID)) {
                bail!("an EC key must be on the P-256 curve (ES256)");
            }
            return Ok((key, Algorithm::ES256));
        }
        bail!("not a PEM RSA or EC (P-256) public key")
    }

    /// Verifies `token` at the current time. The error says why, for the log; the client only ever
    /// learns `Invalid session`.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        if token.len() > MAX_JWT_LEN {
            return Err("token too long".into());
        }
        // RFC 7515 section 4.1.11: a recipient MUST refuse a token whose `crit` names an extension it does not
        // understand, and chatsync understands none (an empty `crit` is malformed). The library reads the
        // member and checks nothing: such a token was taken, the issuer's critical constraint ignored.
        let header = jsonwebtoken::decode_header(token).map_err(|e| describe(&e))?;
        if header.crit.is_some() {
            return Err("critical header extension (crit) not supported".into());
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| describe(&e))?;
        let claims = data.claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err("missing claim sub or exp".into());
        };
        if !crate::cli::valid_user_id(&sub) {
            return Err("sub is not a valid user id".into());
        }
        let now = jsonwebtoken::get_current_timestamp();
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(self.leeway_secs)) {
            return Err("iat is in the future".into());
        }
        let expires = exp.saturating_add(self.leeway_secs);
        let expires_at = i64::try_from(expires).ok().and_then(|s| s.checked_mul(1000)).unwrap_or(i64::MAX);
        // RFC 7519 section 4.1.4: a token is valid only *before* `exp`. The library refuses `exp < now -
        // leeway` and so took a token in the very second its `exp` (plus the leeway) names: the user was
        // created and the device recorded, and the connection closed at once with `Token expired` (the
        // connection's own rule, `now >= expires_at`). The same rule here, before anything is done.
        if crate::store::now_millis() >= expires_at {
            return Err("expired".into());
        }
        Ok(Verified { user_id: sub, device_id: claims.device, expires_at })
    }
}

/// A short, token-free description of a verification failure.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not allowed".into()
        }
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not yet valid (nbf)".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
        ErrorKind::InvalidClaimFormat(c) => format!("malformed claim {c}"),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        // serde_json messages may quote claim values, never the token itself; keep them out anyway.
        ErrorKind::Json(_) => "malformed header or claims (unknown alg, or a claim of the wrong type)".into(),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => "malformed token".into(),
        _ => "invalid token".into(),
    }
}

/// The label of the first block of a PEM document (`PUBLIC KEY` in `-----BEGIN PUBLIC KEY-----`).
fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = text.lines().map(str::trim).find(|l| l.starts_with("-----BEGIN "))?;
    begin.strip_prefix("-----BEGIN ")?.strip_suffix("-----")
}

/// The DER inside a PEM document (the first block), if it is one.
fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape_is_three_base64url_segments() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("a-_.b.c"));
        assert!(!looks_like_jwt("cs_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a..c"));
        assert!(looks_like_jwt("a.b."), "an alg none token has an empty signature");
        assert!(!looks_like_jwt("a.b+.c"));
    }
}
