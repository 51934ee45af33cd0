//! Sidecar ingress TLS: the ValidateSidecar restrictions plus `validateTLSOptions`
//! (pkg/config/validation/validation.go).

use crate::model::Protocol;
use crate::model::sidecar::{ServerTls, TlsMode};

use super::Validation;

pub fn validate_ingress_tls(tls: &ServerTls, port_protocol: &str, v: &mut Validation) {
    if !tls.subject_alt_names.is_empty() {
        v.error("sidecar: subjectAltNames is not supported in ingress tls");
    }
    if tls.https_redirect {
        v.error("sidecar: httpsRedirect is not supported");
    }
    if !tls.credential_name.is_empty() {
        v.error("sidecar: credentialName is not currently supported");
    }
    if !tls.credential_names.is_empty() {
        v.error("sidecar: credentialNames is not currently supported");
    }
    if !tls.tls_certificates.is_empty() {
        v.error("sidecar: tls_certificates is not currently supported");
    }
    if matches!(tls.mode, TlsMode::IstioMutual | TlsMode::AutoPassthrough) {
        v.error(format!("configuration is invalid: cannot set mode to {} in sidecar ingress tls", tls.mode.as_str()));
    }
    if !Protocol::parse(port_protocol).is_tls() {
        v.error("server cannot have TLS settings for non HTTPS/TLS ports");
    }
    validate_tls_options(tls, v);
}

fn validate_tls_options(tls: &ServerTls, v: &mut Validation) {
    if matches!(tls.min_protocol_version.as_str(), "TLSV1_0" | "TLSV1_1") && tls.cipher_suites.is_empty() {
        v.warning("TLS version below TLSV1_2 require setting compatible ciphers as by default they no longer include compatible ciphers.");
    }
    let mut seen = std::collections::BTreeSet::new();
    let dups: std::collections::BTreeSet<&String> = tls.cipher_suites.iter().filter(|c| !seen.insert(*c)).collect();
    if !dups.is_empty() {
        let list: Vec<&str> = dups.iter().map(|s| s.as_str()).collect();
        v.warning(format!("ignoring duplicate cipher suites: [{}]", list.join(" ")));
    }
    if tls.mode == TlsMode::IstioMutual {
        let checks = [
            (!tls.server_certificate.is_empty(), "ISTIO_MUTUAL TLS cannot have associated server certificate"),
            (!tls.private_key.is_empty(), "ISTIO_MUTUAL TLS cannot have associated private key"),
            (!tls.ca_certificates.is_empty(), "ISTIO_MUTUAL TLS cannot have associated CA bundle"),
            (!tls.tls_certificates.is_empty(), "ISTIO_MUTUAL TLS cannot have associated tlsCertificates"),
            (!tls.credential_name.is_empty(), "ISTIO_MUTUAL TLS cannot have associated credentialName"),
            (!tls.credential_names.is_empty(), "ISTIO_MUTUAL TLS cannot have associated credentialNames"),
        ];
        for (bad, msg) in checks {
            if bad {
                v.error(msg);
            }
        }
        return;
    }
    if matches!(tls.mode, TlsMode::Passthrough | TlsMode::AutoPassthrough)
        && (!tls.ca_crl.is_empty()
            || !tls.server_certificate.is_empty()
            || !tls.private_key.is_empty()
            || !tls.ca_certificates.is_empty()
            || !tls.tls_certificates.is_empty()
            || !tls.credential_name.is_empty()
            || !tls.credential_names.is_empty())
    {
        v.warning(format!("{} mode does not use certificates, they will be ignored", tls.mode.as_str()));
    }
    let sources = [
        !tls.server_certificate.is_empty() && !tls.private_key.is_empty(),
        !tls.credential_name.is_empty(),
        !tls.credential_names.is_empty(),
        !tls.tls_certificates.is_empty(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        v.error("only one of credential_name, credential_names, server_certificate/private_key, tls_certificates should be specified");
    }
    let needs_certs = matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual | TlsMode::OptionalMutual);
    if needs_certs && (!tls.credential_name.is_empty() || !tls.credential_names.is_empty()) {
        return;
    }
    if needs_certs {
        let prefix = if tls.mode == TlsMode::Simple { "SIMPLE TLS" } else { "MUTUAL TLS" };
        if tls.mode != TlsMode::Simple && tls.ca_certificates.is_empty() {
            v.error(format!("{prefix} requires a client CA bundle"));
        }
        if tls.tls_certificates.len() > 2 {
            v.warning(format!("{prefix} can support up to 2 server certificates"));
        }
        let certs: Vec<(&str, &str)> = if tls.tls_certificates.is_empty() {
            vec![(tls.server_certificate.as_str(), tls.private_key.as_str())]
        } else {
            tls.tls_certificates.iter().map(|c| (c.server_certificate.as_str(), c.private_key.as_str())).collect()
        };
        for (cert, key) in certs {
            if cert.is_empty() {
                v.error(format!("{prefix} requires a server certificate"));
            }
            if key.is_empty() {
                v.error(format!("{prefix} requires a private key"));
            }
        }
    }
    if !tls.ca_crl.is_empty() {
        if !tls.credential_name.is_empty() {
            v.error("CRL is not supported with credentialName. CRL has to be specified in the credential");
        }
        if tls.mode == TlsMode::Simple {
            v.error("CRL is not supported with SIMPLE TLS");
        }
    }
}
