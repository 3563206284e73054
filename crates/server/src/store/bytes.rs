//! Serde helpers: byte strings (ciphertext, wrapped keys) as base64 text, for records that travel on the
//! cluster bus (`#[serde(with = "bytes")]`, `#[serde(with = "bytes::option")]`).

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serializer};

/// Serializes bytes as unpadded standard base64.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD_NO_PAD.encode(bytes))
}

/// Deserializes unpadded standard base64.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    STANDARD_NO_PAD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
}

/// The same for `Option<Vec<u8>>` (`null` for `None`).
pub mod option {
    use super::*;

    /// Serializes `Some(bytes)` as base64, `None` as `null`.
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    /// Deserializes base64 or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        text.map(|t| STANDARD_NO_PAD.decode(t.as_bytes()).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct R {
        #[serde(with = "super")]
        a: Vec<u8>,
        #[serde(with = "super::option")]
        b: Option<Vec<u8>>,
    }

    #[test]
    fn round_trips() {
        for r in [R { a: vec![0, 255, 7], b: None }, R { a: vec![], b: Some(vec![1, 2, 3, 4]) }] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<R>(&text).unwrap(), r);
        }
    }
}
