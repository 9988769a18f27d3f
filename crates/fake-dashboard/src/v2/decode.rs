//! Decoding of agent messages the way Go's `encoding/json` decodes them into the dashboard's
//! structs (protocol-v2 §1): keys match case-insensitively (an exact match wins), `null`
//! leaves a field at its zero value, unknown keys are ignored, and a value of the wrong JSON
//! type (a string for a number, `1.5` for an integer) fails the whole message, which the
//! dashboard then drops. Integral numbers written as `42` decode into float fields. This module only turns JSON into typed values; it changes no state.

use serde_json::{Map, Value};

/// Why a message was dropped.
pub(crate) type DecodeError = String;

/// The envelope `{"type","payload"}`. A missing `payload` fails (Go's `json.RawMessage` stays
/// nil and unmarshalling it fails); `"payload": null` decodes as an all-zero payload.
pub(crate) fn envelope(v: &Value) -> Result<(String, Value), DecodeError> {
    let obj = v
        .as_object()
        .ok_or_else(|| "message is not a JSON object".to_owned())?;
    let msg_type = match field(obj, "type") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("type is {}", kind(other))),
    };
    let payload = field(obj, "payload")
        .cloned()
        .ok_or_else(|| "payload is missing".to_owned())?;
    Ok((msg_type, payload))
}

/// A payload object being decoded into a struct.
pub(crate) struct Payload<'a> {
    obj: Option<&'a Map<String, Value>>,
}

impl<'a> Payload<'a> {
    /// `null` is an all-zero struct; anything but an object or `null` fails.
    pub(crate) fn new(v: &'a Value) -> Result<Payload<'a>, DecodeError> {
        match v {
            Value::Null => Ok(Payload { obj: None }),
            Value::Object(m) => Ok(Payload { obj: Some(m) }),
            other => Err(format!("payload is {}", kind(other))),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj
            .and_then(|o| field(o, key))
            .filter(|v| !v.is_null())
    }

    /// A Go `string` field: absent or `null` → `""`.
    pub(crate) fn string(&self, key: &str) -> Result<String, DecodeError> {
        Ok(self.opt_string(key)?.unwrap_or_default())
    }

    /// A Go `*string` field.
    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<String>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("{key} is {}, want a string", kind(other))),
        }
    }

    /// A Go `int` field: absent or `null` → 0.
    pub(crate) fn int(&self, key: &str) -> Result<i64, DecodeError> {
        Ok(self.opt_int(key)?.unwrap_or(0))
    }

    /// A Go `*int` field. Only integer literals decode; `1.0` or `1e3` fail like in Go.
    pub(crate) fn opt_int(&self, key: &str) -> Result<Option<i64>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{key} is the number {n}, want an integer")),
            Some(other) => Err(format!("{key} is {}, want an integer", kind(other))),
        }
    }

    /// A Go `bool` field.
    pub(crate) fn bool(&self, key: &str) -> Result<bool, DecodeError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("{key} is {}, want a boolean", kind(other))),
        }
    }

    /// A nested struct or map field, kept as JSON; `null`/absent → `None`.
    pub(crate) fn object(&self, key: &str) -> Result<Option<Value>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(other) => Err(format!("{key} is {}, want an object", kind(other))),
        }
    }
}

/// `metrics` (`{"cpu","ram","swap","load"}`, all `float64`): any number decodes, including
/// integral ones written without a decimal point; a string fails.
pub(crate) fn metrics(v: &Value) -> Result<Value, DecodeError> {
    let p = Payload::new(v)?;
    let mut out = Map::new();
    for key in ["cpu", "ram", "swap", "load"] {
        let n = match p.get(key) {
            None => 0.0,
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(other) => return Err(format!("metrics.{key} is {}, want a number", kind(other))),
        };
        out.insert(key.to_owned(), Value::from(n));
    }
    Ok(Value::Object(out))
}

/// `update_status`: four `StatusCheck`s of three strings each; returns the normalised object
/// (absent checks as all-empty ones) or fails on a wrong type.
pub(crate) fn update_status(v: &Value) -> Result<Value, DecodeError> {
    let p = Payload::new(v)?;
    let mut out = Map::new();
    for key in ["git", "lock", "system", "tests"] {
        let check = p.object(key)?;
        let mut m = Map::new();
        let cp = match &check {
            Some(c) => Payload::new(c)?,
            None => Payload { obj: None },
        };
        for f in ["status", "message", "checked_at"] {
            m.insert(
                f.to_owned(),
                Value::String(
                    cp.string(f)
                        .map_err(|e| format!("update_status.{key}.{e}"))?,
                ),
            );
        }
        out.insert(key.to_owned(), Value::Object(m));
    }
    Ok(Value::Object(out))
}

/// Go's field lookup: the exact key first, then the first key equal ignoring ASCII case
/// (Go folds more than ASCII; agent keys are ASCII).
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_needs_a_payload_but_null_is_a_zero_payload() {
        assert!(envelope(&json!({"type": "heartbeat"})).is_err());
        let (t, p) = envelope(&json!({"TYPE": "heartbeat", "Payload": null})).unwrap();
        assert_eq!((t.as_str(), p), ("heartbeat", Value::Null));
        assert!(envelope(&json!({"type": 3, "payload": {}})).is_err());
        assert!(envelope(&json!([1])).is_err());
        assert!(Payload::new(&json!("x")).is_err());
    }

    #[test]
    fn fields_decode_like_go() {
        let v = json!({"HostName": "web1", "exit_code": 3, "pid": null, "f": 1.5, "g": 2.0,
                       "s": 5, "hostname_x": 1});
        let p = Payload::new(&v).unwrap();
        assert_eq!(p.string("hostname").unwrap(), "web1");
        assert_eq!(p.int("exit_code").unwrap(), 3);
        assert_eq!(p.opt_int("pid").unwrap(), None);
        assert_eq!(p.string("absent").unwrap(), "");
        assert!(p.int("f").is_err(), "1.5 in an int field fails");
        assert!(p.int("g").is_err(), "Go refuses 2.0 in an int field");
        assert!(p.string("s").is_err());
    }

    #[test]
    fn metrics_accept_integral_numbers_and_nulls() {
        let m = metrics(&json!({"cpu": 12, "ram": 41.5, "swap": null, "load": 0.37})).unwrap();
        assert_eq!(
            m,
            json!({"cpu": 12.0, "ram": 41.5, "swap": 0.0, "load": 0.37})
        );
        assert!(metrics(&json!({"load": "0.3"})).is_err());
    }

    #[test]
    fn update_status_normalises_missing_checks() {
        let u = update_status(&json!({"lock": {"status": "ok"}, "git": null})).unwrap();
        assert_eq!(
            u["lock"],
            json!({"status": "ok", "message": "", "checked_at": ""})
        );
        assert_eq!(u["git"]["status"], "");
        assert!(update_status(&json!({"lock": {"status": 1}})).is_err());
    }
}
