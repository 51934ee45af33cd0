//! Istio's protocol names (pkg/config/protocol/instance.go) and how Kubernetes ports map to them
//! (pkg/config/kube/conversion.go `ConvertProtocol`).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Grpc,
    GrpcWeb,
    Http,
    HttpProxy,
    Http2,
    Https,
    Tcp,
    Tls,
    Udp,
    Mongo,
    Redis,
    MySql,
    /// Empty or unknown: Istio sniffs it ("auto"), and listens on the VIP.
    Unsupported,
}

impl Protocol {
    /// `protocol.Parse`: case-insensitive; anything unknown is `Unsupported`.
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "http" => Protocol::Http,
            "http_proxy" => Protocol::HttpProxy,
            "http2" => Protocol::Http2,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::MySql,
            _ => Protocol::Unsupported,
        }
    }

    /// `ConvertProtocol` for a Kubernetes Service port: UDP by L4 protocol, then appProtocol,
    /// then the port name's prefix before `-`; well-known ports (25, 53, 3306, 27017) are TCP.
    pub fn from_kube_port(port: u32, name: &str, l4: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        if l4.is_some_and(|p| p.eq_ignore_ascii_case("UDP")) {
            return Protocol::Udp;
        }
        let mut n = name;
        if let Some(app) = app_protocol {
            match app {
                "kubernetes.io/h2c" => return Protocol::Http2,
                "kubernetes.io/ws" => return Protocol::Http,
                "kubernetes.io/wss" => return Protocol::Https,
                _ => n = app,
            }
        }
        if n.len() >= 8 && n.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("grpc-web")) {
            return Protocol::GrpcWeb;
        }
        let prefix = n.split('-').next().unwrap_or(n);
        match Protocol::parse(prefix) {
            Protocol::Unsupported if matches!(port, 25 | 53 | 3306 | 27017) => Protocol::Tcp,
            p => p,
        }
    }

    /// HTTP family: the listener binds the wildcard address (`0.0.0.0_PORT`).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::HttpProxy | Protocol::Grpc | Protocol::GrpcWeb)
    }

    pub fn is_tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Https | Protocol::Tls | Protocol::Mongo | Protocol::Redis | Protocol::MySql)
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Http => "HTTP",
            Protocol::HttpProxy => "HTTP_PROXY",
            Protocol::Http2 => "HTTP2",
            Protocol::Https => "HTTPS",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Udp => "UDP",
            Protocol::Mongo => "Mongo",
            Protocol::Redis => "Redis",
            Protocol::MySql => "MySQL",
            Protocol::Unsupported => "UnsupportedProtocol",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cases from istio pkg/config/kube/conversion.go `ConvertProtocol`.
    #[test]
    fn kube_port_protocols() {
        assert_eq!(Protocol::from_kube_port(80, "http-web", None, None), Protocol::Http);
        assert_eq!(Protocol::from_kube_port(80, "http", None, None), Protocol::Http);
        assert_eq!(Protocol::from_kube_port(80, "", None, None), Protocol::Unsupported);
        assert_eq!(Protocol::from_kube_port(53, "dns", Some("UDP"), None), Protocol::Udp);
        assert_eq!(Protocol::from_kube_port(53, "dns-tcp", Some("TCP"), None), Protocol::Tcp);
        assert_eq!(Protocol::from_kube_port(3306, "", None, None), Protocol::Tcp);
        assert_eq!(Protocol::from_kube_port(8080, "web", None, Some("http")), Protocol::Http);
        assert_eq!(Protocol::from_kube_port(8080, "x", None, Some("kubernetes.io/h2c")), Protocol::Http2);
        assert_eq!(Protocol::from_kube_port(8080, "grpc-web-x", None, None), Protocol::GrpcWeb);
        assert_eq!(Protocol::from_kube_port(443, "HTTPS", None, None), Protocol::Https);
        assert_eq!(Protocol::parse("MYSQL"), Protocol::MySql);
        assert_eq!(Protocol::parse("bogus"), Protocol::Unsupported);
    }
}
