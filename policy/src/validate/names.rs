//! DNS names and `namespace/dnsName` hosts, as istio validates them
//! (pkg/config/labels/instance.go, pkg/config/validation/agent/validation.go).

/// Go's `%q` for the strings that appear in messages.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `labels.IsDNS1123Label`: `[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?`, at most 63 bytes.
pub fn is_dns1123_label(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `labels.IsWildcardDNS1123Label`: `*`, or a label optionally prefixed by `*` or `*-`.
pub fn is_wildcard_dns1123_label(v: &str) -> bool {
    if v.len() > 63 {
        return false;
    }
    if v == "*" {
        return true;
    }
    let rest = v.strip_prefix("*-").or_else(|| v.strip_prefix('*')).unwrap_or(v);
    is_dns1123_label(rest)
}

/// Go `strconv.Atoi` success (optional sign, ASCII digits), used for "all-numeric" checks.
pub fn go_atoi_ok(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) && digits.len() <= 19
}

fn check_dns1123_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {} too long (max 255)", go_quote(name)));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

/// `ValidateDNS1123Labels`: no all-numeric TLD; each label valid; a trailing dot is allowed.
pub fn validate_dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts.last().copied().unwrap_or("");
    if go_atoi_ok(tld) {
        return Err(format!("domain name {} invalid (top level domain {} cannot be all-numeric)", go_quote(domain), go_quote(tld)));
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label(label) {
            return Err(format!("domain name {} invalid (label {} invalid)", go_quote(domain), go_quote(label)));
        }
    }
    Ok(())
}

/// `ValidateFQDN`.
pub fn validate_fqdn(fqdn: &str) -> Result<(), String> {
    check_dns1123_preconditions(fqdn)?;
    validate_dns1123_labels(fqdn)
}

/// `ValidateWildcardDomain`: a wildcard only in the first label.
pub fn validate_wildcard_domain(domain: &str) -> Result<(), String> {
    check_dns1123_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (domain, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!("domain name {} invalid (label {} invalid)", go_quote(domain), go_quote(first)));
    }
    match rest {
        Some(r) => validate_dns1123_labels(r),
        None => Ok(()),
    }
}

/// `ValidatePartialWildCard`: `*` alone or as a `*.` prefix only.
fn validate_partial_wildcard(host: &str) -> Result<(), String> {
    if host.contains('*') && host.len() != 1 && !host.starts_with("*.") {
        return Err(format!("partial wildcard {} not allowed", go_quote(host)));
    }
    Ok(())
}

/// `ValidateNamespaceSlashWildcardHostname(h, isGateway=false)`: `ns/dnsName` where ns is `*`,
/// `.`, a DNS label, each optionally `~`-prefixed (exclusion), or `~` alone; dnsName is `*` or
/// an FQDN with an optional leading `*.`; short names are rejected.
pub fn validate_sidecar_host(hostname: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let Some((ns, name)) = hostname.split_once('/') else {
        errs.push("host must be of form namespace/dnsName".to_string());
        return errs;
    };
    if ns.is_empty() || name.is_empty() {
        errs.push("config namespace and dnsName in host entry cannot be empty".into());
    }
    let bare = ns.strip_prefix('~').unwrap_or(ns);
    if !bare.is_empty() && bare != "*" && bare != "." && !is_dns1123_label(bare) {
        errs.push(format!("invalid namespace value {} in sidecar", go_quote(ns)));
    }
    // validateSidecarOrGatewayHostnamePart(isGateway=false)
    if name != "*" && !name.contains('.') {
        errs.push("short names (non FQDN) are not allowed".into());
    }
    if let Err(e) = validate_wildcard_domain(name) {
        // Istio appends the same error twice for sidecars (once as non-gateway, once because
        // the name is not an IP either); one line says it.
        errs.push(e);
    }
    if let Err(e) = validate_partial_wildcard(name) {
        errs.push(e);
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rules of ValidateNamespaceSlashWildcardHostname (pkg/config/validation/agent/validation.go).
    #[test]
    fn sidecar_hosts() {
        for ok in
            ["*/*", "./*", "ns1/*", "ns1/foo.example.com", "*/*.example.com", "~/bar.example.com", "~prod-us2/*", "~./a.b", "ns/foo.com."]
        {
            assert!(validate_sidecar_host(ok).is_empty(), "{ok}: {:?}", validate_sidecar_host(ok));
        }
        assert_eq!(validate_sidecar_host("foo.com"), vec!["host must be of form namespace/dnsName"]);
        assert_eq!(validate_sidecar_host("ns/foo"), vec!["short names (non FQDN) are not allowed"]);
        assert_eq!(validate_sidecar_host("/foo.com"), vec!["config namespace and dnsName in host entry cannot be empty"]);
        assert_eq!(
            validate_sidecar_host("ns/foo*.com"),
            vec![
                "domain name \"foo*.com\" invalid (label \"foo*\" invalid)".to_string(),
                "partial wildcard \"foo*.com\" not allowed".to_string()
            ]
        );
        assert_eq!(validate_sidecar_host("ns/*foo.com"), vec!["partial wildcard \"*foo.com\" not allowed"]);
        assert_eq!(validate_sidecar_host("NS_1/a.b"), vec!["invalid namespace value \"NS_1\" in sidecar"]);
        assert_eq!(
            validate_sidecar_host("ns/a.123"),
            // Istio checks the labels after the first one, so the message names "123".
            vec!["domain name \"123\" invalid (top level domain \"123\" cannot be all-numeric)"]
        );
    }

    #[test]
    fn labels_and_domains() {
        assert!(is_dns1123_label("a-b"));
        assert!(!is_dns1123_label("-ab"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_wildcard_dns1123_label("*"));
        assert!(is_wildcard_dns1123_label("*-foo"));
        assert!(!is_wildcard_dns1123_label("f*o"));
        assert!(validate_fqdn("proxy.example.com").is_ok());
        assert_eq!(validate_fqdn(""), Err("empty domain name not allowed".to_string()));
    }
}
