//! Firecracker's official API spec (v1.16.1, vendored in
//! `crates/banger-vmm/spec/`) as a request checker for the test double:
//! the path must be one of the spec's paths (with `{param}` segments), the
//! method one it defines there, and the JSON body must match the body
//! parameter's schema: types, `required`, `enum`, `minimum`/`maximum`,
//! `$ref`s, and no property the schema does not define (Firecracker's own
//! parsing rejects unknown fields). The subset of Swagger 2.0 the spec
//! uses; anything else in a schema is a loud error, not a silent pass.

use serde_json::Value;

pub const SPEC_YAML: &str = include_str!("../../banger-vmm/spec/firecracker-v1.16.1.yaml");

#[derive(Debug)]
pub struct Spec {
    root: Value,
}

impl Spec {
    pub fn load() -> Spec {
        let root: Value = serde_yaml::from_str(SPEC_YAML).expect("the vendored spec parses");
        Spec { root }
    }

    /// Checks one request; `Ok(params)` holds the path's `{param}` values.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<(String, String)>, String> {
        let paths = self.root["paths"].as_object().ok_or("spec has no paths")?;
        let (params, op) = paths
            .iter()
            .find_map(|(tmpl, item)| match_path(tmpl, path).map(|p| (p, item)))
            .ok_or_else(|| format!("no path {path} in the Firecracker API"))?;
        let op = op
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| format!("{method} is not an operation on {path}"))?;
        let body_param = op["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["in"] == "body"));
        match (body_param, body) {
            (Some(p), Some(b)) => self.validate(&p["schema"], b, "body")?,
            (Some(p), None) if p["required"] == true => {
                return Err(format!("{method} {path} needs a JSON body"))
            }
            (None, Some(_)) => return Err(format!("{method} {path} takes no body")),
            _ => {}
        }
        Ok(params)
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r
                    .strip_prefix("#/definitions/")
                    .ok_or_else(|| format!("unsupported $ref {r}"))?;
                let def = &self.root["definitions"][name];
                if def.is_null() {
                    return Err(format!("$ref {r} is not defined"));
                }
                self.resolve(def)
            }
            None => Ok(schema),
        }
    }

    pub fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        let ty = schema
            .get("type")
            .and_then(Value::as_str)
            .or_else(|| schema.get("properties").map(|_| "object"));
        match ty {
            Some("object") => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| format!("{at}: expected an object, got {v}"))?;
                for r in schema["required"].as_array().into_iter().flatten() {
                    let r = r.as_str().unwrap_or_default();
                    if !obj.contains_key(r) {
                        return Err(format!("{at}: missing required field {r:?}"));
                    }
                }
                let props = schema["properties"].as_object();
                for (k, val) in obj {
                    let sub = props
                        .and_then(|p| p.get(k))
                        .ok_or_else(|| format!("{at}: unknown field {k:?}"))?;
                    self.validate(sub, val, &format!("{at}.{k}"))?;
                }
            }
            Some("string") => {
                let s = v
                    .as_str()
                    .ok_or_else(|| format!("{at}: expected a string, got {v}"))?;
                if let Some(e) = schema["enum"].as_array() {
                    if !e.iter().any(|x| x.as_str() == Some(s)) {
                        return Err(format!("{at}: {s:?} is not one of {}", schema["enum"]));
                    }
                }
            }
            Some("integer") => {
                let n = v
                    .as_i64()
                    .ok_or_else(|| format!("{at}: expected an integer, got {v}"))?;
                if let Some(min) = schema["minimum"].as_i64() {
                    if n < min {
                        return Err(format!("{at}: {n} is below the minimum {min}"));
                    }
                }
                if let Some(max) = schema["maximum"].as_i64() {
                    if n > max {
                        return Err(format!("{at}: {n} is above the maximum {max}"));
                    }
                }
            }
            Some("number") => {
                v.as_f64()
                    .ok_or_else(|| format!("{at}: expected a number, got {v}"))?;
            }
            Some("boolean") => {
                v.as_bool()
                    .ok_or_else(|| format!("{at}: expected a boolean, got {v}"))?;
            }
            Some("array") => {
                let a = v
                    .as_array()
                    .ok_or_else(|| format!("{at}: expected an array, got {v}"))?;
                for (i, x) in a.iter().enumerate() {
                    self.validate(&schema["items"], x, &format!("{at}[{i}]"))?;
                }
            }
            other => {
                return Err(format!(
                    "{at}: schema type {other:?} is not supported by the double"
                ))
            }
        }
        Ok(())
    }
}

/// `/drives/{drive_id}` against `/drives/root` -> `[("drive_id", "root")]`.
fn match_path(tmpl: &str, path: &str) -> Option<Vec<(String, String)>> {
    let t: Vec<&str> = tmpl.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut params = Vec::new();
    for (a, b) in t.iter().zip(&p) {
        match a.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            Some(name) if !b.is_empty() => params.push((name.to_string(), b.to_string())),
            Some(_) => return None,
            None if a == b => {}
            None => return None,
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accepts_what_banger_sends_and_refuses_the_rest() {
        let s = Spec::load();
        s.check(
            "PUT",
            "/machine-config",
            Some(&json!({"vcpu_count": 2, "mem_size_mib": 512})),
        )
        .unwrap();
        let p = s
            .check(
                "PUT",
                "/drives/root",
                Some(&json!({"drive_id": "root", "path_on_host": "/x", "is_root_device": true, "is_read_only": false})),
            )
            .unwrap();
        assert_eq!(p, vec![("drive_id".to_string(), "root".to_string())]);
        s.check(
            "PUT",
            "/actions",
            Some(&json!({"action_type": "SendCtrlAltDel"})),
        )
        .unwrap();

        let refused = |m: &str, p: &str, b: Value, needle: &str| {
            let e = s.check(m, p, Some(&b)).unwrap_err();
            assert!(e.contains(needle), "{m} {p} {b}: {e}");
        };
        refused(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2}),
            "missing required field \"mem_size_mib\"",
        );
        refused(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 33, "mem_size_mib": 1}),
            "above the maximum 32",
        );
        refused(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 1}),
            "expected an integer",
        );
        refused(
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "/k", "cmdline": "x"}),
            "unknown field \"cmdline\"",
        );
        refused(
            "PUT",
            "/actions",
            json!({"action_type": "Reboot"}),
            "is not one of",
        );
        refused("PUT", "/drive/root", json!({}), "no path /drive/root");
        refused(
            "POST",
            "/actions",
            json!({"action_type": "InstanceStart"}),
            "not an operation",
        );
        refused(
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "bgtap0", "mtu": 20}),
            "below the minimum 68",
        );
    }
}
