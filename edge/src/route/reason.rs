//! Why a replica was chosen, as the numbers that decided it. Building one
//! costs no allocation; the sentence is written only when the route span
//! or a log renders it.

use std::fmt;
use std::sync::Arc;

use crate::replica::Upstream;

/// Why a policy chose its replica.
#[derive(Debug, Clone)]
pub enum Reason {
    /// Round robin's turn.
    RoundRobin {
        /// Replicas the route has.
        replicas: usize,
    },
    /// The candidate with the fewest requests in flight.
    FewestInFlight {
        /// Its requests in flight.
        in_flight: usize,
        /// Replicas the route has.
        replicas: usize,
    },
    /// Power of two choices with a single candidate left.
    OnlyCandidate,
    /// Power of two choices: the lower load score of two random candidates.
    PowerOfTwo {
        /// The chosen candidate.
        winner: Arc<Upstream>,
        /// Its load score.
        winner_score: f64,
        /// The other candidate.
        loser: Arc<Upstream>,
        /// Its load score.
        loser_score: f64,
    },
    /// The replica the session hashes to.
    Session,
    /// The session's replica was too busy: the candidate with the fewest in flight.
    SessionOwnerBusy {
        /// The session's replica.
        owner: Arc<Upstream>,
        /// Its requests in flight.
        in_flight: usize,
    },
    /// The replica holding the longest prefix of the prompt.
    PrefixMatch {
        /// Blocks of the prompt it holds.
        blocks: usize,
        /// Blocks of the prompt.
        of: usize,
    },
    /// The prefix holder was too busy: the candidate with the fewest in flight.
    PrefixHolderBusy {
        /// The replica holding the prefix.
        holder: Arc<Upstream>,
        /// Its requests in flight.
        in_flight: usize,
        /// The chosen candidate's requests in flight.
        least_in_flight: usize,
    },
    /// No candidate holds a prefix of the prompt: the fewest in flight.
    NoPrefixMatch {
        /// The chosen candidate's requests in flight.
        least_in_flight: usize,
    },
    /// The least busy replica holding the adapter.
    AdapterResident {
        /// Its requests in flight.
        in_flight: usize,
    },
    /// The replica a load of the adapter is under way on.
    AdapterLoading,
    /// No holder with room: the replica holding fewest adapters loads it.
    AdapterLoad {
        /// Adapters it holds.
        resident: usize,
        /// Its requests in flight.
        in_flight: usize,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::RoundRobin { replicas } => write!(f, "round robin over {replicas}"),
            Reason::FewestInFlight {
                in_flight,
                replicas,
            } => write!(f, "fewest in flight ({in_flight}) of {replicas}"),
            Reason::OnlyCandidate => f.write_str("only candidate"),
            Reason::PowerOfTwo {
                winner,
                winner_score,
                loser,
                loser_score,
            } => write!(
                f,
                "power of two: {} ({winner_score:.1}) over {} ({loser_score:.1})",
                winner.id, loser.id
            ),
            Reason::Session => f.write_str("session affinity"),
            Reason::SessionOwnerBusy { owner, in_flight } => write!(
                f,
                "session replica {} busy ({in_flight} in flight); fewest in flight",
                owner.id
            ),
            Reason::PrefixMatch { blocks, of } => {
                write!(f, "prefix match: {blocks} of {of} blocks")
            }
            Reason::PrefixHolderBusy {
                holder,
                in_flight,
                least_in_flight,
            } => write!(
                f,
                "prefix holder {} busy ({in_flight} in flight); fewest in flight ({least_in_flight})",
                holder.id
            ),
            Reason::NoPrefixMatch { least_in_flight } => {
                write!(f, "no prefix match; fewest in flight ({least_in_flight})")
            }
            Reason::AdapterResident { in_flight } => {
                write!(f, "adapter resident; {in_flight} in flight")
            }
            Reason::AdapterLoading => f.write_str("adapter load under way there"),
            Reason::AdapterLoad {
                resident,
                in_flight,
            } => write!(
                f,
                "adapter load: {resident} resident, {in_flight} in flight"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::replica;
    use super::*;

    #[test]
    fn reasons_read_as_the_route_span_has_always_shown_them() {
        let (a, b) = (replica("a"), replica("b"));
        let cases = [
            (Reason::RoundRobin { replicas: 3 }, "round robin over 3"),
            (
                Reason::FewestInFlight {
                    in_flight: 1,
                    replicas: 4,
                },
                "fewest in flight (1) of 4",
            ),
            (Reason::OnlyCandidate, "only candidate"),
            (
                Reason::PowerOfTwo {
                    winner: a.clone(),
                    winner_score: 1.0,
                    loser: b.clone(),
                    loser_score: 15.6,
                },
                "power of two: a (1.0) over b (15.6)",
            ),
            (Reason::Session, "session affinity"),
            (
                Reason::SessionOwnerBusy {
                    owner: a.clone(),
                    in_flight: 9,
                },
                "session replica a busy (9 in flight); fewest in flight",
            ),
            (
                Reason::PrefixMatch { blocks: 12, of: 14 },
                "prefix match: 12 of 14 blocks",
            ),
            (
                Reason::PrefixHolderBusy {
                    holder: b,
                    in_flight: 8,
                    least_in_flight: 2,
                },
                "prefix holder b busy (8 in flight); fewest in flight (2)",
            ),
            (
                Reason::NoPrefixMatch { least_in_flight: 0 },
                "no prefix match; fewest in flight (0)",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }
}
