//! TLS shared by every infermesh process: loading PEM files into rustls
//! (ring provider), the reloading HTTPS server configuration, tonic client
//! and server configurations for the control plane's gRPC, peer identities
//! carried in client certificates (`spiffe://infermesh/<role>/<name>`), and
//! a local CA for the control plane, tests and development (feature `pki`). Deciding what an identity may do
//! belongs to each process, not here.
//!
//! - edge/sidecar HTTPS: `server::server_config` → `ServerTls::acceptor` →
//!   `crate::http::serve` (`ServeOptions::tls`); handlers read `PeerIdentity` from request
//!   extensions.
//! - control-plane gRPC: `tonic_server_config` on the server, `client_config`
//!   on clients, `peer_identity(&request)` in handlers.

pub mod identity;
pub mod mesh;
pub mod pki;
pub mod server;

mod grpc;
mod pem;

pub use grpc::{
    GRPC_HANDSHAKE_TIMEOUT, client_config, peer_identity, peer_serial, tls_incoming,
    tonic_server_config,
};
pub use identity::{IdentityError, PeerIdentity, PeerRole, SidecarScope};
pub use pem::{TlsError, load_certified_key, load_certs, load_private_key, provider, root_store};
pub use server::{ClientAuth, ServerTls, server_config};
