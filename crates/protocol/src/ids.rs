//! Validated identifiers. Deserializing one checks its length and alphabet, so a handler never sees a
//! malformed id and the error names the field (PROTOCOL.md section 5).

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $allowed:expr, $what:expr, $pattern:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted id, in bytes (all accepted characters are ASCII).
            pub const MAX_LEN: usize = $max;

            /// Validates `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let s = s.into();
                let ok = !s.is_empty() && s.len() <= $max && s.bytes().all($allowed);
                if ok {
                    Ok($name(s))
                } else {
                    Err(format!(concat!("must be 1-{} characters of ", $what), $max))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        /// The JSON Schema says what [`$name::new`] checks: length and alphabet.
        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "description": concat!("1-", stringify!($max), " characters of ", $what, "."),
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "pattern": $pattern,
                })
            }
        }
    };
}

id_type!(
    /// A chat id, chosen by the client: 1–64 characters of `[A-Za-z0-9_-]`.
    ChatId,
    64,
    |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
    "[A-Za-z0-9_-]",
    "^[A-Za-z0-9_-]+$"
);

id_type!(
    /// A message id, unique per chat: 1–128 characters of `[A-Za-z0-9_.:-]`.
    MessageId,
    128,
    |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'),
    "[A-Za-z0-9_.:-]",
    "^[A-Za-z0-9_.:-]+$"
);

id_type!(
    /// A stream id (SERVER_API.md section 4), chosen by the backend: 1–128 characters of
    /// `[A-Za-z0-9_.:-]` (the message id rules).
    StreamId,
    128,
    |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'),
    "[A-Za-z0-9_.:-]",
    "^[A-Za-z0-9_.:-]+$"
);

id_type!(
    /// A request id, echoed on replies: 1–64 printable ASCII characters.
    RequestId,
    64,
    |b: u8| b.is_ascii_graphic() || b == b' ',
    "printable ASCII",
    "^[\\x20-\\x7E]+$"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_id_alphabet_and_length() {
        assert!(ChatId::new("abc_DEF-123").is_ok());
        assert!(ChatId::new("").is_err());
        assert!(ChatId::new("a".repeat(64)).is_ok());
        assert!(ChatId::new("a".repeat(65)).is_err());
        assert!(ChatId::new("a b").is_err());
        assert!(ChatId::new("a.b").is_err());
        assert!(ChatId::new("é").is_err());
    }

    #[test]
    fn message_id_alphabet_and_length() {
        assert!(MessageId::new("m:1.2_3-4").is_ok());
        assert!(MessageId::new("a".repeat(128)).is_ok());
        assert!(MessageId::new("a".repeat(129)).is_err());
        assert!(MessageId::new("a/b").is_err());
    }

    #[test]
    fn request_id_is_printable_ascii() {
        assert!(RequestId::new("req 1").is_ok());
        assert!(RequestId::new("a".repeat(65)).is_err());
        assert!(RequestId::new("tab\there").is_err());
    }
}
