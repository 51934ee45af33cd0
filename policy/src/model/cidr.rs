//! IP prefixes, kept as 16-byte IPv4-mapped addresses like the kernel maps keep them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix. `len` counts bits of the address's own family (0..=32 or 0..=128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR")]
    Invalid(String),
}

impl Cidr {
    /// A prefix; an IPv4-mapped IPv6 address with a length ≥ 96 becomes the IPv4 prefix it is.
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        match addr {
            IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr { addr: IpAddr::V4(v4), len: (len - 96).min(32) },
                None => Cidr { addr, len: len.min(128) },
            },
            IpAddr::V6(_) => Cidr { addr, len: len.min(128) },
            IpAddr::V4(_) => Cidr { addr, len: len.min(32) },
        }
    }

    /// True for an IPv6 prefix that also covers `::ffff:0:0/96` in the maps' address space
    /// (e.g. `::/0`), which must not capture or exclude IPv4 destinations.
    pub fn covers_v4_mapped_space(&self) -> bool {
        self.addr.is_ipv6() && self.len < 96 && mask(V4_MAPPED_SPACE, u32::from(self.len)) == self.mapped_network()
    }

    /// Containment in the maps' 128-bit space, as the kernel's LPM trie sees it.
    pub fn contains_mapped(&self, ip: IpAddr) -> bool {
        mask(Self::mapped(canonical(ip)), self.mapped_len()) == self.mapped_network()
    }

    pub fn host(addr: IpAddr) -> Cidr {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, len }
    }

    /// Address bytes in the maps' form: IPv4 as `::ffff:a.b.c.d`.
    pub fn mapped(addr: IpAddr) -> [u8; 16] {
        match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// Prefix length over the 128-bit mapped address.
    pub fn mapped_len(&self) -> u32 {
        if self.addr.is_ipv4() { 96 + u32::from(self.len) } else { u32::from(self.len) }
    }

    /// The prefix with host bits cleared, in mapped form.
    pub fn mapped_network(&self) -> [u8; 16] {
        mask(Self::mapped(self.addr), self.mapped_len())
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.addr.is_ipv4() != is_v4ish(ip) {
            return false;
        }
        let a = mask(Self::mapped(canonical(ip)), self.mapped_len());
        a == self.mapped_network()
    }

    /// True when every address of `other` is inside `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4() && self.len <= other.len && self.contains(other.addr)
    }
}

/// IPv4-mapped IPv6 addresses behave as IPv4 (v4-mapped sockets).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn is_v4ish(ip: IpAddr) -> bool {
    canonical(ip).is_ipv4()
}

/// Clears every bit after the first `bits` of a 16-byte address.
pub fn mask(mut a: [u8; 16], bits: u32) -> [u8; 16] {
    for (i, byte) in a.iter_mut().enumerate() {
        let start = (i as u32) * 8;
        if bits <= start {
            *byte = 0;
        } else if bits < start + 8 {
            let keep = bits - start;
            *byte &= 0xffu8 << (8 - keep);
        }
    }
    a
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `a.b.c.d/n`, `v6/n`, or a bare address (a host prefix).
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let bad = || CidrError::Invalid(s.to_string());
        match s.split_once('/') {
            None => s.parse::<IpAddr>().map(|a| Cidr::host(canonical(a))).map_err(|_| bad()),
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                if l.is_empty() || !l.bytes().all(|c| c.is_ascii_digit()) || l.len() > 3 {
                    return Err(bad());
                }
                let len: u8 = l.parse().map_err(|_| bad())?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if len > max {
                    return Err(bad());
                }
                Ok(Cidr::new(addr, len))
            }
        }
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `::ffff:0.0.0.0`, the start of the IPv4-mapped space.
const V4_MAPPED_SPACE: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];

/// Unspecified addresses, used for wildcard listeners.
pub const V4_ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
pub const V6_ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contain() {
        let c: Cidr = "10.0.0.0/8".parse().expect("valid cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("11.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")), "v4-mapped behaves as v4");
        assert!(!c.contains("::1".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let h: Cidr = "2001:db8::1".parse().expect("v6 host");
        assert_eq!(h.len, 128);
        let wide: Cidr = "0.0.0.0/0".parse().expect("all v4");
        assert!(wide.covers(&c));
        assert!(!c.covers(&wide));
        assert_eq!(c.mapped_len(), 104);
    }

    #[test]
    fn mask_clears_host_bits() {
        let c: Cidr = "10.1.2.3/16".parse().expect("cidr");
        assert_eq!(&c.mapped_network()[12..], &[10, 1, 0, 0]);
    }
}
