//! Pod addresses from `--pod-cidr`: the first address is the bridge's (the pods'
//! gateway and the nodes' InternalIP), the rest go to pods. An address is never given
//! to a second pod while the first still holds it; allocation goes round the range
//! (next fit), so a freed address is not handed out again at once.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an IPv4 CIDR like 10.244.0.0/16");
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=29).contains(&prefix) {
            return Err(format!(
                "{s:?}: the prefix must be between /8 and /29 (room for a gateway and pods)"
            ));
        }
        let cidr = Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        if cidr.network != addr {
            return Err(format!(
                "{s:?} has host bits set: did you mean {}/{prefix}?",
                cidr.network
            ));
        }
        if addr.is_loopback() {
            return Err(format!(
                "{s:?} is loopback: EndpointSlices refuse loopback pod addresses"
            ));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl Cidr {
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// The first address: the bridge's.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    pub fn nth(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + offset)
    }

    /// The offset of `ip` in the range, if it is in it.
    pub fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        let ip = u32::from(ip);
        (ip & mask(self.prefix) == u32::from(self.network)).then(|| ip - u32::from(self.network))
    }
}

/// Who holds which pod address (owners are pod UIDs).
#[derive(Debug)]
pub struct Ipam {
    cidr: Cidr,
    used: BTreeMap<u32, String>,
    cursor: u32,
}

impl Ipam {
    pub fn new(cidr: Cidr) -> Self {
        Self {
            cidr,
            used: BTreeMap::new(),
            cursor: 2,
        }
    }

    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    fn pod_range(&self) -> std::ops::Range<u32> {
        // Not the network address, the gateway, nor the broadcast address.
        2..self.cidr.size() - 1
    }

    /// Takes `ip` for `owner` (an address a pod already had): false if it is outside the
    /// range or another pod holds it.
    pub fn claim(&mut self, ip: Ipv4Addr, owner: &str) -> bool {
        let Some(offset) = self.cidr.offset(ip) else {
            return false;
        };
        if !self.pod_range().contains(&offset) {
            return false;
        }
        match self.used.get(&offset) {
            Some(holder) => holder == owner,
            None => {
                self.used.insert(offset, owner.to_string());
                true
            }
        }
    }

    /// A free address for `owner`, or `None` when the range is full.
    pub fn allocate(&mut self, owner: &str) -> Option<Ipv4Addr> {
        let range = self.pod_range();
        let span = range.end - range.start;
        for i in 0..span {
            let offset = range.start + (self.cursor - range.start + i) % span;
            if let std::collections::btree_map::Entry::Vacant(slot) = self.used.entry(offset) {
                slot.insert(owner.to_string());
                self.cursor = if offset + 1 >= range.end {
                    range.start
                } else {
                    offset + 1
                };
                return Some(self.cidr.nth(offset));
            }
        }
        None
    }

    /// Frees `ip` if `owner` holds it.
    pub fn release(&mut self, ip: Ipv4Addr, owner: &str) {
        if let Some(offset) = self.cidr.offset(ip)
            && self.used.get(&offset).is_some_and(|h| h == owner)
        {
            self.used.remove(&offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(c.size(), 65536);
        assert!("10.244.0.1/16".parse::<Cidr>().is_err());
        assert!("127.0.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/31".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn allocates_round_the_range_and_never_twice() {
        let mut ipam = Ipam::new("10.1.2.0/29".parse().unwrap());
        // 8 addresses: .0 network, .1 gateway, .7 broadcast: .2 to .6 for pods.
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("p{i}")).unwrap())
            .collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 1, 2, 6)));
        assert_eq!(ipam.allocate("p5"), None);
        ipam.release(Ipv4Addr::new(10, 1, 2, 4), "someone-else");
        assert_eq!(ipam.allocate("p5"), None);
        ipam.release(Ipv4Addr::new(10, 1, 2, 4), "p2");
        assert_eq!(ipam.allocate("p5"), Some(Ipv4Addr::new(10, 1, 2, 4)));
    }

    #[test]
    fn next_fit_does_not_reuse_at_once() {
        let mut ipam = Ipam::new("10.1.0.0/24".parse().unwrap());
        let a = ipam.allocate("a").unwrap();
        ipam.release(a, "a");
        assert_ne!(ipam.allocate("b").unwrap(), a);
    }

    #[test]
    fn claims_recovered_addresses() {
        let mut ipam = Ipam::new("10.1.0.0/24".parse().unwrap());
        assert!(ipam.claim(Ipv4Addr::new(10, 1, 0, 9), "a"));
        assert!(ipam.claim(Ipv4Addr::new(10, 1, 0, 9), "a"));
        assert!(!ipam.claim(Ipv4Addr::new(10, 1, 0, 9), "b"));
        assert!(!ipam.claim(Ipv4Addr::new(10, 1, 0, 1), "b"), "the gateway");
        assert!(!ipam.claim(Ipv4Addr::new(10, 2, 0, 9), "b"), "outside");
    }
}
