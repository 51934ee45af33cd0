// Temporary manual smoke test (removed once the policy crate drives the agent).
use sidecap::datapath;
use sidecap_common::*;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (bpffs, cg, ns, mode) = (&a[1], &a[2], &a[3], a[4].as_str());
    let inst = datapath::install(bpffs.as_ref(), cg.as_ref()).expect("install");
    println!("{inst:?}");
    let mut maps = datapath::Maps::open(bpffs.as_ref()).expect("open");
    let cookie = sidecap::netns::cookie_of_path(ns.as_ref()).expect("cookie");
    let mut g = datapath::Generation::default();
    g.pod = PodConfig {
        policy: 7, flags: pod_flags::OUTBOUND_CAPTURE | pod_flags::INCLUDE_ALL_CIDRS | pod_flags::INBOUND_CAPTURE | pod_flags::INBOUND_ALL_PORTS, generation: 1,
        proxy_uid: 1337, proxy_gid: 1337, outbound_port: 15001, inbound_port: 15006, dns_port: 15053, tunnel_port: 15008,
        default_action: if mode == "capture" { action::CAPTURE } else if mode == "drop" { action::DROP } else { action::PASSTHROUGH },
        n_ips: 1, _pad: [0;2], ips: [addr::v4_mapped([10,251,9,2]), [0;16], [0;16], [0;16]],
    };
    maps.write(cookie, &g, None).expect("write");
    println!("sk_lookup attached: {:?}", datapath::attach_pod_netns(bpffs.as_ref(), cookie, ns.as_ref()));
    println!("cookie {cookie} written");
}
