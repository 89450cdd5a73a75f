//! Validation of names and settings from users: one error type, [`InvalidConfig`], whose
//! message names the field, the value given and what would be right.
//!
//! This module owns the naming rule shared by topics and groups. It performs no I/O and
//! knows nothing of the log, gRPC or Kubernetes.

/// Longest topic or group name, as Kafka's topic names.
pub const MAX_NAME_LEN: usize = 249;

/// Longest piece of an input an error message quotes, in characters: a message that
/// quoted a 10,000-character name whole would be larger than gRPC clients accept in a
/// status.
pub const MAX_QUOTED_CHARS: usize = 200;

/// `input` as an error message quotes it: whole up to [`MAX_QUOTED_CHARS`] characters,
/// else its beginning and `…`.
pub fn quote(input: &str) -> String {
    match input.char_indices().nth(MAX_QUOTED_CHARS) {
        None => input.to_owned(),
        Some((cut, _)) => format!("{}…", &input[..cut]),
    }
}

/// A name or setting that breaks a rule. A request refused with it changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidConfig {
    /// The field at fault (`partitions`, `ack_wait_ms`, `topic name`, …).
    pub field: &'static str,
    message: String,
}

impl InvalidConfig {
    /// An error about `field` with a message that names the value and the allowed range.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// The same error with `context` (e.g. the field that holds a name) in front.
    #[must_use]
    pub fn context(self, context: &str) -> Self {
        Self {
            field: self.field,
            message: format!("{context}: {}", self.message),
        }
    }
}

/// What a name names, for the rule's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
}

impl NameKind {
    fn field(self) -> &'static str {
        match self {
            Self::Topic => "topic name",
            Self::Group => "group name",
        }
    }
}

/// Checks a topic or group name against Kafka's topic-name rule (`Topic.validate` in
/// Kafka's `org.apache.kafka.common.internals`): 1 to 249 characters of `[a-zA-Z0-9._-]`,
/// and neither `.` nor `..`.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), InvalidConfig> {
    let field = kind.field();
    let bad = |why: &str| {
        // The name itself is shown only when short: a 10,000-character name would make
        // the error larger than gRPC allows in a status.
        let shown = format!("{:?}", quote(name));
        Err(InvalidConfig::new(
            field,
            format!(
                "invalid {field} {shown}: {why}; use 1 to {MAX_NAME_LEN} characters of a-z, A-Z, 0-9, '.', '_' and '-'"
            ),
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("it is {} characters long", name.len()));
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!("{c:?} is not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kafka_rules() {
        for ok in ["orders", "a", "logs.v1_app-2", &"x".repeat(249)] {
            assert!(validate_name(NameKind::Topic, ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/no",
            "ünï",
            &"x".repeat(250),
        ] {
            let err = validate_name(NameKind::Topic, bad)
                .expect_err(bad)
                .to_string();
            assert!(err.contains("invalid topic name"), "{err}");
        }
    }

    #[test]
    fn quotes_are_cut_at_200_characters() {
        assert_eq!(quote("short"), "short");
        let long = "é".repeat(250);
        let q = quote(&long);
        assert_eq!(q.chars().count(), MAX_QUOTED_CHARS + 1);
        assert!(q.ends_with('…'));
        assert_eq!(quote(&"x".repeat(200)), "x".repeat(200));
    }

    #[test]
    fn a_group_name_error_says_group_and_a_long_name_is_cut() {
        let err = validate_name(NameKind::Group, "a b").expect_err("space");
        assert_eq!(err.field, "group name");
        assert!(err.to_string().starts_with("invalid group name \"a b\""));
        let long = "y".repeat(10_000);
        let err = validate_name(NameKind::Topic, &long)
            .expect_err("too long")
            .to_string();
        assert!(err.len() < 400, "{} bytes: {err}", err.len());
        assert!(err.contains("10000 characters long"), "{err}");
    }
}
