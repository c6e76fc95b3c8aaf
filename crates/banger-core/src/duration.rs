//! Durations as users write them: `90`, `30s`, `5m`, `2h`, `1d`, `1h30m`.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{flag} {value:?}: {why}: write e.g. 30s, 5m, 2h, 1d or 1h30m")]
pub struct DurationError {
    pub flag: String,
    pub value: String,
    pub why: &'static str,
}

/// Parses `value` into seconds; `flag` names it in the error. At most 365
/// days; zero is refused (a zero TTL or idle timeout would stop a VM as it
/// starts).
pub fn parse_secs(flag: &str, value: &str) -> Result<u64, DurationError> {
    let err = |why| DurationError {
        flag: flag.to_string(),
        value: value.to_string(),
        why,
    };
    let v = value.trim();
    if v.is_empty() {
        return Err(err("empty"));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut saw_unit = false;
    for c in v.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(err("unknown unit")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| err("a unit needs a number before it"))?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| err("too long"))?;
        num.clear();
        saw_unit = true;
    }
    if !num.is_empty() {
        if saw_unit {
            return Err(err("a number without a unit after another"));
        }
        total = num.parse().map_err(|_| err("too long"))?;
    }
    if total == 0 {
        return Err(err("must be more than zero"));
    }
    if total > 365 * 86_400 {
        return Err(err("at most 365 days"));
    }
    Ok(total)
}

/// `secs` the way `parse_secs` reads it back: `1h30m`, `45s`.
pub fn format_secs(secs: u64) -> String {
    let mut s = String::new();
    let mut left = secs;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if left >= n {
            s.push_str(&format!("{}{unit}", left / n));
            left %= n;
        }
    }
    if s.is_empty() {
        s.push_str("0s");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_write() {
        assert_eq!(parse_secs("--ttl", "90"), Ok(90));
        assert_eq!(parse_secs("--ttl", "30s"), Ok(30));
        assert_eq!(parse_secs("--ttl", "5m"), Ok(300));
        assert_eq!(parse_secs("--ttl", "1h30m"), Ok(5400));
        assert_eq!(parse_secs("--ttl", "2d"), Ok(172_800));
        for bad in [
            "",
            "0",
            "0s",
            "5x",
            "m",
            "1h30",
            "400d",
            "99999999999999999999",
        ] {
            let e = parse_secs("--ttl", bad).unwrap_err().to_string();
            assert!(e.starts_with("--ttl"), "{e}");
        }
        assert_eq!(format_secs(5400), "1h30m");
        assert_eq!(format_secs(45), "45s");
        assert_eq!(format_secs(0), "0s");
    }
}
