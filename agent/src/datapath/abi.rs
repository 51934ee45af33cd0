//! The pinned layout's version (`sidecap_common::abi::VERSION`): checked before any pinned
//! map is reused or read, stamped into `maps/ABI_VERSION` once this version's maps are in
//! place. Maps of another layout are refused, never misread.

use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo};
use sidecap_common::abi;

use super::{Error, install::map_pin};

/// Checks that the maps pinned under `bpffs` (if any) have this agent's layout: the pinned
/// version first, then every pinned map's type and key/value sizes.
pub fn check(bpffs: &Path) -> Result<(), Error> {
    let pinned: Vec<&abi::MapDef> = abi::MAPS.iter().filter(|m| map_pin(bpffs, m.name).exists()).collect();
    if pinned.is_empty() {
        return Ok(()); // A fresh install.
    }
    let version = pinned_version(bpffs)?;
    // 0 with the version map present: made by this layout's loader, not stamped yet.
    let has_version_map = pinned.iter().any(|m| m.name == abi::ABI_VERSION.name);
    if version != abi::VERSION && (version != 0 || !has_version_map) {
        return Err(Error::AbiVersion { path: bpffs.into(), pinned: version, ours: abi::VERSION });
    }
    for m in pinned {
        let info = MapInfo::from_pin(map_pin(bpffs, m.name)).map_err(|source| Error::Map { name: m.name, source })?;
        let map_type = info.map_type().map_err(|source| Error::Map { name: m.name, source })? as u32;
        for (field, have, want) in
            [("type", map_type, m.map_type), ("key size", info.key_size(), m.key_size), ("value size", info.value_size(), m.value_size)]
        {
            if have != want {
                return Err(Error::AbiLayout { name: m.name, field, pinned: have, ours: want });
            }
        }
    }
    Ok(())
}

/// The version stamped under `bpffs`; 0 when the maps carry none (made before versioning).
fn pinned_version(bpffs: &Path) -> Result<u32, Error> {
    let path = map_pin(bpffs, abi::ABI_VERSION.name);
    if !path.exists() {
        return Ok(0);
    }
    let name = abi::ABI_VERSION.name;
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    let map: Array<MapData, u32> = Map::from_map_data(data).and_then(Array::try_from).map_err(|source| Error::Map { name, source })?;
    map.get(&0, 0).map_err(|source| Error::Map { name, source })
}

/// Records this layout's version in the loaded (and pinned) `ABI_VERSION` map.
pub fn stamp(ebpf: &mut aya::Ebpf) -> Result<(), Error> {
    let name = abi::ABI_VERSION.name;
    let map = ebpf.map_mut(name).ok_or(Error::MissingMap { name })?;
    let mut version: Array<&mut MapData, u32> = Array::try_from(map).map_err(|source| Error::Map { name, source })?;
    version.set(0, abi::VERSION, 0).map_err(|source| Error::Map { name, source })
}

#[cfg(test)]
mod tests {
    use sidecap_common::abi;

    use super::super::EBPF_OBJECT;

    /// The object the agent embeds defines exactly the maps of the shared ABI, each with
    /// its name, type, key/value sizes and compiled capacity, besides the per-load trace
    /// maps (`UNPINNED_MAPS`) and the data sections of its globals.
    #[test]
    fn object_maps_match_the_shared_abi() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("parse the embedded eBPF object");
        let unpinned = crate::datapath::UNPINNED_MAPS;
        assert!(unpinned.iter().all(|m| obj.maps.contains_key(*m)), "trace maps missing from the object");
        let mut in_object: Vec<&str> =
            obj.maps.keys().map(String::as_str).filter(|n| !unpinned.contains(n) && !n.starts_with('.')).collect();
        let mut in_abi: Vec<&str> = abi::MAPS.iter().map(|m| m.name).collect();
        in_object.sort_unstable();
        in_abi.sort_unstable();
        assert_eq!(in_object, in_abi, "maps in the object vs sidecap_common::abi::MAPS");
        for want in abi::MAPS {
            let m = &obj.maps[want.name];
            let have = abi::MapDef {
                name: want.name,
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
            };
            assert_eq!(&have, want, "map {}", want.name);
        }
    }

    #[test]
    fn map_names_are_unique() {
        let mut names: Vec<&str> = abi::MAPS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), abi::MAPS.len());
    }
}
