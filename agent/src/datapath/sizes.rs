//! How large the maps that grow with pods and rules are: planned from flags, never
//! discovered by a failed write. Sizes apply when the maps are created; maps pinned by an
//! earlier agent keep theirs (`Maps::capacity` reads what the kernel has).

/// Maximum entries per kind of map. The defaults fit 250 pods × 20,000 services in Istio's
/// default mesh (one shared set of 40,000 listeners per distinct scope) with room to spare,
/// and Kubernetes' largest usual node (250 pods) four times over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `PODS`, `COUNTERS`, `POD_NAMES`, `INBOUND_LISTENERS`; `POD_ADDRS` holds 4 per pod.
    pub pods: u32,
    /// `OUT_LISTENERS`: listener entries of every rule set together.
    pub listeners: u32,
    /// `OUT_PORTS`, `OUT_CIDRS`, `IN_PORTS`: port and CIDR rules of every rule set together.
    pub rules: u32,
    /// `ORIG_DST`, `ORIG_DST_BY_COOKIE`, `DNS_ORIG`: original destinations of connections
    /// between the app's connect and the proxy's accept (LRU maps, preallocated, so their
    /// size is most of the kernel memory sidecap uses: about 110 bytes per entry each).
    pub connections: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes { pods: 1024, listeners: 1 << 20, rules: 1 << 16, connections: 1 << 14 }
    }
}

use sidecap_common::abi;

impl MapSizes {
    /// (map name, max entries) for every sized map.
    pub fn per_map(&self) -> [(&'static str, u32); 12] {
        let addrs = self.pods.saturating_mul(sidecap_common::MAX_POD_IPS as u32);
        [
            (abi::PODS.name, self.pods),
            (abi::COUNTERS.name, self.pods),
            (abi::POD_NAMES.name, self.pods),
            (abi::INBOUND_LISTENERS.name, self.pods),
            (abi::POD_ADDRS.name, addrs),
            (abi::OUT_LISTENERS.name, self.listeners),
            (abi::OUT_PORTS.name, self.rules),
            (abi::OUT_CIDRS.name, self.rules),
            (abi::IN_PORTS.name, self.rules),
            (abi::ORIG_DST.name, self.connections),
            (abi::ORIG_DST_BY_COOKIE.name, self.connections),
            (abi::DNS_ORIG.name, self.connections),
        ]
    }
}
