//! Ports, protocols, binds and endpoints (pkg/config/validation/validation.go helpers).

use crate::model::Protocol;

use super::names::{go_quote, is_dns1123_label};

/// `ValidatePort`.
pub fn validate_port(port: i64) -> Result<(), String> {
    if (1..=65535).contains(&port) { Ok(()) } else { Err(format!("port number {port} must be in the range 1..65535")) }
}

/// `ValidatePortName`.
pub fn validate_port_name(name: &str) -> Result<(), String> {
    if is_dns1123_label(name) { Ok(()) } else { Err(format!("invalid port name: {name}")) }
}

/// `ValidateProtocol`: empty means sniffing; otherwise a known protocol.
pub fn validate_protocol(p: &str) -> Result<(), String> {
    if !p.is_empty() && Protocol::parse(p) == Protocol::Unsupported {
        return Err(format!("unsupported protocol: {p}"));
    }
    Ok(())
}

/// `ValidateIPAddress`: an IP literal, no prefix.
pub fn validate_ip_address(addr: &str) -> Result<(), String> {
    match addr.parse::<std::net::IpAddr>() {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{addr} is not a valid IP")),
    }
}

pub const UNIX_PREFIX: &str = "unix://";

/// `ValidateUnixAddress` (the part after `unix://`).
pub fn validate_unix_address(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if addr.starts_with('@') {
        return Ok(());
    }
    if !addr.starts_with('/') || addr.ends_with('/') {
        return Err(format!("{addr} is not an absolute path to a file"));
    }
    Ok(())
}

/// Go's `net.SplitHostPort`, with its error text.
pub fn split_host_port(hostport: &str) -> Result<(String, String), String> {
    let err = |why: &str| Err(format!("address {hostport}: {why}"));
    let Some(i) = hostport.rfind(':') else { return err("missing port in address") };
    let (host, j, k);
    if hostport.starts_with('[') {
        let Some(end) = hostport.find(']') else { return err("missing ']' in address") };
        if end + 1 == hostport.len() {
            return err("missing port in address");
        } else if end + 1 != i {
            if hostport.as_bytes().get(end + 1) == Some(&b':') {
                return err("too many colons in address");
            }
            return err("missing port in address");
        }
        host = &hostport[1..end];
        j = 1;
        k = end + 1;
    } else {
        host = &hostport[..i];
        if host.contains(':') {
            return err("too many colons in address");
        }
        j = 0;
        k = 0;
    }
    if hostport[j..].contains('[') {
        return err("unexpected '[' in address");
    }
    if hostport[k..].contains(']') {
        return err("unexpected ']' in address");
    }
    Ok((host.to_string(), hostport[i + 1..].to_string()))
}

/// Go's `strconv.Atoi`, with its error text.
pub fn go_atoi(s: &str) -> Result<i64, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("strconv.Atoi: parsing {}: invalid syntax", go_quote(s)));
    }
    s.parse::<i64>().map_err(|_| format!("strconv.Atoi: parsing {}: value out of range", go_quote(s)))
}

/// Ingress `defaultEndpoint`: `unix://path`, or `[127.0.0.1|0.0.0.0|::1|::]:port`, or `:port`.
pub fn validate_default_endpoint(ep: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(path) = ep.strip_prefix(UNIX_PREFIX) {
        if let Err(e) = validate_unix_address(path) {
            errs.push(e);
        }
        return errs;
    }
    let (host, port) = match split_host_port(ep) {
        Ok(hp) => hp,
        Err(e) => {
            errs.push(e);
            (String::new(), String::new())
        }
    };
    if !host.is_empty() && !matches!(host.as_str(), "127.0.0.1" | "0.0.0.0" | "::1" | "::") {
        errs.push(
            "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset".into(),
        );
    }
    match go_atoi(&port) {
        Err(e) => errs.push(format!("sidecar: defaultEndpoint port ({port}) is not a number: {e}")),
        Ok(p) => {
            if let Err(e) = validate_port(p) {
                errs.push(e);
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_host_port_matches_go() {
        assert_eq!(split_host_port("127.0.0.1:80"), Ok(("127.0.0.1".into(), "80".into())));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1".into(), "80".into())));
        assert_eq!(split_host_port(":80"), Ok(("".into(), "80".into())));
        assert_eq!(split_host_port("localhost"), Err("address localhost: missing port in address".into()));
        assert_eq!(split_host_port("::1:80"), Err("address ::1:80: too many colons in address".into()));
        assert_eq!(split_host_port("[::1"), Err("address [::1: missing ']' in address".into()));
    }

    // The defaultEndpoint rules of ValidateSidecar (pkg/config/validation/validation.go).
    #[test]
    fn default_endpoints() {
        for ok in ["127.0.0.1:8080", "0.0.0.0:8080", "[::1]:8080", "[::]:8080", ":8080", "unix:///var/run/a.sock", "unix://@abstract"] {
            assert!(validate_default_endpoint(ok).is_empty(), "{ok}: {:?}", validate_default_endpoint(ok));
        }
        assert_eq!(
            validate_default_endpoint("1.1.1.1:90"),
            vec!["sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset"]
        );
        assert_eq!(
            validate_default_endpoint("127.0.0.1:hi"),
            vec!["sidecar: defaultEndpoint port (hi) is not a number: strconv.Atoi: parsing \"hi\": invalid syntax"]
        );
        assert_eq!(validate_default_endpoint("127.0.0.1:0"), vec!["port number 0 must be in the range 1..65535"]);
        assert_eq!(validate_default_endpoint("unix://a.sock"), vec!["a.sock is not an absolute path to a file"]);
        assert_eq!(validate_default_endpoint("unix://"), vec!["unix address must not be empty"]);
        let e = validate_default_endpoint("127.0.0.1");
        assert_eq!(e.first().map(String::as_str), Some("address 127.0.0.1: missing port in address"));
    }

    #[test]
    fn ports_and_protocols() {
        assert!(validate_port(65535).is_ok());
        assert_eq!(validate_port(65536), Err("port number 65536 must be in the range 1..65535".into()));
        assert_eq!(validate_protocol("bogus"), Err("unsupported protocol: bogus".into()));
        assert!(validate_protocol("").is_ok());
        assert!(validate_protocol("MYSQL").is_ok());
        assert_eq!(validate_port_name("Bad_Name"), Err("invalid port name: Bad_Name".into()));
        assert_eq!(validate_ip_address("unix:///a.sock"), Err("unix:///a.sock is not a valid IP".into()));
        assert!(validate_ip_address("::1").is_ok());
    }
}
