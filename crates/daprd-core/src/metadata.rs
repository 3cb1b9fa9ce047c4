//! Component and request metadata: string properties looked up case-insensitively,
//! with Dapr's loose typing for booleans, integers and durations.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::duration::parse_go_duration;

/// A metadata property that has the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metadata field {field:?}: {problem}")]
pub struct MetadataError {
    /// The property name, as the user wrote it.
    pub field: String,
    /// What is wrong with the value.
    pub problem: String,
}

impl MetadataError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Component metadata: name → string value. Names keep the user's spelling;
/// [`Metadata::get`] matches them case-insensitively, as Dapr's components do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    props: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing any property whose name matches case-insensitively.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        if let Some(existing) = self.key_of(&name).map(str::to_string) {
            self.props.remove(&existing);
        }
        self.props.insert(name, value.into());
    }

    fn key_of(&self, name: &str) -> Option<&str> {
        if self.props.contains_key(name) {
            return Some(self.props.get_key_value(name)?.0.as_str());
        }
        self.props
            .keys()
            .find(|k| k.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }

    /// The value of `name` (case-insensitive), if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        let key = self.key_of(name)?;
        self.props.get(key).map(String::as_str)
    }

    /// The value of `name`, if present and not blank after trimming.
    pub fn get_non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// A boolean property; absent or blank gives `default`.
    ///
    /// # Errors
    /// [`MetadataError`] when the value is not one of Go's `ParseBool` spellings or Dapr's
    /// truthy words (`yes`, `y`, `on`, `no`, `n`, `off`).
    pub fn get_bool(&self, name: &str, default: bool) -> Result<bool, MetadataError> {
        match self.get_non_empty(name) {
            None => Ok(default),
            Some(v) => parse_loose_bool(v)
                .ok_or_else(|| MetadataError::new(name, format!("{v:?} is not a boolean"))),
        }
    }

    /// An integer property; absent or blank gives `default`.
    ///
    /// # Errors
    /// [`MetadataError`] when the value is not an integer.
    pub fn get_i64(&self, name: &str, default: i64) -> Result<i64, MetadataError> {
        match self.get_non_empty(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| MetadataError::new(name, format!("{v:?} is not an integer"))),
        }
    }

    /// A duration property: a Go duration (`"5s"`) or a bare integer in `bare_unit`s.
    ///
    /// # Errors
    /// [`MetadataError`] when the value is neither.
    pub fn get_duration(
        &self,
        name: &str,
        bare_unit: Duration,
        default: Duration,
    ) -> Result<Duration, MetadataError> {
        match self.get_non_empty(name) {
            None => Ok(default),
            Some(v) => {
                if let Ok(n) = v.parse::<u64>() {
                    return Ok(bare_unit * u32::try_from(n).unwrap_or(u32::MAX));
                }
                parse_go_duration(v)
                    .map_err(|_| MetadataError::new(name, format!("{v:?} is not a duration")))
            }
        }
    }

    /// Metadata from `(name, value)` pairs (handy in tests and examples).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Iterates over (name, value) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.props.len()
    }

    /// True when there are no properties.
    pub fn is_empty(&self) -> bool {
        self.props.is_empty()
    }

    /// Mutable access to each value (for placeholder substitution).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.props.values_mut()
    }

    /// The properties as a plain map.
    pub fn into_map(self) -> BTreeMap<String, String> {
        self.props
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        let mut md = Metadata::new();
        for (k, v) in iter {
            md.insert(k, v);
        }
        md
    }
}

/// Reads typed properties from component metadata, collecting every problem instead of
/// stopping at the first; each getter returns its default when the value is bad.
pub struct MetadataReader<'a> {
    md: &'a Metadata,
    errors: Vec<MetadataError>,
}

impl<'a> MetadataReader<'a> {
    /// A reader over `md`.
    pub fn new(md: &'a Metadata) -> Self {
        Self {
            md,
            errors: Vec::new(),
        }
    }

    /// The metadata being read.
    pub fn md(&self) -> &'a Metadata {
        self.md
    }

    /// Records a problem with `field`.
    pub fn fail(&mut self, field: &str, problem: impl Into<String>) {
        self.errors.push(MetadataError::new(field, problem));
    }

    /// A non-blank string, or a "is required" problem (with `hint`) and "".
    pub fn required(&mut self, key: &str, hint: &str) -> String {
        match self.md.get_non_empty(key) {
            Some(v) => v.to_string(),
            None => {
                self.fail(key, format!("is required{hint}"));
                String::new()
            }
        }
    }

    /// A boolean ([`Metadata::get_bool`]).
    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        self.md.get_bool(key, default).unwrap_or_else(|e| {
            self.errors.push(e);
            default
        })
    }

    /// An integer within `range`.
    pub fn int(&mut self, key: &str, default: i64, range: std::ops::RangeInclusive<i64>) -> i64 {
        match self.md.get_i64(key, default) {
            Ok(v) if range.contains(&v) => v,
            Ok(v) => {
                self.fail(
                    key,
                    format!("{v} is outside {}..={}", range.start(), range.end()),
                );
                default
            }
            Err(e) => {
                self.errors.push(e);
                default
            }
        }
    }

    /// A duration ([`Metadata::get_duration`]: Go duration or a bare number of `bare_unit`).
    pub fn duration(&mut self, key: &str, bare_unit: Duration, default: Duration) -> Duration {
        self.md
            .get_duration(key, bare_unit, default)
            .unwrap_or_else(|e| {
                self.errors.push(e);
                default
            })
    }

    /// A Go duration string only (`"30s"`); absent → `None`.
    pub fn go_duration(&mut self, key: &str) -> Option<Duration> {
        let v = self.md.get_non_empty(key)?;
        match parse_go_duration(v) {
            Ok(d) => Some(d),
            Err(_) => {
                self.fail(key, format!("{v:?} is not a duration such as \"30s\""));
                None
            }
        }
    }

    /// One of `allowed` (compared as written; absent → `default`).
    pub fn one_of(&mut self, key: &str, default: &str, allowed: &[&str]) -> String {
        match self.md.get_non_empty(key) {
            None => default.to_string(),
            Some(v) if allowed.contains(&v) => v.to_string(),
            Some(v) => {
                self.fail(key, format!("{v:?} is not one of {}", allowed.join(", ")));
                default.to_string()
            }
        }
    }

    /// A problem for each of `keys` that is set: `what` is not supported yet.
    pub fn unsupported(&mut self, keys: &[&str], what: &str) {
        for key in keys {
            if self.md.get_non_empty(key).is_some() {
                self.fail(key, format!("{what} is not supported yet by daprd-rs"));
            }
        }
    }

    /// `value` when nothing was wrong, else every problem.
    ///
    /// # Errors
    /// Every problem recorded.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<MetadataError>> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(self.errors)
        }
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Dapr's loose boolean: Go's `ParseBool` spellings plus yes/y/on and no/n/off, any case.
pub fn parse_loose_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "y" | "yes" | "on" => Some(true),
        "0" | "f" | "false" | "n" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn lookup_is_case_insensitive() {
        let m = md(&[("redisHost", "localhost:6379")]);
        assert_eq!(m.get("REDISHOST"), Some("localhost:6379"));
        assert_eq!(m.get("redishost"), Some("localhost:6379"));
        assert_eq!(m.get("other"), None);
    }

    #[test]
    fn insert_replaces_other_spelling() {
        let mut m = md(&[("consumerID", "a")]);
        m.insert("consumerid", "b");
        assert_eq!(m.len(), 1);
        assert_eq!(m.get("ConsumerId"), Some("b"));
    }

    #[test]
    fn loose_typing() {
        let m = md(&[
            ("a", "yes"),
            ("b", "0"),
            ("c", "maybe"),
            ("d", "42"),
            ("e", "1m"),
            ("f", "15"),
        ]);
        assert!(m.get_bool("a", false).unwrap());
        assert!(!m.get_bool("b", true).unwrap());
        assert_eq!(m.get_bool("c", true).unwrap_err().field, "c");
        assert!(m.get_bool("zz", true).unwrap());
        assert_eq!(m.get_i64("d", 0).unwrap(), 42);
        assert!(m.get_i64("a", 0).is_err());
        let ms = Duration::from_millis(1);
        assert_eq!(
            m.get_duration("e", ms, Duration::ZERO).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            m.get_duration("f", ms, Duration::ZERO).unwrap(),
            Duration::from_millis(15)
        );
        assert!(m.get_duration("a", ms, Duration::ZERO).is_err());
    }

    #[test]
    fn reader_collects_every_problem_and_returns_defaults() {
        let m = md(&[
            ("b", "maybe"),
            ("i", "9"),
            ("d", "soon"),
            ("k", "x"),
            ("tls", "on"),
        ]);
        let mut r = MetadataReader::new(&m);
        assert!(r.bool("b", true));
        assert_eq!(r.int("i", 1, 0..=5), 1);
        assert_eq!(r.go_duration("d"), None);
        assert_eq!(r.one_of("k", "a", &["a", "b"]), "a");
        assert_eq!(r.required("missing", ""), "");
        r.unsupported(&["tls", "other"], "TLS");
        let errs = r.finish(|| ()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["b", "i", "d", "k", "missing", "tls"]);
        assert!(MetadataReader::new(&m).finish(|| 7).is_ok());
    }

    #[test]
    fn go_parse_bool_is_strict() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("tRUE"), None);
        assert_eq!(parse_go_bool("yes"), None);
        assert_eq!(parse_go_bool("F"), Some(false));
    }
}
