//! May this sidecar register this endpoint? A sidecar certificate names
//! one endpoint (`spiffe://infermesh/sidecar/<region>/<pool>/<endpoint>`);
//! its registrations must name that endpoint, pool and region, and
//! advertise an address on the IP the stream comes from. Otherwise one
//! stolen or shared sidecar certificate could register any endpoint id
//! anywhere, at any address: overwrite real replicas, send clients'
//! prompts to an address of its choosing, or fake load. Registrations are
//! also limited per identity, so a looping or hostile sidecar cannot keep
//! etcd and every edge busy with its churn.
//!
//! An endpoint id belongs to the identity that names it, so writing an
//! existing key again is what a sidecar does after a reconnect (or a pod
//! that kept its name), never another identity's overwrite.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use infermesh_proto::v1::Register;
use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use tokio::time::Instant;
use tonic::Status;

/// The registration rules of one control plane.
#[derive(Debug)]
pub struct RegistrationPolicy {
    /// Accept sidecar identities that name no endpoint (a certificate
    /// shared by many pods): only the address is then checked.
    allow_unbound: bool,
    limiter: RegistrationLimiter,
}

impl RegistrationPolicy {
    /// Rules allowing `per_minute` registrations per identity.
    pub fn new(allow_unbound: bool, per_minute: u32) -> Self {
        Self {
            allow_unbound,
            limiter: RegistrationLimiter::new(per_minute, Duration::from_secs(60)),
        }
    }

    /// Checks that `peer`, calling from `remote`, may make `register`.
    pub fn check(
        &self,
        peer: &PeerIdentity,
        register: &Register,
        remote: Option<IpAddr>,
    ) -> Result<(), Status> {
        let denied = |why: String| Err(Status::permission_denied(format!("{}: {why}", peer.uri())));
        if peer.role != PeerRole::Sidecar {
            return denied("only sidecar identities may register endpoints".into());
        }
        match &peer.scope {
            Some(scope) => {
                if register.endpoint_id != peer.name {
                    return denied(format!(
                        "may register endpoint {:?} only, not {:?}",
                        peer.name, register.endpoint_id
                    ));
                }
                if register.pool != scope.pool {
                    return denied(format!(
                        "may register in pool {:?} only, not {:?}",
                        scope.pool, register.pool
                    ));
                }
                if register.region != scope.region {
                    return denied(format!(
                        "may register in region {:?} only, not {:?}",
                        scope.region, register.region
                    ));
                }
            }
            None if self.allow_unbound => {}
            None => {
                return denied(
                    "names no endpoint: a sidecar certificate must be issued for \
                     spiffe://infermesh/sidecar/<region>/<pool>/<endpoint> \
                     (or the control plane run with --allow-unbound-sidecars)"
                        .into(),
                );
            }
        }
        own_address(&register.address, remote).or_else(|e| denied(e.to_string()))?;
        if !self.limiter.admit(&peer.uri()) {
            return Err(Status::resource_exhausted(format!(
                "{}: more than {} registrations in a minute; retry later",
                peer.uri(),
                self.limiter.limit
            )));
        }
        Ok(())
    }
}

/// Why a registration's advertised address is refused.
#[derive(Debug, thiserror::Error)]
pub enum AdvertisedAddressError {
    /// The stream's peer address is not known.
    #[error("the caller's address is unknown, so the advertised address cannot be checked")]
    UnknownCaller,
    /// The address is not `host:port`.
    #[error(transparent)]
    Malformed(#[from] infermesh_runtime::address::AddressError),
    /// The host is a name, not an IP literal.
    #[error("advertised address {address:?} must be this pod's IP address, not a name")]
    NotAnIp {
        /// The advertised address.
        address: String,
    },
    /// The IP is not the one the stream comes from.
    #[error("advertised address {address:?} is not this sidecar's own address ({remote})")]
    NotOwn {
        /// The advertised address.
        address: String,
        /// The caller's IP.
        remote: IpAddr,
    },
}

/// The advertised address must be an IP literal equal to the caller's.
fn own_address(address: &str, remote: Option<IpAddr>) -> Result<(), AdvertisedAddressError> {
    let Some(remote) = remote.map(|ip| ip.to_canonical()) else {
        return Err(AdvertisedAddressError::UnknownCaller);
    };
    let authority = infermesh_runtime::address::host_port(address)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let advertised: IpAddr = host.parse().map_err(|_| AdvertisedAddressError::NotAnIp {
        address: address.to_string(),
    })?;
    if advertised.to_canonical() != remote {
        return Err(AdvertisedAddressError::NotOwn {
            address: address.to_string(),
            remote,
        });
    }
    Ok(())
}

/// Registrations per identity in a fixed window.
#[derive(Debug)]
struct RegistrationLimiter {
    limit: u32,
    window: Duration,
    seen: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RegistrationLimiter {
    fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn admit(&self, who: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = seen.entry(who.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.limit {
            return false;
        }
        entry.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(id: &str, pool: &str, region: &str, address: &str) -> Register {
        Register {
            endpoint_id: id.into(),
            pool: pool.into(),
            region: region.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    fn local() -> Option<IpAddr> {
        Some("10.0.0.7".parse().unwrap())
    }

    fn refusal(result: Result<(), Status>) -> String {
        let status = result.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        status.message().to_string()
    }

    #[test]
    fn a_bound_sidecar_registers_its_own_endpoint_at_its_own_address() {
        let policy = RegistrationPolicy::new(false, 10);
        let me = PeerIdentity::sidecar("eu", "llama-eu", "vllm-0").unwrap();
        policy
            .check(
                &me,
                &register("vllm-0", "llama-eu", "eu", "10.0.0.7:8081"),
                local(),
            )
            .unwrap();
        let mapped = Some("::ffff:10.0.0.7".parse().unwrap());
        policy
            .check(
                &me,
                &register("vllm-0", "llama-eu", "eu", "10.0.0.7:8081"),
                mapped,
            )
            .unwrap();
    }

    #[test]
    fn another_endpoint_pool_region_or_address_is_refused_with_the_reason() {
        let policy = RegistrationPolicy::new(false, 10);
        let me = PeerIdentity::sidecar("eu", "llama-eu", "vllm-0").unwrap();
        let cases = [
            (
                register("vllm-1", "llama-eu", "eu", "10.0.0.7:8081"),
                "endpoint \"vllm-0\" only",
            ),
            (
                register("vllm-0", "qwen-eu", "eu", "10.0.0.7:8081"),
                "pool \"llama-eu\" only",
            ),
            (
                register("vllm-0", "llama-eu", "us", "10.0.0.7:8081"),
                "region \"eu\" only",
            ),
            (
                register("vllm-0", "llama-eu", "eu", "10.0.0.99:8081"),
                "not this sidecar's own",
            ),
            (
                register("vllm-0", "llama-eu", "eu", "attacker.example:443"),
                "not a name",
            ),
        ];
        for (r, why) in cases {
            let message = refusal(policy.check(&me, &r, local()));
            assert!(message.contains(why), "{message}");
            assert!(message.starts_with("spiffe://infermesh/sidecar/eu/llama-eu/vllm-0"));
        }
        let message = refusal(policy.check(
            &me,
            &register("vllm-0", "llama-eu", "eu", "10.0.0.7:8081"),
            None,
        ));
        assert!(message.contains("unknown"), "{message}");
    }

    #[test]
    fn unbound_and_non_sidecar_identities_are_refused_unless_allowed() {
        let shared = PeerIdentity::new(PeerRole::Sidecar, "shared").unwrap();
        let r = register("anything", "llama-eu", "eu", "10.0.0.7:8081");
        let message = refusal(RegistrationPolicy::new(false, 10).check(&shared, &r, local()));
        assert!(message.contains("names no endpoint"), "{message}");
        let lenient = RegistrationPolicy::new(true, 10);
        lenient.check(&shared, &r, local()).unwrap();
        let elsewhere = register("anything", "llama-eu", "eu", "10.9.9.9:8081");
        refusal(lenient.check(&shared, &elsewhere, local()));
        let edge = PeerIdentity::new(PeerRole::Edge, "eu").unwrap();
        refusal(lenient.check(&edge, &r, local()));
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_are_limited_per_identity_per_minute() {
        let policy = RegistrationPolicy::new(false, 3);
        let me = PeerIdentity::sidecar("eu", "llama-eu", "vllm-0").unwrap();
        let other = PeerIdentity::sidecar("eu", "llama-eu", "vllm-1").unwrap();
        let mine = register("vllm-0", "llama-eu", "eu", "10.0.0.7:8081");
        for _ in 0..3 {
            policy.check(&me, &mine, local()).unwrap();
        }
        let status = policy.check(&me, &mine, local()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        policy
            .check(
                &other,
                &register("vllm-1", "llama-eu", "eu", "10.0.0.7:8082"),
                local(),
            )
            .unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        policy.check(&me, &mine, local()).unwrap();
    }
}
