//! Differential test against istio-init (issue #4 item 6).
//!
//! For each REDIRECT-mode case of Istio's golden iptables rule sets
//! (`testdata/istio/iptables/cni-plugin/` and `capture/`), the same matrix of
//! connections runs twice: once in pods whose netns holds the golden rules, loaded with the
//! real `iptables-restore` (no sidecap), once in pods captured by the real `sidecap agent`
//! (no iptables) with the equivalent pod annotations / istio-proxy container and
//! `--allow-any capture` (Istio-exact: everything in capture range goes to the proxy, as
//! istio-init does). Each connection's outcome is the socket that got it — the proxy's
//! outbound (15001) or inbound (15006) listener (with the original destination it reads
//! through SO_ORIGINAL_DST), its DNS listener (15053), the app / upstream directly, or
//! nothing — and the two runs must agree, except for the documented differences in
//! [`EXCEPTIONS`] (each of which must actually occur, so the list cannot rot).
//!
//! One topology per run holds one pod per case (pod i = 10.251.i.2 in both runs, so
//! outcomes compare as strings) plus an unmeshed `peer` pod; services live on
//! 10.251.100.10 / fd00:5ca9::100:10 in the services netns.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sidecap_tests::differential::{GoldenRules, Hit, ListenSpec, Listeners, NetnsConnect, connect_from, load_golden, parse_golden};
use sidecap_tests::*;

const SVC: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 10);
const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5ca9, 0, 0, 0, 0, 0x100, 0x10);
const APP: Creds = Creds::APP;
const CONNECT_TIMEOUT_MS: u64 = 1500;

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// One golden rule set and the pod that should behave the same under sidecap.
struct Case {
    /// `cni-plugin/<name>` or `capture/<name>` (the name in that dir's CASES.yaml).
    id: &'static str,
    golden: &'static str,
    annotations: &'static [(&'static str, &'static str)],
    /// istio-proxy `securityContext.runAsUser` / `runAsGroup`.
    run_as: (Option<i64>, Option<i64>),
    /// The proxy identity the rules match (and the proxy's processes run as).
    proxy: Creds,
    /// istio-proxy env `ISTIO_META_DNS_CAPTURE: "true"`.
    dns: bool,
    /// The golden has IPv6 rules: IPv6 connections are part of the matrix.
    v6: bool,
}

/// istio-iptables' base test config (capture/CASES.yaml) has no inbound capture, no CIDR
/// capture and no excluded ports; istio-cni's defaults differ (`*`, `*`, 15020), so every
/// capture/ case spells these out and overrides them where the case does.
const CAP_NO_IN: (&str, &str) = ("traffic.sidecar.istio.io/includeInboundPorts", "");
const CAP_NO_OUT: (&str, &str) = ("traffic.sidecar.istio.io/includeOutboundIPRanges", "");
const CAP_NO_EXCL_OUT: (&str, &str) = ("traffic.sidecar.istio.io/excludeOutboundPorts", "");
const CAP_NO_EXCL_IN: (&str, &str) = ("traffic.sidecar.istio.io/excludeInboundPorts", "");
const P1337: Creds = Creds { uid: 1337, gid: 1337 };
/// ProxyUID "3,4" / ProxyGID "1,2": a pod has one runAsUser/runAsGroup, so the sidecap pod
/// gets the first of each, and the matrix's proxy runs as 3:1.
const P3_1: Creds = Creds { uid: 3, gid: 1 };

const fn cni(id: &'static str, golden: &'static str, annotations: &'static [(&'static str, &'static str)]) -> Case {
    Case { id, golden, annotations, run_as: (None, None), proxy: P1337, dns: false, v6: false }
}

fn cases() -> Vec<Case> {
    vec![
        cni("cni-plugin/basic", "cni-plugin/basic.txt.golden", &[]),
        cni(
            "cni-plugin/include-exclude-ip",
            "cni-plugin/include-exclude-ip.txt.golden",
            &[
                ("traffic.sidecar.istio.io/includeOutboundIPRanges", "127.0.0.0/8"),
                ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8"),
            ],
        ),
        cni(
            "cni-plugin/include-exclude-ports",
            "cni-plugin/include-exclude-ports.txt.golden",
            &[
                ("traffic.sidecar.istio.io/includeInboundPorts", "1111,2222"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", "3333,4444"),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,6666"),
            ],
        ),
        Case { dns: true, ..cni("cni-plugin/DNS", "cni-plugin/dns.txt.golden", &[]) },
        // INVALID_DROP only adds the mangle INVALID→DROP rule (loaded as is); sidecap has no
        // such knob and needs none: it never NATs, so there is no conntrack state to go stale.
        cni("cni-plugin/invalid-drop", "cni-plugin/invalid-drop.txt.golden", &[]),
        Case {
            run_as: (Some(1000670000), Some(1000670001)),
            proxy: Creds { uid: 1000670000, gid: 1000670001 },
            ..cni("cni-plugin/custom-uid", "cni-plugin/custom-uid.txt.golden", &[])
        },
        Case { run_as: (Some(0), None), ..cni("cni-plugin/custom-uid-zero", "cni-plugin/basic.txt.golden", &[]) },
        cap("empty", &[], P1337, false, false),
        cap("ipv6-empty-inbound-ports", &[], P1337, false, true),
        cap(
            "ip-range",
            &[
                ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "1.1.0.0/16"),
                ("traffic.sidecar.istio.io/includeOutboundIPRanges", "9.9.0.0/16"),
            ],
            P3_1,
            true,
            false,
        ),
        cap("ipv6-inbound-ports", &[("traffic.sidecar.istio.io/includeInboundPorts", "4000,5000")], P1337, false, true),
        cap("ipv6-outbound-ports", &[("traffic.sidecar.istio.io/includeOutboundPorts", "32000,31000")], P1337, false, true),
        cap("ipnets", &[("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8")], P1337, false, false),
        cap("inbound-ports-include", &[("traffic.sidecar.istio.io/includeInboundPorts", "32000,31000")], P1337, false, false),
        cap("inbound-ports-wildcard", &[("traffic.sidecar.istio.io/includeInboundPorts", "*")], P1337, false, false),
        cap("dns-uid-gid", &[], P3_1, true, true),
        cap("ipv6-dns-uid-gid", &[], P3_1, true, true),
        cap("outbound-ports-include", &[("traffic.sidecar.istio.io/includeOutboundPorts", "32000,31000")], P1337, false, false),
        cap("loopback-outbound-iprange", &[("traffic.sidecar.istio.io/includeOutboundIPRanges", "127.1.2.3/32")], P3_1, true, false),
        // ExcludeInterfaces: not-istio-nic does not exist in the sandbox, so its rules are
        // inert; the pod is `empty`'s.
        cap("basic-exclude-nic", &[], P1337, false, false),
        // DropInvalid: see cni-plugin/invalid-drop.
        cap("drop-invalid", &[], P1337, false, false),
    ]
}

/// A capture/ case: istio-iptables' base config plus `overrides` (annotations named as the
/// overrides they stand for; an override replaces the base value of the same key).
fn cap(name: &'static str, overrides: &[(&'static str, &'static str)], proxy: Creds, dns: bool, v6: bool) -> Case {
    let mut ann: Vec<(&'static str, &'static str)> = vec![CAP_NO_IN, CAP_NO_OUT, CAP_NO_EXCL_OUT, CAP_NO_EXCL_IN];
    for (k, v) in overrides {
        ann.retain(|(bk, _)| bk != k);
        ann.push((k, v));
    }
    let id: &'static str = Box::leak(format!("capture/{name}").into_boxed_str());
    let golden: &'static str = Box::leak(format!("capture/{name}.golden").into_boxed_str());
    let run_as = if proxy == P1337 { (None, None) } else { (Some(proxy.uid as i64), Some(proxy.gid as i64)) };
    Case { id, golden, annotations: Box::leak(ann.into_boxed_slice()), run_as, proxy, dns, v6 }
}

/// Cases of the CASES.yaml indexes that are not run, and why. sidecap refuses pods asking for
/// what these cases test (policy/src/knobs.rs), so there is no sidecap run to compare.
const SKIPPED: &[(&str, &str)] = &[
    (
        "cni-plugin/tproxy",
        "TPROXY interception: refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "cni-plugin/custom-uid-tproxy",
        "TPROXY interception: refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    ("capture/tproxy", "TPROXY interception: refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)"),
    (
        "capture/inbound-ports-tproxy",
        "TPROXY interception: refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/inbound-ports-wildcard-tproxy",
        "TPROXY interception: refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/ipv6-virt-interfaces",
        "RerouteVirtualInterfaces (kubevirtInterfaces): refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/ipv6-ipnets",
        "RerouteVirtualInterfaces (kubevirtInterfaces): refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/ipv6-uid-gid",
        "RerouteVirtualInterfaces (kubevirtInterfaces): refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/kube-virt-interfaces",
        "RerouteVirtualInterfaces (kubevirtInterfaces): refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/ipnets-with-kube-virt-interfaces",
        "RerouteVirtualInterfaces (kubevirtInterfaces): refused loudly (the pod's CNI ADD fails naming the annotation; tests/tests/interception.rs)",
    ),
    (
        "capture/outbound-owner-groups",
        "OwnerGroupsInclude: refused loudly when set in the proxy's env or the mesh's proxyMetadata (tests/tests/interception.rs)",
    ),
    (
        "capture/outbound-owner-groups-exclude",
        "OwnerGroupsExclude: refused loudly when set in the proxy's env or the mesh's proxyMetadata (tests/tests/interception.rs)",
    ),
    (
        "capture/ipv6-dns-outbound-owner-groups",
        "OwnerGroupsInclude: refused loudly when set in the proxy's env or the mesh's proxyMetadata (tests/tests/interception.rs)",
    ),
    (
        "capture/ipv6-dns-outbound-owner-groups-exclude",
        "OwnerGroupsExclude: refused loudly when set in the proxy's env or the mesh's proxyMetadata (tests/tests/interception.rs)",
    ),
    ("capture/host-ipv4-loopback-cidr", "HostIPv4LoopbackCidr: an istio-iptables flag with no pod annotation; sidecap has no such knob"),
];

// ---------------------------------------------------------------------------------------
// Documented differences
// ---------------------------------------------------------------------------------------

/// A documented, intentional difference: for every case in `cases` and every connection in
/// `conns`, iptables' outcome starts with `iptables` and sidecap's with `sidecap`. Every
/// combination must occur (and disagree as described).
struct Exception {
    cases: &'static [&'static str],
    conns: &'static [&'static str],
    iptables: &'static str,
    sidecap: &'static str,
    reason: &'static str,
}

const EXCEPTIONS: &[Exception] = &[
    Exception {
        cases: &["capture/inbound-ports-wildcard"],
        conns: &[
            "peer -> self:15020",
            "peer -> self:15021",
            "peer -> self:15090",
            "svcns -> self:15020",
            "svcns -> self:15021",
            "svcns -> self:15090",
        ],
        iptables: "proxy-in",
        sidecap: "direct",
        reason: "istio-iptables' test config has no excluded inbound ports; the real istio-init is always run with \
                 `-d 15090,15021,15020` and istio-cni always appends 15020,15021,15090 — as sidecap does, so no \
                 annotation can turn their capture on",
    },
    Exception {
        cases: &["capture/ip-range", "capture/dns-uid-gid", "capture/loopback-outbound-iprange", "capture/ipv6-dns-uid-gid"],
        conns: &["app -> svc:53", "app -> svc:53/udp"],
        iptables: "direct",
        sidecap: "proxy-dns",
        reason: "istio-iptables redirects DNS only to the resolv.conf servers it is given (DNSServersV4; none in \
                 ipv6-dns-uid-gid); istio-cni sets CaptureAllDNS (every port-53 destination), which is what \
                 ISTIO_META_DNS_CAPTURE means to sidecap",
    },
    Exception {
        cases: &["capture/ipv6-dns-uid-gid"],
        conns: &["app -> 127.0.0.53:53", "app -> 127.0.0.53:53/udp"],
        iptables: "direct",
        sidecap: "proxy-dns",
        reason: "the same: this golden was generated with no DNS servers, so it redirects no DNS at all",
    },
    Exception {
        cases: &["capture/ipv6-dns-uid-gid"],
        conns: &["proxy -> 127.0.0.53:53"],
        iptables: "proxy-in",
        sidecap: "direct",
        reason: "the same cause: without DNS rules the golden's proxy-to-lo rule has no port-53 carve-out \
                 (`! --dports 53,15008`), so the proxy's own DNS query to a loopback resolver goes to its inbound \
                 port; with DNS capture on (sidecap here, any DNS golden) it goes to the resolver",
    },
    Exception {
        cases: &["capture/ipv6-dns-uid-gid"],
        conns: &["gid -> 127.0.0.53:53"],
        iptables: "direct",
        sidecap: "proxy-in",
        reason: "the same cause, for a process with only the proxy's gid: istio-cni's DNS rules spare TCP port 53 \
                 from the uid block's `-o lo … RETURN` (so that the DNS rules can catch it) and the gid block's \
                 self-call rule then sends it to the inbound port (cni-plugin/dns.txt.golden does exactly that); \
                 this golden, generated without DNS servers, has no such carve-out",
    },
];

// ---------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// The app (uid 1000).
    App,
    /// The proxy (the case's uid:gid).
    Proxy,
    /// uid 1000 with the proxy's gid (the gid-owner rules).
    Gid,
    /// The proxy, bound to 127.0.0.6 (Envoy's inbound passthrough source).
    Proxy6,
    /// The unmeshed peer pod.
    Peer,
    /// The services netns.
    SvcNs,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Client::App => "app",
            Client::Proxy => "proxy",
            Client::Gid => "gid",
            Client::Proxy6 => "proxy@127.0.0.6",
            Client::Peer => "peer",
            Client::SvcNs => "svcns",
        })
    }
}

struct Conn {
    client: Client,
    target: SocketAddr,
    udp: bool,
    label: String,
}

/// Names for addresses, so the table reads `self:8080` rather than `10.251.3.2:8080`.
struct Names {
    map: Vec<(IpAddr, &'static str)>,
}

impl Names {
    fn new(pod: &Pod, peer: &Pod) -> Names {
        Names {
            map: vec![
                (SVC.into(), "svc"),
                (SVC6.into(), "svc6"),
                (pod.ipv4().into(), "self"),
                (pod.ipv6().into(), "self6"),
                (peer.ipv4().into(), "peer"),
                (peer.ipv6().into(), "peer6"),
            ],
        }
    }

    fn addr(&self, a: SocketAddr) -> String {
        match self.map.iter().find(|(ip, _)| *ip == a.ip()) {
            Some((_, n)) if a.is_ipv6() => format!("[{n}]:{}", a.port()),
            Some((_, n)) => format!("{n}:{}", a.port()),
            None => a.to_string(),
        }
    }

    fn text(&self, s: &str) -> String {
        s.parse::<SocketAddr>().map(|a| self.addr(a)).unwrap_or_else(|_| s.to_owned())
    }
}

const OUT_SVC_PORTS: &[u16] = &[80, 53, 5555, 6666, 15008, 15020, 31000, 32000];
const SELF_PORTS: &[u16] = &[8080, 15008, 15020, 5555];
const LOOPBACK_TARGETS: &[(Ipv4Addr, u16)] = &[
    (Ipv4Addr::new(127, 0, 0, 1), 8080),
    (Ipv4Addr::new(127, 0, 0, 2), 8080),
    (Ipv4Addr::new(127, 1, 2, 3), 8080),
    (Ipv4Addr::new(127, 0, 0, 53), 53),
];
/// Ports the pod's app (and the proxy's own non-capture ports) listen on.
const INBOUND_PORTS: &[u16] = &[8080, 1111, 2222, 3333, 4444, 4000, 5000, 31000, 32000, 15008, 15020, 15021, 15090];
const POD_TCP_PORTS: &[u16] = &[8080, 1111, 2222, 3333, 4444, 4000, 5000, 31000, 32000, 15008, 15020, 15021, 15090, 5555];
const SVC_TCP_PORTS: &[u16] = &[80, 53, 5555, 6666, 15008, 15020, 31000, 32000];
const DNS_LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

fn matrix(case: &Case, pod: &Pod, peer: &Pod) -> Vec<Conn> {
    let names = Names::new(pod, peer);
    let mut m = Vec::new();
    let mut add = |client: Client, target: SocketAddr, udp: bool| {
        let label = format!("{client} -> {}{}", names.addr(target), if udp { "/udp" } else { "" });
        m.push(Conn { client, target, udp, label });
    };
    let sa = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    for client in [Client::App, Client::Proxy, Client::Gid] {
        for p in OUT_SVC_PORTS {
            add(client, sa(SVC.into(), *p), false);
        }
        for p in SELF_PORTS {
            add(client, sa(pod.ipv4().into(), *p), false);
        }
        for (ip, p) in LOOPBACK_TARGETS {
            add(client, sa((*ip).into(), *p), false);
        }
        add(client, sa(peer.ipv4().into(), 8080), false);
        add(client, sa(SVC.into(), 53), true);
        add(client, sa(DNS_LOCAL.into(), 53), true);
        add(client, sa(SVC.into(), 5353), true);
    }
    add(Client::Proxy6, sa(pod.ipv4().into(), 8080), false);
    for client in [Client::Peer, Client::SvcNs] {
        for p in INBOUND_PORTS {
            add(client, sa(pod.ipv4().into(), *p), false);
        }
    }
    if case.v6 {
        let v6 = |a: Ipv6Addr| IpAddr::V6(a);
        for client in [Client::App, Client::Proxy] {
            add(client, sa(v6(SVC6), 80), false);
            add(client, sa(v6(SVC6), 32000), false);
            add(client, sa(v6(pod.ipv6()), 8080), false);
            add(client, sa(v6(pod.ipv6()), 15008), false);
            add(client, sa(v6(Ipv6Addr::LOCALHOST), 8080), false);
            add(client, sa(v6(peer.ipv6()), 8080), false);
        }
        for client in [Client::Peer, Client::SvcNs] {
            for p in [8080, 4000, 15008, 15020] {
                add(client, sa(v6(pod.ipv6()), p), false);
            }
        }
    }
    m
}

// ---------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The proxy's outbound listener (15001), with the original destination it read.
    ProxyOut(String),
    /// The proxy's inbound listener (15006), with the original destination it read.
    ProxyIn(String),
    /// The proxy's DNS listener (15053).
    ProxyDns,
    /// An app / upstream / peer socket: its name and local address.
    Direct(String),
    /// Nothing got it.
    Failed(String),
}

impl Outcome {
    fn show(&self, n: &Names) -> String {
        match self {
            Outcome::ProxyOut(o) => format!("proxy-out({})", n.text(o)),
            Outcome::ProxyIn(o) => format!("proxy-in({})", n.text(o)),
            Outcome::ProxyDns => "proxy-dns".into(),
            Outcome::Direct(d) => match d.split_once('@') {
                Some((who, at)) => format!("direct({who}@{})", n.text(at)),
                None => format!("direct({d})"),
            },
            Outcome::Failed(e) => format!("failed({e})"),
        }
    }

    /// Equal for the comparison: failures agree whatever their errno.
    fn same(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Failed(_), Outcome::Failed(_)) => true,
            _ => self == other,
        }
    }
}

/// A `sc-probe listen` run as the proxy; its JSON lines say who got which token.
struct ProxyListener {
    kind: &'static str,
    proc: Spawned,
}

impl ProxyListener {
    /// (token, outcome) of every connection / datagram reported so far.
    fn outcomes(&self) -> Vec<(String, Outcome)> {
        let mut out = Vec::new();
        for line in self.proc.stdout().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let ev = v["event"].as_str().unwrap_or("");
            if ev != "conn" && ev != "datagram" {
                continue;
            }
            let token = v["received"].as_str().unwrap_or("").trim().to_owned();
            let orig = v["orig_dst"].as_str().map(str::to_owned).unwrap_or_else(|| format!("errno {}", v["orig_dst_errno"]));
            let o = match self.kind {
                "out" => Outcome::ProxyOut(orig),
                "in" => Outcome::ProxyIn(orig),
                _ => Outcome::ProxyDns,
            };
            out.push((token, o));
        }
        out
    }
}

fn start_proxy_listeners(pod: &Pod, creds: Creds) -> Vec<ProxyListener> {
    let p = Probe::at(probe_bin!());
    let specs: [(&str, &str, bool); 6] = [
        ("out", "0.0.0.0:15001", false),
        ("out", "[::]:15001", false),
        ("in", "0.0.0.0:15006", false),
        ("in", "[::]:15006", false),
        ("dns", "127.0.0.1:15053", false),
        ("dns", "127.0.0.1:15053", true),
    ];
    let mut ls: Vec<ProxyListener> = specs
        .iter()
        .map(|(kind, addr, udp)| {
            let mut args = vec!["listen", addr, "--max-secs", "120", "--timeout-ms", "3000"];
            if *udp {
                args.push("--udp");
            }
            let proc = spawn_in(pod, creds.uid, creds.gid, p.command(&args)).expect("spawn proxy listener");
            ProxyListener { kind, proc }
        })
        .collect();
    for l in ls.iter_mut() {
        assert!(
            l.proc.wait_stdout("\"listening\"", Duration::from_secs(5)),
            "proxy listener did not start: {} {}",
            l.proc.stdout(),
            l.proc.stderr()
        );
    }
    ls
}

fn pod_listeners(pod: &Pod) -> Listeners {
    let mut specs = Vec::new();
    for p in POD_TCP_PORTS {
        specs.push(ListenSpec::tcp("app", SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), *p)));
        specs.push(ListenSpec::tcp("app", SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), *p)));
    }
    specs.push(ListenSpec::tcp("app", SocketAddr::new(DNS_LOCAL.into(), 53)));
    specs.push(ListenSpec::udp("app", SocketAddr::new(DNS_LOCAL.into(), 53)));
    Listeners::start(pod.netns(), &specs).expect("pod listeners")
}

// ---------------------------------------------------------------------------------------
// One run (iptables or sidecap) over all cases
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Iptables,
    Sidecap,
}

/// Outcomes of one run: per case, per connection (matrix order), with its label.
type RunResult = Vec<Vec<(String, Outcome)>>;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/istio/iptables")
}

fn build_topology(n_cases: usize) -> Topology {
    let mut b = Topology::builder();
    for i in 0..n_cases {
        b = b.pod(&format!("c{i}"));
    }
    let topo = b.pod("peer").service_addr(SVC).service_addr(SVC6).build().expect("topology");
    for p in topo.pods() {
        // [::]:p next to 0.0.0.0:p, as separate sockets (as Envoy binds them).
        p.netns().sysctl("net.ipv6.bindv6only", "1").expect("bindv6only");
    }
    topo
}

fn run_mode(mode: Mode, cases: &[Case], goldens: &[GoldenRules]) -> RunResult {
    let t0 = Instant::now();
    let topo = build_topology(cases.len());
    let peer = topo.pod("peer");
    // Declared before the agent so they are dropped after it.
    let pins = BpfPinDir::new("diff").expect("bpffs pin dir");
    let mesh = MeshDir::new();
    let mut agent = None;
    match mode {
        Mode::Iptables => {
            for (i, g) in goldens.iter().enumerate() {
                load_golden(topo.pod(&format!("c{i}")).netns(), g).unwrap_or_else(|e| panic!("{}: iptables-restore: {e}", cases[i].id));
            }
        }
        Mode::Sidecap => {
            for (i, c) in cases.iter().enumerate() {
                let mut env = Vec::new();
                if c.dns {
                    env.push(("ISTIO_META_DNS_CAPTURE".to_owned(), "true".to_owned()));
                }
                let proxy = ProxyContainer { run_as_user: c.run_as.0, run_as_group: c.run_as.1, env };
                mesh.pod_with_proxy(topo.pod(&format!("c{i}")), "default", &[], c.annotations, &proxy);
            }
            let mut a = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--allow-any", "capture"]);
            let cookies: Vec<u64> = (0..cases.len()).map(|i| topo.pod(&format!("c{i}")).cookie().expect("cookie")).collect();
            a.wait_pods(&cookies, 1, Duration::from_secs(30));
            agent = Some(a);
        }
    }

    let mut svc_specs = Vec::new();
    for p in SVC_TCP_PORTS {
        svc_specs.push(ListenSpec::tcp("svc", SocketAddr::new(SVC.into(), *p)));
    }
    svc_specs.push(ListenSpec::udp("svc", SocketAddr::new(SVC.into(), 53)));
    svc_specs.push(ListenSpec::udp("svc", SocketAddr::new(SVC.into(), 5353)));
    svc_specs.push(ListenSpec::tcp("svc", SocketAddr::new(SVC6.into(), 80)));
    svc_specs.push(ListenSpec::tcp("svc", SocketAddr::new(SVC6.into(), 32000)));
    let svc_listeners = Listeners::start(topo.services(), &svc_specs).expect("service listeners");
    let peer_listeners = Listeners::start(
        peer.netns(),
        &[
            ListenSpec::tcp("peer", SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 8080)),
            ListenSpec::tcp("peer", SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080)),
        ],
    )
    .expect("peer listeners");

    let probe = Probe::at(probe_bin!());
    let mut result = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let pod = topo.pod(&format!("c{i}"));
        let m = matrix(case, pod, peer);
        let app_listeners = pod_listeners(pod);
        let proxies = start_proxy_listeners(pod, case.proxy);
        let tag = match mode {
            Mode::Iptables => 'i',
            Mode::Sidecap => 's',
        };
        let token = |j: usize| format!("t{tag}{i}x{j}");

        // Start every connection at once; each is bounded by CONNECT_TIMEOUT_MS.
        enum Pending {
            Probe(Box<Spawned>, ConnectOpts, String),
            Thread(std::thread::JoinHandle<NetnsConnect>),
        }
        let mut pending = Vec::new();
        for (j, c) in m.iter().enumerate() {
            let mut opts = ConnectOpts::send(&token(j));
            opts.timeout_ms = Some(CONNECT_TIMEOUT_MS);
            opts.udp = c.udp;
            let target = c.target.to_string();
            let (where_, creds) = match c.client {
                Client::App => (pod, APP),
                Client::Proxy => (pod, case.proxy),
                Client::Gid => (pod, Creds { uid: APP.uid, gid: case.proxy.gid }),
                Client::Proxy6 => {
                    opts.bind = Some("127.0.0.6".into());
                    (pod, case.proxy)
                }
                Client::Peer => (peer, APP),
                Client::SvcNs => {
                    let h = connect_from(topo.services(), c.target, &token(j), c.udp, Duration::from_millis(CONNECT_TIMEOUT_MS))
                        .expect("connect from services netns");
                    pending.push(Pending::Thread(h));
                    continue;
                }
            };
            pending.push(Pending::Probe(Box::new(probe.start_connect(where_, creds, &target, &opts)), opts, target));
        }
        let mut client_err: Vec<Option<String>> = Vec::new();
        for p in pending {
            client_err.push(match p {
                Pending::Probe(mut s, opts, target) => {
                    let r = probe.finish_connect(&mut s, &target, &opts);
                    (!r.ok).then(|| format!("{}:{}", r.stage, r.errno.map(|e| e.to_string()).unwrap_or_default()))
                }
                Pending::Thread(h) => {
                    let r = h.join().expect("connect thread");
                    (!r.ok).then(|| r.error.unwrap_or_default())
                }
            });
        }

        // Who got which token. Listeners report when the connection ends: wait (bounded)
        // until every connection the client saw succeed has been reported somewhere.
        let collect = || -> HashMap<String, Vec<Outcome>> {
            let mut by_token: HashMap<String, Vec<Outcome>> = HashMap::new();
            let hits: Vec<Hit> = [&app_listeners, &svc_listeners, &peer_listeners].iter().flat_map(|l| l.hits()).collect();
            for h in hits {
                by_token
                    .entry(h.received.trim().to_owned())
                    .or_default()
                    .push(Outcome::Direct(format!("{}@{}", h.name, h.local)));
            }
            for l in &proxies {
                for (t, o) in l.outcomes() {
                    by_token.entry(t).or_default().push(o);
                }
            }
            by_token
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut by_token = collect();
        while Instant::now() < deadline && (0..m.len()).any(|j| client_err[j].is_none() && !by_token.contains_key(&token(j))) {
            std::thread::sleep(Duration::from_millis(20));
            by_token = collect();
        }
        let outcomes: Vec<(String, Outcome)> = (0..m.len())
            .map(|j| {
                let o = match by_token.get(&token(j)).map(Vec::as_slice) {
                    Some([o]) => o.clone(),
                    Some(many) => Outcome::Failed(format!("seen {} times: {many:?}", many.len())),
                    None => Outcome::Failed(client_err[j].clone().unwrap_or_else(|| "ok but unseen".into())),
                };
                (m[j].label.clone(), o)
            })
            .collect();
        result.push(outcomes);
        drop(proxies);
        drop(app_listeners);
    }
    if let Some(a) = agent.as_mut() {
        a.assert_running();
    }
    drop(agent);
    eprintln!("differential: {mode:?} run took {:?}", t0.elapsed());
    result
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

/// `- name: X` entries of a CASES.yaml.
fn index_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- name:"))
        .map(|n| n.split('#').next().unwrap_or("").trim().to_owned())
        .collect()
}

#[test]
fn sidecap_agrees_with_istio_init_golden_rules() {
    require_root!();
    let started = Instant::now();
    let dir = golden_dir();
    let cases = cases();

    // Every case of both indexes is either run or skipped with a reason.
    for sub in ["cni-plugin", "capture"] {
        for name in index_names(&dir.join(sub).join("CASES.yaml")) {
            let id = format!("{sub}/{name}");
            let run = cases.iter().any(|c| c.id == id);
            let skipped = SKIPPED.iter().any(|(s, _)| *s == id);
            assert!(run != skipped, "{id}: must be exactly one of run / skipped (run={run}, skipped={skipped})");
        }
    }
    for (id, _) in SKIPPED {
        assert!(!cases.iter().any(|c| c.id == *id), "{id} both run and skipped");
    }

    let goldens: Vec<GoldenRules> = cases
        .iter()
        .map(|c| {
            let p = dir.join(c.golden);
            let g = parse_golden(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
            assert_eq!(g.v6.is_some(), c.v6, "{}: IPv6 rules present = {}", c.id, g.v6.is_some());
            assert!(!g.v4.contains("TPROXY"), "{}: TPROXY golden in the REDIRECT set", c.id);
            g
        })
        .collect();

    let ipt = run_mode(Mode::Iptables, &cases, &goldens);
    let sc = run_mode(Mode::Sidecap, &cases, &goldens);

    // Names only depend on pod indexes, which both runs share.
    let topo_names = |i: usize| {
        let peer_idx = cases.len() as u8 + 1;
        let ip4 = |k: u8| Ipv4Addr::new(10, 251, k, 2);
        let ip6 = |k: u8| Ipv6Addr::new(0xfd00, 0x5ca9, 0, 0, 0, 0, k as u16, 2);
        let k = i as u8 + 1;
        Names {
            map: vec![
                (SVC.into(), "svc"),
                (SVC6.into(), "svc6"),
                (ip4(k).into(), "self"),
                (ip6(k).into(), "self6"),
                (ip4(peer_idx).into(), "peer"),
                (ip6(peer_idx).into(), "peer6"),
            ],
        }
    };

    let mut total = 0;
    let mut agree = 0;
    let mut excepted = 0;
    let mut unexpected = Vec::new();
    let mut exception_hits: Vec<Vec<(String, String)>> = EXCEPTIONS.iter().map(|_| Vec::new()).collect();
    let mut table = String::new();
    table.push_str(&format!("{:<36} {:<30} {:<34} {:<34} {}\n", "case", "connection", "iptables", "sidecap", ""));
    for (i, case) in cases.iter().enumerate() {
        let names = topo_names(i);
        assert_eq!(ipt[i].len(), sc[i].len());
        for ((label, a), (label_sc, b)) in ipt[i].iter().zip(&sc[i]) {
            assert_eq!(label, label_sc, "both runs use the same matrix");
            total += 1;
            let (sa, sb) = (a.show(&names), b.show(&names));
            let verdict = if a.same(b) {
                agree += 1;
                "="
            } else if let Some(k) = EXCEPTIONS.iter().position(|e| {
                e.cases.contains(&case.id) && e.conns.contains(&label.as_str()) && sa.starts_with(e.iptables) && sb.starts_with(e.sidecap)
            }) {
                excepted += 1;
                exception_hits[k].push((case.id.to_owned(), label.clone()));
                "~ documented"
            } else {
                unexpected.push(format!("{}: {label}: iptables {sa}, sidecap {sb}", case.id));
                "!= DIFFERENT"
            };
            table.push_str(&format!("{:<36} {:<30} {:<34} {:<34} {verdict}\n", case.id, label, sa, sb));
        }
    }
    println!("{table}");
    println!("skipped cases:");
    for (id, why) in SKIPPED {
        println!("  {id}: {why}");
    }
    println!("documented differences:");
    for (e, hits) in EXCEPTIONS.iter().zip(&exception_hits) {
        println!(
            "  {} connection(s): iptables {}, sidecap {}: {}",
            hits.len(),
            e.iptables,
            e.sidecap,
            e.reason.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    println!(
        "differential: {} cases, {total} connections, {agree} agree, {excepted} documented differences, {} unexpected ({:?})",
        cases.len(),
        unexpected.len(),
        started.elapsed()
    );

    // No exception may rot: each listed (case, connection) must have occurred as described.
    for (e, hits) in EXCEPTIONS.iter().zip(&exception_hits) {
        for c in e.cases {
            for conn in e.conns {
                assert!(
                    hits.iter().any(|(hc, hl)| hc == c && hl == conn),
                    "documented difference did not occur: {c}: {conn} (iptables {}, sidecap {})",
                    e.iptables,
                    e.sidecap
                );
            }
        }
    }
    assert!(unexpected.is_empty(), "{} connection(s) differ from istio-init:\n{}", unexpected.len(), unexpected.join("\n"));
}
