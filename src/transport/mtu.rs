//! The MTU of the route to a peer, read from the kernel once per connection, so that QUIC
//! can use the datagrams a path allows: 64 KiB over loopback, 9,000-byte frames on a
//! jumbo-frame network, where quinn alone starts at 1,200 bytes and never probes past 1,452.
//!
//! It is `IP_MTU` (IPv4) or `IPV6_MTU` on a UDP socket connected to the peer: the route's MTU
//! (the interface's, or the route's own `mtu` attribute, or a smaller path MTU the kernel has
//! learnt). quinn's sockets send with `IP(V6)_PMTUDISC_PROBE`, which lets datagrams up to the
//! interface's MTU leave whatever the route says, so a route's `mtu` is kept only by reading
//! it here (IPv6 used to read the interface's MTU, and over a loopback route of 1,500 bytes
//! sent 64 KiB datagrams).
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
            let mtu = connected_mtu(SocketAddr::new(ip, peer.port()))?;
            mtu.min(65_535).checked_sub(20 + 8)?
        }
        IpAddr::V6(_) => connected_mtu(peer)?.checked_sub(40 + 8)?.min(65_527),
    };
    u16::try_from(payload).ok()
}

/// The MTU of the route from a UDP socket connected to `peer`.
#[cfg(target_os = "linux")]
fn connected_mtu(peer: SocketAddr) -> Option<u32> {
    let any = match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    match peer {
        SocketAddr::V4(_) => rustix::net::sockopt::ip_mtu(&socket).ok(),
        SocketAddr::V6(_) => rustix::net::sockopt::ipv6_mtu(&socket).ok(),
    }
}

#[cfg(not(target_os = "linux"))]
fn connected_mtu(_peer: SocketAddr) -> Option<u32> {
    None
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
}
