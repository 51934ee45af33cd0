//! Content-addressed rule sets. In Istio's default mesh every pod of a node imports the same
//! ~10,000 services: their compiled rules are identical, so they share one policy id in the
//! kernel, written once and removed when the last pod leaves it. The agent keeps one copy of
//! each distinct set in memory, never one per pod.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use sidecap_policy::{EntryCounts, Generation};

/// One rule set in the kernel.
pub struct RuleSet {
    /// `Generation::rules_hash` of `rules`.
    pub hash: u64,
    /// The entries, keyed with policy id 0 (the kernel's keys carry the set's id).
    pub rules: Arc<Generation>,
    /// Pods whose `PODS` entry names this set.
    pub holders: usize,
}

#[derive(Default)]
pub struct RuleSets {
    sets: BTreeMap<u32, RuleSet>,
    by_hash: HashMap<u64, u32>,
    next_id: u32,
}

impl RuleSets {
    /// The sets a previous agent left in the kernel, with how many pods use each.
    pub fn adopt(kernel: BTreeMap<u32, Generation>, holders: &BTreeMap<u32, usize>) -> RuleSets {
        let mut out = RuleSets::default();
        for (id, rules) in kernel {
            let hash = rules.rules_hash();
            let n = holders.get(&id).copied().unwrap_or(0);
            // Two sets of equal content (written before sets were shared): pods of the other
            // one move to the first when they are next evaluated.
            out.by_hash.entry(hash).or_insert(id);
            out.sets.insert(id, RuleSet { hash, rules: Arc::new(rules), holders: n });
        }
        // A pod whose set has no entry at all (every rule map empty for it) still holds it.
        for (id, n) in holders {
            out.sets.entry(*id).or_insert_with(|| {
                let rules = Generation::default();
                RuleSet { hash: rules.rules_hash(), rules: Arc::new(rules), holders: *n }
            });
        }
        for (id, s) in &out.sets {
            out.by_hash.entry(s.hash).or_insert(*id);
        }
        out.next_id = out.sets.keys().next_back().copied().unwrap_or(0);
        out
    }

    pub fn get(&self, id: u32) -> Option<&RuleSet> {
        self.sets.get(&id)
    }

    /// The id of the set with this content, if one is in the kernel.
    pub fn find(&self, hash: u64) -> Option<u32> {
        self.by_hash.get(&hash).copied()
    }

    /// An id no set uses (0 is never used: it marks templates).
    pub fn fresh_id(&mut self) -> u32 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.sets.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Records a set just written under `id` (no holders yet).
    pub fn insert(&mut self, id: u32, hash: u64, rules: Arc<Generation>) {
        self.by_hash.entry(hash).or_insert(id);
        self.sets.insert(id, RuleSet { hash, rules, holders: 0 });
    }

    /// Records that set `id` now holds `rules` (updated in place).
    pub fn replace(&mut self, id: u32, hash: u64, rules: Arc<Generation>) {
        if let Some(s) = self.sets.get_mut(&id) {
            if self.by_hash.get(&s.hash) == Some(&id) {
                self.by_hash.remove(&s.hash);
            }
            s.hash = hash;
            s.rules = rules;
            self.by_hash.entry(hash).or_insert(id);
        }
    }

    pub fn hold(&mut self, id: u32) {
        if let Some(s) = self.sets.get_mut(&id) {
            s.holders += 1;
        }
    }

    /// One pod fewer on `id`; returns the set when that was the last one (the caller deletes
    /// its entries from the kernel).
    pub fn release(&mut self, id: u32) -> Option<RuleSet> {
        let s = self.sets.get_mut(&id)?;
        s.holders = s.holders.saturating_sub(1);
        if s.holders > 0 {
            return None;
        }
        self.take(id)
    }

    /// Removes a set whatever its holders (one just written that no pod could use).
    pub fn take(&mut self, id: u32) -> Option<RuleSet> {
        let s = self.sets.remove(&id)?;
        if self.by_hash.get(&s.hash) == Some(&id) {
            self.by_hash.remove(&s.hash);
            // Another set with the same content (adopted duplicates) takes its place.
            if let Some((other, _)) = self.sets.iter().find(|(_, o)| o.hash == s.hash) {
                self.by_hash.insert(s.hash, *other);
            }
        }
        Some(s)
    }

    /// Sets that no pod holds (after the first pass: what a previous agent left).
    pub fn unheld(&self) -> Vec<u32> {
        self.sets.iter().filter(|(_, s)| s.holders == 0).map(|(id, _)| *id).collect()
    }

    /// Entries of every set, per map: what the rule maps hold.
    pub fn used(&self) -> EntryCounts {
        let mut u = EntryCounts::default();
        for s in self.sets.values() {
            let c = s.rules.entry_counts();
            u.out_ports += c.out_ports;
            u.out_cidrs += c.out_cidrs;
            u.listeners += c.listeners;
            u.in_ports += c.in_ports;
        }
        u
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecap_policy::{ListenerKey, ListenerRule};

    fn set(ports: &[u16]) -> Arc<Generation> {
        let mut g = Generation::default();
        for p in ports {
            let k = ListenerKey { port: p.to_be_bytes(), ..ListenerKey::default() };
            g.listeners.insert((64, k), ListenerRule { action: 1, ..ListenerRule::default() });
        }
        Arc::new(g)
    }

    #[test]
    fn equal_content_is_found_and_the_last_holder_removes_it() {
        let mut s = RuleSets::default();
        let a = set(&[80, 443]);
        let id = s.fresh_id();
        s.insert(id, a.rules_hash(), a.clone());
        assert_eq!(s.find(set(&[80, 443]).rules_hash()), Some(id), "same content, same set");
        assert_eq!(s.find(set(&[80]).rules_hash()), None);
        s.hold(id);
        s.hold(id);
        assert!(s.release(id).is_none(), "one pod still holds it");
        assert_eq!(s.used().listeners, 2);
        assert!(s.release(id).is_some(), "the last pod leaving removes it");
        assert_eq!(s.find(a.rules_hash()), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn adopted_duplicates_fall_back_to_each_other() {
        let a = set(&[80]);
        let kernel = BTreeMap::from([(3, (*a).clone()), (7, (*a).clone()), (9, (*set(&[81])).clone())]);
        let holders = BTreeMap::from([(3, 1), (7, 2), (9, 1)]);
        let mut s = RuleSets::adopt(kernel, &holders);
        let first = s.find(a.rules_hash()).expect("adopted");
        assert!(first == 3 || first == 7);
        assert!(s.take(first).is_some());
        let other = if first == 3 { 7 } else { 3 };
        assert_eq!(s.find(a.rules_hash()), Some(other), "the duplicate takes over");
        assert!(s.fresh_id() > 9, "fresh ids never reuse adopted ones");
    }
}
