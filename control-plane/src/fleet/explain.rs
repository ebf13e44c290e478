//! ExplainRoute's errand desk: the admin API asks an edge attached to this
//! replica, on that edge's routing-table stream, which replica it would
//! choose, and waits for the answer with a deadline. Each question has an
//! id, and only the stream it was sent on may answer it: an edge cannot
//! answer for another. A stream that closes fails its open questions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use infermesh_proto::v1::{ExplainAnswer, ExplainQuery};
use tokio::sync::{mpsc, oneshot};

use super::StreamId;

/// How long an edge has to answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// Questions waiting to be sent, per stream: ExplainRoute is an operator's
/// call, so a few are plenty and more are refused.
const QUEUE: usize = 4;

/// Why a question got no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AskError {
    /// No edge of the region is attached to this replica.
    #[error("no edge of region {0:?} is attached to this control-plane replica")]
    NoEdge(String),
    /// The named edge is not attached to this replica.
    #[error("edge {edge:?} of region {region:?} is not attached to this control-plane replica")]
    NoSuchEdge {
        /// The region asked for.
        region: String,
        /// The edge asked for.
        edge: String,
    },
    /// The edge has questions queued already.
    #[error("edge {0:?} has other questions pending; retry")]
    Busy(String),
    /// The edge did not answer in time.
    #[error("edge {0:?} did not answer within {ANSWER_DEADLINE:?}")]
    Timeout(String),
    /// The edge's stream closed before it answered.
    #[error("edge {0:?} disconnected before answering")]
    Gone(String),
}

/// An edge stream questions can be sent on.
#[derive(Debug)]
struct Line {
    region: String,
    node_id: String,
    questions: mpsc::Sender<ExplainQuery>,
}

/// The edges attached to this replica and the questions they owe.
#[derive(Debug, Default)]
pub struct ExplainDesk {
    lines: DashMap<StreamId, Line>,
    pending: DashMap<u64, (StreamId, oneshot::Sender<ExplainAnswer>)>,
    next_id: AtomicU64,
}

impl ExplainDesk {
    /// An edge's stream opened: questions for it arrive on the receiver.
    pub fn attach(
        &self,
        stream: StreamId,
        region: &str,
        node_id: &str,
    ) -> mpsc::Receiver<ExplainQuery> {
        let (questions, rx) = mpsc::channel(QUEUE);
        self.lines.insert(
            stream,
            Line {
                region: region.to_string(),
                node_id: node_id.to_string(),
                questions,
            },
        );
        rx
    }

    /// The stream closed: its open questions fail.
    pub fn detach(&self, stream: StreamId) {
        self.lines.remove(&stream);
        self.pending.retain(|_, (asked, _)| *asked != stream);
    }

    /// An answer arrived on `stream`; one to a question it was not asked
    /// is dropped.
    pub fn answered(&self, stream: StreamId, answer: ExplainAnswer) -> bool {
        match self
            .pending
            .remove_if(&answer.id, |_, (asked, _)| *asked == stream)
        {
            Some((_, (_, reply))) => reply.send(answer).is_ok(),
            None => false,
        }
    }

    /// Asks an edge of `region` (`edge`, when named, else the first by
    /// node id) and waits for its answer.
    pub async fn ask(
        &self,
        region: &str,
        edge: Option<&str>,
        mut query: ExplainQuery,
    ) -> Result<ExplainAnswer, AskError> {
        let (stream, node_id, questions) = self.line(region, edge)?;
        query.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let id = query.id;
        let (reply, answer) = oneshot::channel();
        self.pending.insert(id, (stream, reply));
        if questions.try_send(query).is_err() {
            self.pending.remove(&id);
            return Err(AskError::Busy(node_id));
        }
        let outcome = tokio::time::timeout(ANSWER_DEADLINE, answer).await;
        self.pending.remove(&id);
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(AskError::Gone(node_id)),
            Err(_) => Err(AskError::Timeout(node_id)),
        }
    }

    /// The stream to ask.
    fn line(
        &self,
        region: &str,
        edge: Option<&str>,
    ) -> Result<(StreamId, String, mpsc::Sender<ExplainQuery>), AskError> {
        let found = self
            .lines
            .iter()
            .filter(|line| line.region == region)
            .filter(|line| edge.is_none_or(|e| line.node_id == e))
            .min_by(|a, b| a.node_id.cmp(&b.node_id))
            .map(|line| (*line.key(), line.node_id.clone(), line.questions.clone()));
        found.ok_or_else(|| match edge {
            Some(edge) => AskError::NoSuchEdge {
                region: region.to_string(),
                edge: edge.to_string(),
            },
            None => AskError::NoEdge(region.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::SubscriberBook;
    use crate::fleet::{Subscriber, SubscriberState};
    use infermesh_proto::v1::{RouteExplanation, SubscriberRole};

    fn stream(book: &SubscriberBook, node: &str) -> StreamId {
        book.open(SubscriberState::connected(
            Subscriber {
                role: SubscriberRole::Edge,
                region: "eu".into(),
                node_id: node.into(),
                identity: None,
                remote_address: None,
            },
            0,
            0,
        ))
    }

    fn answer(id: u64, chosen: &str) -> ExplainAnswer {
        ExplainAnswer {
            id,
            explanation: Some(RouteExplanation {
                chosen: chosen.into(),
                ..Default::default()
            }),
            error: String::new(),
        }
    }

    #[tokio::test]
    async fn the_asked_stream_answers_and_no_other_can() {
        let book = SubscriberBook::default();
        let desk = std::sync::Arc::new(ExplainDesk::default());
        let (a, b) = (stream(&book, "edge-a"), stream(&book, "edge-b"));
        let mut to_a = desk.attach(a, "eu", "edge-a");
        let _to_b = desk.attach(b, "eu", "edge-b");
        let asking = tokio::spawn({
            let desk = desk.clone();
            async move { desk.ask("eu", None, ExplainQuery::default()).await }
        });
        let query = to_a.recv().await.expect("the first edge by name is asked");
        assert!(
            !desk.answered(b, answer(query.id, "forged")),
            "another edge's answer is dropped"
        );
        assert!(desk.answered(a, answer(query.id, "r1")));
        let got = asking.await.unwrap().unwrap();
        assert_eq!(got.explanation.unwrap().chosen, "r1");
        assert!(
            !desk.answered(a, answer(query.id, "again")),
            "answered once"
        );
    }

    #[tokio::test]
    async fn unknown_regions_and_edges_and_closed_streams_are_errors() {
        let book = SubscriberBook::default();
        let desk = std::sync::Arc::new(ExplainDesk::default());
        let a = stream(&book, "edge-a");
        let mut to_a = desk.attach(a, "eu", "edge-a");
        assert_eq!(
            desk.ask("us", None, ExplainQuery::default()).await,
            Err(AskError::NoEdge("us".into()))
        );
        assert!(matches!(
            desk.ask("eu", Some("edge-z"), ExplainQuery::default())
                .await,
            Err(AskError::NoSuchEdge { .. })
        ));
        let asking = tokio::spawn({
            let desk = desk.clone();
            async move {
                desk.ask("eu", Some("edge-a"), ExplainQuery::default())
                    .await
            }
        });
        to_a.recv().await.unwrap();
        desk.detach(a);
        assert_eq!(asking.await.unwrap(), Err(AskError::Gone("edge-a".into())));
        assert_eq!(
            desk.ask("eu", None, ExplainQuery::default()).await,
            Err(AskError::NoEdge("eu".into())),
            "a detached stream is not asked"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_edge_times_out_and_a_full_queue_is_busy() {
        let book = SubscriberBook::default();
        let desk = std::sync::Arc::new(ExplainDesk::default());
        let a = stream(&book, "edge-a");
        let _to_a = desk.attach(a, "eu", "edge-a");
        let mut waiting = Vec::new();
        for _ in 0..QUEUE {
            let desk = desk.clone();
            waiting.push(tokio::spawn(async move {
                desk.ask("eu", None, ExplainQuery::default()).await
            }));
        }
        tokio::task::yield_now().await;
        while desk.pending.len() < QUEUE {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            desk.ask("eu", None, ExplainQuery::default()).await,
            Err(AskError::Busy("edge-a".into()))
        );
        for asking in waiting {
            assert_eq!(
                asking.await.unwrap(),
                Err(AskError::Timeout("edge-a".into()))
            );
        }
        assert!(desk.pending.is_empty());
    }
}
