//! Istio hostname matching (pkg/config/host/name.go): case-sensitive, `*` only as the first label.

/// `Name.IsWildCarded`: the name starts with `*`.
pub fn is_wildcarded(h: &str) -> bool {
    h.starts_with('*')
}

/// `Name.SubsetOf`: every name matched by `n` is matched by `o`. A wildcard is never a subset
/// of an exact name; `*.foo.com` covers `a.b.foo.com` but not `foo.com`; `*` covers everything.
pub fn subset_of(n: &str, o: &str) -> bool {
    match (is_wildcarded(n), is_wildcarded(o)) {
        (true, true) => n.len() >= o.len() && n[1..].ends_with(&o[1..]),
        (true, false) => false,
        (false, true) => n.ends_with(&o[1..]),
        (false, false) => n == o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rules from istio pkg/config/host/name.go `SubsetOf`.
    #[test]
    fn subset_rules() {
        assert!(subset_of("a.b.foo.com", "*.foo.com"));
        assert!(!subset_of("foo.com", "*.foo.com"));
        assert!(subset_of("anything", "*"));
        assert!(subset_of("*.foo.com", "*"));
        assert!(!subset_of("*.foo.com", "a.foo.com"), "wildcard service never subset of exact import");
        assert!(subset_of("*.a.foo.com", "*.foo.com"));
        assert!(!subset_of("*.foo.com", "*.a.foo.com"));
        assert!(!subset_of("A.foo.com", "a.foo.com"), "case-sensitive");
    }
}
