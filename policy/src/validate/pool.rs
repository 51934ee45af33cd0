//! `validateConnectionPool` and `ValidateDuration` (pkg/config/validation).

use crate::model::sidecar::ConnectionPool;

use super::Validation;

/// Protobuf JSON duration (`"1.5s"`) in nanoseconds.
fn parse_duration(s: &str) -> Option<i128> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if secs.is_empty() && frac.is_empty() {
        return None;
    }
    if !secs.bytes().all(|c| c.is_ascii_digit()) || !frac.bytes().all(|c| c.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let s: i128 = if secs.is_empty() { 0 } else { secs.parse().ok()? };
    let f: i128 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    let n = s.checked_mul(1_000_000_000)?.checked_add(f)?;
    Some(if neg { -n } else { n })
}

/// `ValidateDuration`: at least 1ms, millisecond precision.
fn validate_duration(s: &str) -> Result<(), String> {
    let Some(ns) = parse_duration(s) else { return Err(format!("invalid duration {s:?}")) };
    if ns < 1_000_000 {
        return Err("duration must be greater than 1ms".into());
    }
    if ns % 1_000_000 != 0 {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(())
}

pub fn validate_connection_pool(pool: Option<&ConnectionPool>, v: &mut Validation) {
    let Some(pool) = pool else { return };
    if pool.http.is_none() && pool.tcp.is_none() {
        v.error("connection pool must have at least one field");
        return;
    }
    if let Some(h) = &pool.http {
        let checks = [
            (h.http1_max_pending_requests, "http1 max pending requests must be non-negative"),
            (h.http2_max_requests, "http2 max requests must be non-negative"),
            (h.max_requests_per_connection, "max requests per connection must be non-negative"),
            (h.max_retries, "max retries must be non-negative"),
        ];
        for (n, msg) in checks {
            if n < 0 {
                v.error(msg);
            }
        }
        if let Some(d) = &h.idle_timeout {
            v.result(validate_duration(d));
        }
        if h.h2_upgrade_policy == "UPGRADE" && h.use_client_protocol {
            v.error("use client protocol must not be true when H2UpgradePolicy is UPGRADE");
        }
        if h.max_concurrent_streams < 0 {
            v.error("max concurrent streams must be non-negative");
        }
    }
    if let Some(t) = &pool.tcp {
        if t.max_connections < 0 {
            v.error("max connections must be non-negative");
        }
        for d in [&t.connect_timeout, &t.max_connection_duration].into_iter().flatten() {
            v.result(validate_duration(d));
        }
        if let Some(d) = &t.idle_timeout {
            // 0s disables the idle timeout and is not validated.
            if parse_duration(d) != Some(0) {
                v.result(validate_duration(d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
        assert!(validate_duration("0.001s").is_ok());
        assert_eq!(validate_duration("0.0001s"), Err("duration must be greater than 1ms".into()));
        assert_eq!(validate_duration("1.0001s"), Err("only durations to ms precision are supported".into()));
        assert!(validate_duration("10m").is_err());
    }
}
