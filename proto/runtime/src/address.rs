//! The one definition of a network address in a registry object: an
//! endpoint's `address` and a region's `edge_address` are `host:port`,
//! nothing more. The control plane refuses anything else at write time and
//! the edge reads addresses with the same function, so an address the
//! control plane accepted is one every edge can use. Schemes are refused
//! rather than interpreted: how a hop is secured is the mesh's decision
//! (its TLS settings), not a property an admin writes into one object.

use http::uri::Authority;

/// Why a string is not a usable `host:port` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty string.
    #[error("address is empty; expected host:port")]
    Empty,
    /// A scheme such as `https://` was given.
    #[error(
        "{address:?} has a scheme; addresses are host:port (TLS between components is set by the mesh, not per address)"
    )]
    Scheme {
        /// The offending address.
        address: String,
    },
    /// A path, query or user info was given.
    #[error("{address:?} must be host:port with no path, query or user info")]
    Extra {
        /// The offending address.
        address: String,
    },
    /// No port, or a port outside 1..=65535.
    #[error("{address:?} needs a port in 1..=65535")]
    Port {
        /// The offending address.
        address: String,
    },
    /// The host part is empty, has whitespace or an unbracketed IPv6 literal.
    #[error("{address:?} is not host:port (IPv6 hosts go in brackets: [::1]:8080)")]
    Host {
        /// The offending address.
        address: String,
    },
}

/// Parses a `host:port` address (IPv6 hosts in brackets) into the
/// authority an HTTP client connects to.
pub fn host_port(address: &str) -> Result<Authority, AddressError> {
    if address.is_empty() {
        return Err(AddressError::Empty);
    }
    let owned = || address.to_string();
    if address.contains("://") {
        return Err(AddressError::Scheme { address: owned() });
    }
    if address.contains(['/', '?', '#', '@']) {
        return Err(AddressError::Extra { address: owned() });
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or(AddressError::Port { address: owned() })?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(AddressError::Port { address: owned() }),
    }
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    let host_ok = !host.is_empty()
        && !host.contains(|c: char| c.is_whitespace() || c.is_control())
        && (bracketed || !host.contains(['[', ']', ':']));
    if !host_ok {
        return Err(AddressError::Host { address: owned() });
    }
    address
        .parse::<Authority>()
        .map_err(|_| AddressError::Host { address: owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_forms_that_every_component_accepts() {
        for ok in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "pod.ns.svc:80",
            "edge-eu:443",
        ] {
            let authority = host_port(ok).unwrap();
            assert_eq!(authority.as_str(), ok);
            assert!(authority.port_u16().is_some());
        }
    }

    #[test]
    fn schemes_paths_and_missing_ports_are_refused_with_their_reason() {
        let cases = [
            ("", "empty"),
            ("https://edge.example.com:443", "scheme"),
            ("http://edge:80", "scheme"),
            ("edge:80/v1", "path"),
            ("user@edge:80", "user info"),
            ("edge", "port"),
            ("edge:0", "port"),
            ("edge:65536", "port"),
            ("edge:http", "port"),
            (":80", "not host:port"),
            ("::1:80", "brackets"),
            ("[]:80", "brackets"),
            ("not an address:80", "not host:port"),
        ];
        for (address, reason) in cases {
            let error = host_port(address).unwrap_err().to_string();
            assert!(error.contains(reason), "{address:?}: {error}");
        }
    }
}
