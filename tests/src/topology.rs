//! "Pods" and a "services" netns joined by veth pairs that never touch the root netns.
//!
//! Addressing (pod index i = 1, 2, … in the order pods were added, at most 99):
//!   pod i   eth0      10.251.i.2/24        fd00:5ca9::i:2/112   (i in hex for v6)
//!   services vp<i>    10.251.i.1/24        fd00:5ca9::i:1/112
//!   pod routes        10.251.0.0/16 via 10.251.i.1, fd00:5ca9::/64 via fd00:5ca9::i:1
//! Extra service addresses (e.g. 10.251.100.10, fd00:5ca9::100:10) sit on the services
//! netns' `lo`. The services netns forwards between pods (forwarding enabled there only).
//! There is no default route: any address outside the sandbox is unreachable from a pod.
//! v6 stays inside fd00:5ca9::/64 (the range the sandbox may use), hence /112 links.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cgroup::TestCgroup;
use crate::netns::Netns;
use crate::util::assert_allowed_addr;

/// A pod: its own netns plus its own cgroup (a child of the topology's cgroup).
#[derive(Debug)]
pub struct Pod {
    name: String,
    index: u8,
    netns: Netns,
    cgroup: TestCgroup,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// 1-based index; determines the addresses.
    pub fn index(&self) -> u8 {
        self.index
    }
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }
    /// The pod IP (eth0), 10.251.i.2.
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.index, 2)
    }
    /// The pod's v6 IP, fd00:5ca9::i:2.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x5ca9, 0, 0, 0, 0, self.index as u16, 2)
    }
    /// The services-side end of the pod's link, 10.251.i.1 (the pod's gateway).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.index, 1)
    }
    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x5ca9, 0, 0, 0, 0, self.index as u16, 1)
    }
    /// Netns cookie (sidecap's pod key).
    pub fn cookie(&self) -> io::Result<u64> {
        self.netns.cookie()
    }
    /// A child cgroup of the pod's cgroup (e.g. one per container: "app", "proxy").
    pub fn container_cgroup(&self, name: &str) -> io::Result<TestCgroup> {
        self.cgroup.child(name)
    }
}

#[derive(Default)]
pub struct TopologyBuilder {
    pods: Vec<String>,
    service_addrs: Vec<IpAddr>,
    pods_under: Option<String>,
}

impl TopologyBuilder {
    pub fn pod(mut self, name: &str) -> Self {
        self.pods.push(name.to_owned());
        self
    }

    /// An extra address on the services netns (10.251.0.0/16 or fd00:5ca9::/64, outside
    /// the pod link subnets), reachable from every pod.
    pub fn service_addr(mut self, addr: impl Into<IpAddr>) -> Self {
        self.service_addrs.push(addr.into());
        self
    }

    /// Put the pods' cgroups in a child cgroup `name` of the topology's (as a node's pods
    /// are all under `kubepods`), not directly in it.
    pub fn pods_under(mut self, name: &str) -> Self {
        self.pods_under = Some(name.to_owned());
        self
    }

    pub fn build(self) -> io::Result<Topology> {
        assert!(self.pods.len() <= 99, "at most 99 pods (10.251.1-99.0/24)");
        let cgroup = TestCgroup::new("topo")?;
        let services = Netns::new("svc")?;
        disable_dad(&services)?;
        // Routing between pods happens in the services netns only.
        services.sysctl("net.ipv4.ip_forward", "1")?;
        services.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let pods_cgroup = self.pods_under.as_deref().map(|n| cgroup.child(n)).transpose()?;
        let mut topo = Topology { pods: Vec::new(), pods_cgroup, services, cgroup, service_addrs: Vec::new() };
        for addr in &self.service_addrs {
            topo.add_service_addr(*addr)?;
        }
        for (i, name) in self.pods.iter().enumerate() {
            topo.add_pod_at(name, (i + 1) as u8)?;
        }
        Ok(topo)
    }
}

/// Owns everything it made. Drop order: pod processes are killed (cgroup), then the
/// namespaces are deleted (taking the veths with them), then the cgroups are removed.
#[derive(Debug)]
pub struct Topology {
    pods: Vec<Pod>,
    /// Where the pods' cgroups are when not directly in `cgroup` (see `pods_under`).
    pods_cgroup: Option<TestCgroup>,
    services: Netns,
    cgroup: TestCgroup,
    service_addrs: Vec<IpAddr>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The pod named `name`; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name:?} in topology"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn services(&self) -> &Netns {
        &self.services
    }

    /// Parent cgroup of all pods: where a test attaches sidecap's cgroup programs.
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    /// The cgroup that holds the pods' cgroups: [`Topology::cgroup`] or its `pods_under` child.
    pub fn pods_cgroup(&self) -> &TestCgroup {
        self.pods_cgroup.as_ref().unwrap_or(&self.cgroup)
    }

    /// Adds a pod after build (the next free index); returns it.
    pub fn add_pod(&mut self, name: &str) -> io::Result<&Pod> {
        let index = self.pods.iter().map(|p| p.index).max().unwrap_or(0) + 1;
        assert!(index <= 99, "at most 99 pods (10.251.1-99.0/24)");
        self.add_pod_at(name, index)?;
        Ok(self.pods.last().expect("just added"))
    }

    /// Removes a pod as a node does when it is deleted: its processes are killed, its netns
    /// deleted (taking its veth with it) and its cgroup removed.
    pub fn remove_pod(&mut self, name: &str) {
        let i = self.pods.iter().position(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name:?} in topology"));
        let pod = self.pods.remove(i);
        if let Err(e) = pod.cgroup.kill_all() {
            eprintln!("sidecap-tests: pod {name} cgroup kill: {e}");
        }
        drop(pod);
    }

    pub fn service_addrs(&self) -> &[IpAddr] {
        &self.service_addrs
    }

    /// Add another address to the services netns after build.
    pub fn add_service_addr(&mut self, addr: IpAddr) -> io::Result<()> {
        assert_allowed_addr(addr);
        assert!(!addr.is_loopback(), "service address must not be loopback");
        let cidr = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", "lo"];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        self.services.ip(&args)?;
        self.service_addrs.push(addr);
        Ok(())
    }

    fn add_pod_at(&mut self, name: &str, index: u8) -> io::Result<()> {
        assert!(self.pods.iter().all(|p| p.name != name), "duplicate pod name {name:?}");
        let netns = Netns::new(&format!("pod-{index}"))?;
        disable_dad(&netns)?;
        let cgroup = self.pods_cgroup().child(&format!("pod-{name}"))?;
        let pod = Pod { name: name.to_owned(), index, netns, cgroup };
        let svc_if = format!("vp{index}");
        // Created inside the services netns with its peer created directly in the pod netns:
        // neither end ever exists in the root namespace.
        self.services
            .ip(&["link", "add", &svc_if, "type", "veth", "peer", "name", "eth0", "netns", pod.netns.name()])?;
        let (p4, g4, p6, g6) = (pod.ipv4(), pod.gateway_v4(), pod.ipv6(), pod.gateway_v6());
        for ip in [IpAddr::V4(p4), IpAddr::V4(g4), IpAddr::V6(p6), IpAddr::V6(g6)] {
            assert_allowed_addr(ip);
        }
        let s = &self.services;
        s.ip(&["addr", "add", &format!("{g4}/24"), "dev", &svc_if])?;
        s.ip(&["addr", "add", &format!("{g6}/112"), "dev", &svc_if, "nodad"])?;
        s.ip(&["link", "set", &svc_if, "up"])?;
        let n = &pod.netns;
        n.ip(&["addr", "add", &format!("{p4}/24"), "dev", "eth0"])?;
        n.ip(&["addr", "add", &format!("{p6}/112"), "dev", "eth0", "nodad"])?;
        n.ip(&["link", "set", "eth0", "up"])?;
        n.ip(&["route", "add", "10.251.0.0/16", "via", &g4.to_string(), "dev", "eth0"])?;
        n.ip(&["-6", "route", "add", "fd00:5ca9::/64", "via", &g6.to_string(), "dev", "eth0"])?;
        self.pods.push(pod);
        Ok(())
    }
}

// `nodad` covers the addresses we add, but not the kernel's link-local ones: while those
// are tentative, neighbour discovery through the services netns stalls for ~2 s. Set
// before the veth ends arrive so they inherit it.
fn disable_dad(ns: &Netns) -> io::Result<()> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Kill first so no process keeps a namespace alive or blocks the cgroup rmdir.
        if let Err(e) = self.cgroup.kill_all() {
            eprintln!("sidecap-tests: topology cgroup kill: {e}");
        }
        // Fields then drop in order: pods (netns delete, cgroup rmdir), services, cgroup.
    }
}
