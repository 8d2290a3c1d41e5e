//! The MTU of the route to a peer, read from the kernel once per connection, so that QUIC
//! can use the datagrams a path allows: 64 KiB over loopback, 9,000-byte frames on a
//! jumbo-frame network, where quinn alone starts at 1,200 bytes and never probes past 1,452.
//!
//! - IPv4: `IP_MTU` on a UDP socket connected to the peer: the route's MTU (the interface's,
//!   or the route's own `mtu` attribute, or a smaller path MTU the kernel has learnt).
//! - IPv6: the MTU of the interface that holds the source address the kernel picks for the
//!   peer (`/proc/net/if_inet6`, `/sys/class/net/<if>/mtu`); std and nix have no `IPV6_MTU`.
//!
//! Only the first hop is known this way: a path through routers may allow less. So over
//! anything but loopback the result is only the bound of quinn's MTU discovery, which starts
//! at 1,200 bytes and keeps the largest probe that arrives.

use std::net::{IpAddr, SocketAddr, UdpSocket};

/// The UDP payload the route to `peer` allows: its MTU less the IP and UDP headers, within
/// what one datagram can carry (an IPv4 packet is at most 65,535 bytes, headers included, so
/// loopback's 65,536-byte MTU gives 65,507; an IPv6 packet's payload, the UDP header
/// included, at most 65,535). `None` if the kernel has no route or will not say.
pub(crate) fn route_payload(peer: SocketAddr) -> Option<u16> {
    let ip = peer.ip().to_canonical();
    let payload = match ip {
        IpAddr::V4(_) => {
            let mtu = ipv4_route_mtu(SocketAddr::new(ip, peer.port()))?;
            mtu.min(65_535).checked_sub(20 + 8)?
        }
        IpAddr::V6(_) => ipv6_route_mtu(peer)?.checked_sub(40 + 8)?.min(65_527),
    };
    u16::try_from(payload).ok()
}

#[cfg(target_os = "linux")]
fn ipv4_route_mtu(peer: SocketAddr) -> Option<u32> {
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).ok()?;
    socket.connect(peer).ok()?;
    let mtu = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::IpMtu).ok()?;
    u32::try_from(mtu).ok()
}

#[cfg(not(target_os = "linux"))]
fn ipv4_route_mtu(_peer: SocketAddr) -> Option<u32> {
    None
}

fn ipv6_route_mtu(peer: SocketAddr) -> Option<u32> {
    let socket = UdpSocket::bind(SocketAddr::from(([0u16; 8], 0))).ok()?;
    socket.connect(peer).ok()?;
    let IpAddr::V6(local) = socket.local_addr().ok()?.ip() else {
        return None;
    };
    let addresses = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    let name = interface_of(&addresses, &local.octets())?;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok()?;
    mtu.trim().parse().ok()
}

/// The interface that holds `address` in `/proc/net/if_inet6`'s text: one address a line,
/// 32 hex digits, then index, prefix length, scope, flags and the interface's name.
fn interface_of<'a>(if_inet6: &'a str, address: &[u8; 16]) -> Option<&'a str> {
    let hex: String = address.iter().map(|b| format!("{b:02x}")).collect();
    if_inet6.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == hex).then(|| fields.nth(4)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_allow_the_loopback_interfaces_mtu() {
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let v4 = route_payload("127.0.0.1:4433".parse().unwrap());
        assert_eq!(v4.map(u32::from), Some(lo.min(65_535) - 28));
        if lo == 65_536 {
            assert_eq!(v4, Some(65_507), "an IPv4 packet is at most 65,535 bytes");
        }
        let mapped = route_payload("[::ffff:127.0.0.1]:4433".parse().unwrap());
        assert_eq!(mapped, v4, "a v4-mapped peer is an IPv4 peer");
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            let v6 = route_payload("[::1]:4433".parse().unwrap());
            assert_eq!(v6.map(u32::from), Some((lo - 48).min(65_527)));
        }
    }

    #[test]
    fn an_address_is_found_on_its_interface_and_nowhere_else() {
        let text = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n";
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(interface_of(text, &one), Some("lo"));
        let mut link = [0u8; 16];
        link[..2].copy_from_slice(&[0xfe, 0x80]);
        link[8..].copy_from_slice(&[0, 0xfc, 0, 0xff, 0xfe, 0, 0, 1]);
        assert_eq!(interface_of(text, &link), Some("eth0"));
        assert_eq!(interface_of(text, &[0u8; 16]), None);
        assert_eq!(interface_of("garbage\n", &one), None);
    }
}
