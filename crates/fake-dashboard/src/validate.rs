//! Request-body validation that mimics pydantic v2 as FastAPI reports it (protocol §1, §3).
//!
//! This module owns the three agent body models (`HostRegistration`, `HostStatus`,
//! `TestProgress`) and turns a raw body into either a typed value or the list of errors that
//! FastAPI puts under `{"detail":[...]}` with status 422. It does no I/O and knows nothing
//! about hosts, tokens or modes; the server decides *when* to validate (first, before the
//! rate limit and auth).
//!
//! Fidelity: the error `type`/`loc`/`msg`/`input`/`ctx` fields follow pydantic 2 closely enough
//! for a client to branch on them, including the lax conversions pydantic applies to JSON input
//! (`"5"` and `5.0` are valid integers, `"yes"` is a valid boolean, numbers are not strings).

use serde::Serialize;
use serde_json::{Map, Value, json};

/// One entry of a 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationError {
    /// pydantic error type, e.g. `string_too_long`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Location, e.g. `["body","hostname"]`.
    pub loc: Vec<Value>,
    /// Human readable message, worded like pydantic's.
    pub msg: String,
    /// The offending input, echoed back.
    pub input: Value,
    /// Constraint context (`max_length`, `pattern`, ...), when pydantic sends one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

/// The JSON body FastAPI answers a validation failure with (a struct, so that the keys keep
/// pydantic's order: `type, loc, msg, input, ctx`).
#[derive(Debug, Serialize)]
pub struct DetailBody<'a> {
    /// The errors, in model field order.
    pub detail: &'a [ValidationError],
}

/// Wraps `errors` as `{"detail":[...]}`.
pub fn detail_body(errors: &[ValidationError]) -> DetailBody<'_> {
    DetailBody { detail: errors }
}

/// A validated `HostRegistration` (§3.1), with pydantic defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Lowercased by the model's validator.
    pub hostname: String,
    /// `nixos` or `macos`.
    pub host_type: String,
    /// Free text, at most 50 chars.
    pub location: Option<String>,
    /// Defaults to `server` when omitted; `None` only when sent as null.
    pub device_type: Option<String>,
    /// Defaults to `#769ff0` when omitted; `None` only when sent as null.
    pub theme_color: Option<String>,
    /// Defaults to `low` when omitted; `None` only when sent as null.
    pub criticality: Option<String>,
    /// At most 10 chars.
    pub icon: Option<String>,
    /// At most 64 chars; matches `^[a-zA-Z0-9-]{1,64}$` when non-empty.
    pub current_generation: Option<String>,
    /// At most 500 chars.
    pub comment: Option<String>,
    /// Accepted but ignored by the dashboard.
    pub test_status: Option<String>,
    /// At most 200 chars.
    pub config_repo: Option<String>,
    /// 1..=3600.
    pub poll_interval: Option<i64>,
    /// At most 20 chars.
    pub agent_version: Option<String>,
    /// At most 64 chars.
    pub nixpkgs_version: Option<String>,
    /// At most 50 chars.
    pub os_version: Option<String>,
    /// At most 50 chars.
    pub os_name: Option<String>,
    /// Any JSON object.
    pub metrics: Option<Map<String, Value>>,
}

/// A validated `HostStatus` (§3.3); `output` is already cleaned.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// `ok`, `error` or `unknown`.
    pub status: String,
    /// At most 64 chars, no pattern.
    pub current_generation: Option<String>,
    /// At most 10 000 chars before cleaning; cleaned to `\n` plus printable ASCII.
    pub output: Option<String>,
    /// At most 100 chars.
    pub test_status: Option<String>,
    /// At most 200 chars.
    pub comment: Option<String>,
}

/// A validated `TestProgress` (§3.4).
#[derive(Debug, Clone, PartialEq)]
pub struct TestProgress {
    /// Index of the test about to run (≥ 0).
    pub current: i64,
    /// Number of tests (≥ 0).
    pub total: i64,
    /// Passed so far (≥ 0, default 0).
    pub passed: i64,
    /// Default true.
    pub running: bool,
    /// Final summary.
    pub result: Option<String>,
    /// Error message or notes.
    pub comment: Option<String>,
}

/// `^[a-zA-Z][a-zA-Z0-9-]{0,62}$`: the host id (path) and hostname (body) rule.
pub fn is_host_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `^[a-zA-Z0-9-]{1,64}$`: the generation rule of the registration model.
pub fn is_generation(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len()) && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `^#[0-9a-fA-F]{6}$`.
pub fn is_theme_color(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7 && b[0] == b'#' && b[1..].iter().all(u8::is_ascii_hexdigit)
}

/// Removes every character except `\n` and printable ASCII (0x20..=0x7E), like the
/// `sanitize_output` validator.
pub fn clean_output(s: &str) -> String {
    s.chars()
        .filter(|c| *c == '\n' || (' '..='~').contains(c))
        .collect()
}

/// What a request body turned out to be before any model is applied.
fn parse_object(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Map<String, Value>, Vec<ValidationError>> {
    if body.is_empty() {
        return Err(vec![ValidationError {
            kind: "missing",
            loc: vec![json!("body")],
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }]);
    }
    let is_json = content_type.is_none_or(|ct| {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    let value = if is_json {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(e) => {
                return Err(vec![ValidationError {
                    kind: "json_invalid",
                    loc: vec![json!("body"), json!(json_error_offset(body, &e))],
                    msg: "JSON decode error".into(),
                    input: json!({}),
                    ctx: Some(json!({ "error": "Expecting value" })),
                }]);
            }
        }
    } else {
        // FastAPI hands the raw bytes to the model, which then is not a dict.
        Value::String(String::from_utf8_lossy(body).into_owned())
    };
    match value {
        Value::Object(map) => Ok(map),
        other => Err(vec![ValidationError {
            kind: "model_attributes_type",
            loc: vec![json!("body")],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            input: other,
            ctx: None,
        }]),
    }
}

/// Byte offset of a serde_json error, as Python's `JSONDecodeError.pos` would report it.
fn json_error_offset(body: &[u8], e: &serde_json::Error) -> usize {
    let (line, column) = (e.line(), e.column());
    let mut offset = 0;
    for (i, l) in body.split(|b| *b == b'\n').enumerate() {
        if i + 1 == line {
            return offset + column.saturating_sub(1);
        }
        offset += l.len() + 1;
    }
    body.len()
}

/// Field-by-field checker; collects every error like pydantic does.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<ValidationError>,
}

/// Outcome of looking a field up.
enum Lookup<'a> {
    Absent,
    Null,
    Present(&'a Value),
}

impl<'a> Fields<'a> {
    fn new(obj: &'a Map<String, Value>) -> Self {
        Fields {
            obj,
            errors: Vec::new(),
        }
    }

    fn lookup(&self, name: &str) -> Lookup<'a> {
        match self.obj.get(name) {
            None => Lookup::Absent,
            Some(Value::Null) => Lookup::Null,
            Some(v) => Lookup::Present(v),
        }
    }

    fn error(
        &mut self,
        name: &str,
        kind: &'static str,
        msg: String,
        input: &Value,
        ctx: Option<Value>,
    ) {
        self.errors.push(ValidationError {
            kind,
            loc: vec![json!("body"), json!(name)],
            msg,
            input: input.clone(),
            ctx,
        });
    }

    fn missing(&mut self, name: &str) {
        let whole = Value::Object(self.obj.clone());
        self.error(name, "missing", "Field required".into(), &whole, None);
    }

    /// A string with length bounds (in characters, like Python).
    fn string(&mut self, name: &str, v: &Value, min: usize, max: Option<usize>) -> Option<String> {
        let Value::String(s) = v else {
            self.error(
                name,
                "string_type",
                "Input should be a valid string".into(),
                v,
                None,
            );
            return None;
        };
        let len = s.chars().count();
        if len < min {
            self.error(
                name,
                "string_too_short",
                format!("String should have at least {min} character{}", plural(min)),
                v,
                Some(json!({ "min_length": min })),
            );
            return None;
        }
        if let Some(max) = max
            && len > max
        {
            self.error(
                name,
                "string_too_long",
                format!("String should have at most {max} character{}", plural(max)),
                v,
                Some(json!({ "max_length": max })),
            );
            return None;
        }
        Some(s.clone())
    }

    /// `Optional[str] = Field(default, max_length=max)`.
    fn opt_str(&mut self, name: &str, max: Option<usize>, default: Option<&str>) -> Option<String> {
        match self.lookup(name) {
            Lookup::Absent => default.map(str::to_owned),
            Lookup::Null => None,
            Lookup::Present(v) => self.string(name, v, 0, max),
        }
    }

    /// `Optional[str] = Field(default, pattern=...)` where the pattern is an alternation.
    fn opt_choice(
        &mut self,
        name: &str,
        choices: &[&str],
        default: Option<&str>,
    ) -> Option<String> {
        let s = self.opt_str(name, None, default)?;
        if self.obj.get(name).is_some() && !choices.contains(&s.as_str()) {
            self.pattern_error(name, &json!(s), &format!("^({})$", choices.join("|")));
            return None;
        }
        Some(s)
    }

    fn pattern_error(&mut self, name: &str, v: &Value, pattern: &str) {
        self.error(
            name,
            "string_pattern_mismatch",
            format!("String should match pattern '{pattern}'"),
            v,
            Some(json!({ "pattern": pattern })),
        );
    }

    fn value_error(&mut self, name: &str, v: &Value, msg: &str) {
        self.error(
            name,
            "value_error",
            format!("Value error, {msg}"),
            v,
            Some(json!({ "error": {} })),
        );
    }

    /// A required string.
    fn req_str(&mut self, name: &str, min: usize, max: Option<usize>) -> Option<String> {
        match self.lookup(name) {
            Lookup::Absent => {
                self.missing(name);
                None
            }
            Lookup::Null => {
                self.error(
                    name,
                    "string_type",
                    "Input should be a valid string".into(),
                    &Value::Null,
                    None,
                );
                None
            }
            Lookup::Present(v) => self.string(name, v, min, max),
        }
    }

    /// An integer with pydantic's lax JSON conversions and `ge`/`le` bounds.
    fn int(&mut self, name: &str, v: &Value, ge: Option<i64>, le: Option<i64>) -> Option<i64> {
        let n = match v {
            Value::Bool(b) => i64::from(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    i
                } else if let Some(f) = n.as_f64() {
                    if f.fract() != 0.0 || !f.is_finite() {
                        self.error(
                            name,
                            "int_from_float",
                            "Input should be a valid integer, got a number with a fractional part"
                                .into(),
                            v,
                            None,
                        );
                        return None;
                    }
                    f as i64
                } else {
                    self.error(
                        name,
                        "int_type",
                        "Input should be a valid integer".into(),
                        v,
                        None,
                    );
                    return None;
                }
            }
            Value::String(s) => match s.trim().parse::<i64>() {
                Ok(i) => i,
                Err(_) => {
                    self.error(
                        name,
                        "int_parsing",
                        "Input should be a valid integer, unable to parse string as an integer"
                            .into(),
                        v,
                        None,
                    );
                    return None;
                }
            },
            _ => {
                self.error(
                    name,
                    "int_type",
                    "Input should be a valid integer".into(),
                    v,
                    None,
                );
                return None;
            }
        };
        if let Some(ge) = ge
            && n < ge
        {
            self.error(
                name,
                "greater_than_equal",
                format!("Input should be greater than or equal to {ge}"),
                v,
                Some(json!({ "ge": ge })),
            );
            return None;
        }
        if let Some(le) = le
            && n > le
        {
            self.error(
                name,
                "less_than_equal",
                format!("Input should be less than or equal to {le}"),
                v,
                Some(json!({ "le": le })),
            );
            return None;
        }
        Some(n)
    }

    /// `int = Field(default, ge=0)` or required when `default` is `None`.
    fn nonneg_int(&mut self, name: &str, default: Option<i64>) -> Option<i64> {
        match self.lookup(name) {
            Lookup::Absent => {
                if default.is_none() {
                    self.missing(name);
                }
                default
            }
            Lookup::Null => {
                self.error(
                    name,
                    "int_type",
                    "Input should be a valid integer".into(),
                    &Value::Null,
                    None,
                );
                None
            }
            Lookup::Present(v) => self.int(name, v, Some(0), None),
        }
    }

    /// `bool = default` with pydantic's lax conversions.
    fn boolean(&mut self, name: &str, default: bool) -> Option<bool> {
        let v = match self.lookup(name) {
            Lookup::Absent => return Some(default),
            Lookup::Null => {
                self.error(
                    name,
                    "bool_type",
                    "Input should be a valid boolean".into(),
                    &Value::Null,
                    None,
                );
                return None;
            }
            Lookup::Present(v) => v,
        };
        let parsed = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => match n.as_f64() {
                Some(0.0) => Some(false),
                Some(1.0) => Some(true),
                _ => None,
            },
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
                "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
                _ => None,
            },
            _ => {
                self.error(
                    name,
                    "bool_type",
                    "Input should be a valid boolean".into(),
                    v,
                    None,
                );
                return None;
            }
        };
        if parsed.is_none() {
            self.error(
                name,
                "bool_parsing",
                "Input should be a valid boolean, unable to interpret input".into(),
                v,
                None,
            );
        }
        parsed
    }

    fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<ValidationError>> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(self.errors)
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Validates a `POST /register` body.
pub fn registration(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Registration, Vec<ValidationError>> {
    let obj = parse_object(body, content_type)?;
    let mut f = Fields::new(&obj);
    let hostname = f.req_str("hostname", 1, Some(63)).and_then(|h| {
        if is_host_id(&h) {
            Some(h.to_lowercase())
        } else {
            f.value_error("hostname", &json!(h), "Invalid hostname format");
            None
        }
    });
    let host_type = f.req_str("host_type", 0, None).and_then(|t| {
        if t == "nixos" || t == "macos" {
            Some(t)
        } else {
            f.pattern_error("host_type", &json!(t), "^(nixos|macos)$");
            None
        }
    });
    let location = f.opt_str("location", Some(50), None);
    let device_type = f.opt_choice(
        "device_type",
        &["server", "desktop", "laptop", "gaming"],
        Some("server"),
    );
    let theme_color = f.opt_str("theme_color", None, Some("#769ff0"));
    if let Some(c) = &theme_color
        && obj.get("theme_color").is_some()
        && !is_theme_color(c)
    {
        f.pattern_error("theme_color", &json!(c), "^#[0-9a-fA-F]{6}$");
    }
    let criticality = f.opt_choice("criticality", &["low", "medium", "high"], Some("low"));
    let icon = f.opt_str("icon", Some(10), None);
    let current_generation = f.opt_str("current_generation", Some(64), None);
    if let Some(g) = &current_generation
        && !g.is_empty()
        && !is_generation(g)
    {
        f.value_error("current_generation", &json!(g), "Invalid generation format");
    }
    let comment = f.opt_str("comment", Some(500), None);
    let test_status = f.opt_str("test_status", Some(100), None);
    let config_repo = f.opt_str("config_repo", Some(200), None);
    let poll_interval = match f.lookup("poll_interval") {
        Lookup::Absent | Lookup::Null => None,
        Lookup::Present(v) => f.int("poll_interval", v, Some(1), Some(3600)),
    };
    let agent_version = f.opt_str("agent_version", Some(20), None);
    let nixpkgs_version = f.opt_str("nixpkgs_version", Some(64), None);
    let os_version = f.opt_str("os_version", Some(50), None);
    let os_name = f.opt_str("os_name", Some(50), None);
    let metrics = match f.lookup("metrics") {
        Lookup::Absent | Lookup::Null => None,
        Lookup::Present(Value::Object(m)) => Some(m.clone()),
        Lookup::Present(v) => {
            f.error(
                "metrics",
                "dict_type",
                "Input should be a valid dictionary".into(),
                v,
                None,
            );
            None
        }
    };
    f.finish(|| Registration {
        hostname: hostname.unwrap_or_default(),
        host_type: host_type.unwrap_or_default(),
        location,
        device_type,
        theme_color,
        criticality,
        icon,
        current_generation,
        comment,
        test_status,
        config_repo,
        poll_interval,
        agent_version,
        nixpkgs_version,
        os_version,
        os_name,
        metrics,
    })
}

/// Validates a `POST /status` body and cleans `output`.
pub fn status_report(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<StatusReport, Vec<ValidationError>> {
    let obj = parse_object(body, content_type)?;
    let mut f = Fields::new(&obj);
    let status = f.req_str("status", 0, None).and_then(|s| {
        if ["ok", "error", "unknown"].contains(&s.as_str()) {
            Some(s)
        } else {
            f.pattern_error("status", &json!(s), "^(ok|error|unknown)$");
            None
        }
    });
    let current_generation = f.opt_str("current_generation", Some(64), None);
    let output = f
        .opt_str("output", Some(10_000), None)
        .map(|o| clean_output(&o));
    let test_status = f.opt_str("test_status", Some(100), None);
    let comment = f.opt_str("comment", Some(200), None);
    f.finish(|| StatusReport {
        status: status.unwrap_or_default(),
        current_generation,
        output,
        test_status,
        comment,
    })
}

/// Validates a `POST /test-progress` body.
pub fn test_progress(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<TestProgress, Vec<ValidationError>> {
    let obj = parse_object(body, content_type)?;
    let mut f = Fields::new(&obj);
    let current = f.nonneg_int("current", None);
    let total = f.nonneg_int("total", None);
    let passed = f.nonneg_int("passed", Some(0));
    let running = f.boolean("running", true);
    let result = f.opt_str("result", None, None);
    let comment = f.opt_str("comment", None, None);
    f.finish(|| TestProgress {
        current: current.unwrap_or_default(),
        total: total.unwrap_or_default(),
        passed: passed.unwrap_or_default(),
        running: running.unwrap_or(true),
        result,
        comment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(v: Value) -> Result<Registration, Vec<ValidationError>> {
        registration(v.to_string().as_bytes(), Some("application/json"))
    }

    #[test]
    fn minimal_registration_gets_pydantic_defaults() {
        let r = reg(json!({"hostname": "WebHost", "host_type": "nixos"})).unwrap();
        assert_eq!(r.hostname, "webhost");
        assert_eq!(r.device_type.as_deref(), Some("server"));
        assert_eq!(r.theme_color.as_deref(), Some("#769ff0"));
        assert_eq!(r.criticality.as_deref(), Some("low"));
        assert_eq!(r.location, None);
        assert_eq!(r.current_generation, None);
    }

    #[test]
    fn explicit_null_is_not_the_default() {
        let r = reg(json!({"hostname": "a", "host_type": "macos", "device_type": null})).unwrap();
        assert_eq!(r.device_type, None);
    }

    #[test]
    fn every_bad_field_is_reported_in_model_order() {
        let errs = reg(json!({
            "hostname": "bad_host", "host_type": "linux", "device_type": "vm",
            "theme_color": "red", "agent_version": "x".repeat(21), "poll_interval": 0,
            "current_generation": "abc.def", "config_repo": "r".repeat(201), "metrics": [1]
        }))
        .unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|e| e.loc[1].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            fields,
            [
                "hostname",
                "host_type",
                "device_type",
                "theme_color",
                "current_generation",
                "config_repo",
                "poll_interval",
                "agent_version",
                "metrics"
            ]
        );
        let kinds: Vec<_> = errs.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "value_error",
                "string_pattern_mismatch",
                "string_pattern_mismatch",
                "string_pattern_mismatch",
                "value_error",
                "string_too_long",
                "greater_than_equal",
                "string_too_long",
                "dict_type"
            ]
        );
        assert_eq!(errs[7].msg, "String should have at most 20 characters");
        assert_eq!(errs[7].ctx, Some(json!({"max_length": 20})));
    }

    #[test]
    fn missing_required_fields_echo_the_whole_body() {
        let errs = reg(json!({"location": "home"})).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].kind, "missing");
        assert_eq!(errs[0].input, json!({"location": "home"}));
    }

    #[test]
    fn empty_generation_is_allowed_but_too_long_is_not() {
        assert!(
            reg(json!({"hostname": "a", "host_type": "nixos", "current_generation": ""})).is_ok()
        );
        let long = "a".repeat(65);
        let errs = reg(json!({"hostname": "a", "host_type": "nixos", "current_generation": long}))
            .unwrap_err();
        assert_eq!(errs[0].kind, "string_too_long");
    }

    #[test]
    fn non_json_and_non_object_bodies_are_422() {
        let e = registration(b"{not json", Some("application/json")).unwrap_err();
        assert_eq!(e[0].kind, "json_invalid");
        assert_eq!(e[0].loc, vec![json!("body"), json!(1)]);
        let e = registration(b"[1,2]", None).unwrap_err();
        assert_eq!(e[0].kind, "model_attributes_type");
        let e = registration(b"", None).unwrap_err();
        assert_eq!(e[0].kind, "missing");
        assert_eq!(e[0].loc, vec![json!("body")]);
        let e = registration(b"{}", Some("text/plain")).unwrap_err();
        assert_eq!(e[0].kind, "model_attributes_type");
    }

    #[test]
    fn status_output_limit_is_checked_before_cleaning() {
        let body = json!({"status": "ok", "output": "\u{2705}".repeat(10_001)}).to_string();
        let e = status_report(body.as_bytes(), None).unwrap_err();
        assert_eq!(e[0].kind, "string_too_long");
        assert_eq!(e[0].loc, vec![json!("body"), json!("output")]);
        let body = json!({"status": "ok", "output": "\u{2705} T01\tx\r\n\u{1b}[0mok"}).to_string();
        let s = status_report(body.as_bytes(), None).unwrap();
        assert_eq!(s.output.as_deref(), Some(" T01x\n[0mok"));
    }

    #[test]
    fn status_value_must_be_ok_error_or_unknown() {
        let e = status_report(br#"{"status":"success"}"#, None).unwrap_err();
        assert_eq!(e[0].kind, "string_pattern_mismatch");
        assert_eq!(
            e[0].msg,
            "String should match pattern '^(ok|error|unknown)$'"
        );
    }

    #[test]
    fn test_progress_lax_conversions_and_bounds() {
        let p = test_progress(br#"{"current":"2","total":3.0,"running":"no"}"#, None).unwrap();
        assert_eq!((p.current, p.total, p.passed, p.running), (2, 3, 0, false));
        let e = test_progress(br#"{"current":-1,"running":null}"#, None).unwrap_err();
        let kinds: Vec<_> = e.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["greater_than_equal", "missing", "bool_type"]);
    }

    #[test]
    fn host_id_rule() {
        assert!(is_host_id("a"));
        assert!(is_host_id(&format!("a{}", "b".repeat(62))));
        assert!(!is_host_id(&format!("a{}", "b".repeat(63))));
        for bad in ["", "1abc", "a.b", "a_b", "-a", "a b"] {
            assert!(!is_host_id(bad), "{bad}");
        }
    }
}
