//! The tokens file: one JSON object per line, `{"user_id","device_id","token"}`, as written by
//! `chatsync sessions issue-bulk` and by each peer's `issue-bulk`. Blank lines and lines starting
//! with `#` are skipped; extra fields are ignored.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// One session: who it is, on which device, and the bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Credential {
    /// The user the session belongs to.
    pub user_id: String,
    /// Sent as `X-Device-Id`.
    pub device_id: String,
    /// Sent as `Authorization: Bearer`.
    pub token: String,
}

/// All sessions of one user, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserGroup {
    /// The user.
    pub user_id: String,
    /// Its sessions (devices), in file order.
    pub devices: Vec<Credential>,
}

/// Parses the text of a tokens file. Errors name the 1-based line.
pub fn parse(text: &str) -> Result<Vec<Credential>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cred: Credential = serde_json::from_str(line)
            .with_context(|| format!("tokens line {}: expected {{\"user_id\",\"device_id\",\"token\"}}", i + 1))?;
        if cred.token.is_empty() {
            bail!("tokens line {}: empty token", i + 1);
        }
        out.push(cred);
    }
    Ok(out)
}

/// Reads and parses a tokens file; an empty file is an error.
pub fn load(path: &Path) -> Result<Vec<Credential>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read tokens file {}", path.display()))?;
    let creds = parse(&text)?;
    if creds.is_empty() {
        bail!("tokens file {} holds no sessions", path.display());
    }
    Ok(creds)
}

/// Groups sessions by `user_id`, users in order of first appearance, devices in file order.
pub fn group_by_user(creds: &[Credential]) -> Vec<UserGroup> {
    let mut index = std::collections::HashMap::new();
    let mut groups: Vec<UserGroup> = Vec::new();
    for c in creds {
        let i = *index.entry(c.user_id.clone()).or_insert_with(|| {
            groups.push(UserGroup { user_id: c.user_id.clone(), devices: Vec::new() });
            groups.len() - 1
        });
        groups[i].devices.push(c.clone());
    }
    groups
}

/// `user_id` reduced to the characters allowed in a chat id (`[A-Za-z0-9_-]`), at most `max` long.
pub fn id_safe(user_id: &str, max: usize) -> String {
    user_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_skips_blanks_and_comments() {
        let text = "# header\n{\"user_id\":\"u0\",\"device_id\":\"u0-d0\",\"token\":\"t0\"}\n\n\
                    {\"user_id\":\"u0\",\"device_id\":\"u0-d1\",\"token\":\"t1\",\"extra\":1}\n";
        let creds = parse(text).unwrap();
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[1].device_id, "u0-d1");
        assert_eq!(creds[1].token, "t1");
    }

    #[test]
    fn bad_line_names_its_number() {
        let err = parse("{\"user_id\":\"u\",\"device_id\":\"d\",\"token\":\"t\"}\n{\"user_id\":1}\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        assert!(parse("{\"user_id\":\"u\",\"device_id\":\"d\",\"token\":\"\"}").is_err());
    }

    #[test]
    fn groups_by_user_in_first_appearance_order() {
        let c = |u: &str, d: &str| Credential { user_id: u.into(), device_id: d.into(), token: format!("t-{d}") };
        let groups = group_by_user(&[c("b", "b0"), c("a", "a0"), c("b", "b1")]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].user_id, "b");
        assert_eq!(groups[0].devices.len(), 2);
        assert_eq!(groups[1].devices[0].device_id, "a0");
    }

    #[test]
    fn id_safe_replaces_and_truncates() {
        assert_eq!(id_safe("user@example.com", 64), "user_example_com");
        assert_eq!(id_safe("abcdef", 3), "abc");
    }
}
