//! What changed between two generations, per map, so that an update writes only that.

use std::collections::BTreeMap;

use sidecap_common::{CidrKey, CidrRule, InPortKey, InPortRule, ListenerKey, ListenerRule, PodConfig, PortKey, PortRule};

use super::Generation;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapDiff<K, V> {
    fn default() -> Self {
        MapDiff { upserts: Vec::new(), deletes: Vec::new() }
    }
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// Apply order for an atomic switch: upsert rules, write `pod`, then delete rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationDiff {
    /// The new `PODS` value when it changed.
    pub pod: Option<PodConfig>,
    pub out_ports: MapDiff<PortKey, PortRule>,
    pub out_cidrs: MapDiff<(u32, CidrKey), CidrRule>,
    pub listeners: MapDiff<(u32, ListenerKey), ListenerRule>,
    pub in_ports: MapDiff<InPortKey, InPortRule>,
}

impl GenerationDiff {
    pub fn is_empty(&self) -> bool {
        self.pod.is_none()
            && self.out_ports.is_empty()
            && self.out_cidrs.is_empty()
            && self.listeners.is_empty()
            && self.in_ports.is_empty()
    }
}

fn map_diff<K: Ord + Clone, V: PartialEq + Clone>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> MapDiff<K, V> {
    MapDiff {
        upserts: new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        deletes: old.keys().filter(|k| !new.contains_key(*k)).cloned().collect(),
    }
}

/// Entries to write and delete to turn `old` into `new`. With a fresh policy id in `new` every
/// rule is new (the atomic switch); with the same id only changed entries appear.
pub fn diff(old: &Generation, new: &Generation) -> GenerationDiff {
    GenerationDiff {
        pod: (old.pod != new.pod).then_some(new.pod),
        out_ports: map_diff(&old.out_ports, &new.out_ports),
        out_cidrs: map_diff(&old.out_cidrs, &new.out_cidrs),
        listeners: map_diff(&old.listeners, &new.listeners),
        in_ports: map_diff(&old.in_ports, &new.in_ports),
    }
}

impl GenerationDiff {
    /// `old` with this diff applied (used to check that a diff is complete).
    pub fn apply(&self, old: &Generation) -> Generation {
        fn apply_map<K: Ord + Clone, V: Clone>(m: &mut BTreeMap<K, V>, d: &MapDiff<K, V>) {
            for (k, v) in &d.upserts {
                m.insert(k.clone(), v.clone());
            }
            for k in &d.deletes {
                m.remove(k);
            }
        }
        let mut g = old.clone();
        if let Some(p) = self.pod {
            g.pod = p;
        }
        apply_map(&mut g.out_ports, &self.out_ports);
        apply_map(&mut g.out_cidrs, &self.out_cidrs);
        apply_map(&mut g.listeners, &self.listeners);
        apply_map(&mut g.in_ports, &self.in_ports);
        g
    }
}
