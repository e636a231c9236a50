//! Which network addresses web-download may connect to: the server-side request forgery guard.
//!
//! A URL's host is only a name; what matters is the address the connection uses. So the check
//! runs twice: on the literal address of a URL (after the URL parser has normalised `127.1`,
//! `2130706433` and `0x7f000001` to `127.0.0.1`), and in the download client's DNS resolver, at
//! connect time, on every address a name resolves to — for the first URL and every redirect hop,
//! so a name that resolves to an allowed address when checked and to a loopback one when
//! connecting (DNS rebinding) cannot pass. IPv6 forms that carry an IPv4 address
//! (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) are
//! checked as that IPv4 address.
//!
//! Denied unless `[import.filtering] allowed_networks` lists them (the ranges of RFC 6890's
//! special-purpose registries that reach the registry host or its private networks):
//! unspecified and "this network" (`0.0.0.0/8`, `::`), loopback (`127.0.0.0/8`, `::1`),
//! private (`10/8`, `172.16/12`, `192.168/16`), shared address space (`100.64/10`), link-local
//! (`169.254/16` with the cloud metadata address 169.254.169.254, `fe80::/10`), unique-local
//! (`fc00::/7`) and site-local (`fec0::/10`), multicast (`224/4`, `ff00::/8`), and reserved and
//! broadcast (`240/4`). Addresses written in `disallowed_hosts` are refused in any of their forms.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// A network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parse `a.b.c.d/n`, `x::y/n`, or a single address.
    pub fn parse(s: &str) -> Option<Network> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(
            a.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Network { addr, prefix })
    }

    /// Whether `ip` (canonical) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// `ip` with any IPv4 address carried in IPv6 form taken out.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // IPv4-compatible (deprecated, RFC 4291 2.5.5.1), except `::` and `::1` themselves.
    if s[..6].iter().all(|x| *x == 0) && !(s[6] == 0 && s[7] <= 1) {
        return IpAddr::V4(tail);
    }
    // The NAT64 well-known prefix (RFC 6052).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(tail);
    }
    IpAddr::V6(v6)
}

/// The special-purpose range `ip` (canonical) lies in, if it is one web-download refuses.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 0 {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if a.is_private() {
                Some("private")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared address space")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else if o[0] >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if (s0 & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (s0 & 0xffc0) == 0xfec0 {
                Some("site-local")
            } else if (s0 & 0xfe00) == 0xfc00 {
                Some("unique-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// The addresses web-download may connect to, from `[import.filtering]`.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Networks allowed although special-purpose (`allowed_networks`).
    allowed: Vec<Network>,
    /// Addresses and networks refused (the address entries of `disallowed_hosts`).
    denied: Vec<Network>,
}

impl AddressPolicy {
    /// The policy of `allowed_networks` (each must parse) and `disallowed_hosts` (its address
    /// entries; names are matched by name elsewhere).
    pub fn new(allowed_networks: &[String], disallowed_hosts: &[String]) -> Result<Self, String> {
        let allowed = allowed_networks
            .iter()
            .map(|n| {
                Network::parse(n).ok_or_else(|| {
                    format!("import.filtering.allowed_networks: '{n}' is not an address or CIDR network")
                })
            })
            .collect::<Result<_, _>>()?;
        let denied = disallowed_hosts
            .iter()
            .filter_map(|h| Network::parse(h))
            .collect();
        Ok(AddressPolicy { allowed, denied })
    }

    /// Why web-download may not connect to `ip`, if it may not.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self.denied.iter().any(|n| n.contains(ip)) {
            return Err(format!("address {ip} is not allowed"));
        }
        match special_range(ip) {
            Some(range) if !self.allowed.iter().any(|n| n.contains(ip)) => Err(format!(
                "address {ip} is {range} and not in import.filtering.allowed_networks"
            )),
            _ => Ok(()),
        }
    }
}

/// The download client's resolver: names resolved by the system, then only the addresses the
/// policy allows handed to the connector.
pub struct FilteringResolver {
    policy: Arc<AddressPolicy>,
}

impl FilteringResolver {
    /// A resolver that applies `policy`.
    pub fn new(policy: Arc<AddressPolicy>) -> Self {
        FilteringResolver { policy }
    }
}

/// Resolve `host` and keep the addresses `policy` allows; an error naming the refused ones when
/// none is left.
pub async fn resolve_allowed(
    policy: &AddressPolicy,
    host: &str,
) -> std::io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    let mut why = Vec::new();
    let mut ok = Vec::new();
    for a in all {
        match policy.check(a.ip()) {
            Ok(()) => ok.push(a),
            Err(w) => why.push(w),
        }
    }
    if ok.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            if why.is_empty() {
                format!("host '{host}' has no addresses")
            } else {
                format!(
                    "host '{host}' resolves to refused addresses: {}",
                    why.join("; ")
                )
            },
        ));
    }
    Ok(ok)
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs = resolve_allowed(&policy, name.as_str()).await?;
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_carried_in_ipv6_is_checked_as_ipv4() {
        assert_eq!(canonical(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(canonical(ip("::127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(canonical(ip("64:ff9b::a9fe:a9fe")), ip("169.254.169.254"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
        assert_eq!(canonical(ip("::")), ip("::"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    #[test]
    fn special_ranges_are_refused_unless_allowed() {
        let p = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "::1",
            "0.0.0.0",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "fe80::1",
            "fd00::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::",
        ] {
            assert!(p.check(ip(a)).is_err(), "{a}");
        }
        assert!(p.check(ip("93.184.216.34")).is_ok());
        assert!(p.check(ip("2606:4700::1")).is_ok());
        let p = AddressPolicy::new(&["127.0.0.0/8".into()], &[]).unwrap();
        assert!(p.check(ip("127.0.0.1")).is_ok());
        assert!(p.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(p.check(ip("::1")).is_err());
    }

    #[test]
    fn a_denied_address_is_refused_in_every_form() {
        let p = AddressPolicy::new(&["0.0.0.0/0".into()], &["127.0.0.1".into()]).unwrap();
        assert!(p.check(ip("127.0.0.1")).is_err());
        assert!(p.check(ip("::ffff:127.0.0.1")).is_err());
        assert!(p.check(ip("::127.0.0.1")).is_err());
        assert!(p.check(ip("127.0.0.2")).is_ok());
    }

    #[test]
    fn networks_parse_with_and_without_a_prefix_and_bad_ones_are_errors() {
        assert!(Network::parse("10.0.0.0/8")
            .unwrap()
            .contains(ip("10.255.0.1")));
        assert!(!Network::parse("10.0.0.0/9")
            .unwrap()
            .contains(ip("10.128.0.1")));
        assert!(Network::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(AddressPolicy::new(&["nonsense".into()], &[]).is_err());
    }
}
