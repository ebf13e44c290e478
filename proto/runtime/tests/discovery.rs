//! The discovery client against an in-process fake control plane: tables
//! are applied and ACKed, a refused table is NACKed with its reason while
//! the old one stays, table changes are applied to the table the stream
//! sent, a change that does not fit it breaks the stream, and after the
//! stream breaks the client comes back saying which version it holds.
//! Explain queries are answered from the table held, with the node id and
//! the version filled in.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infermesh_proto::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use infermesh_proto::v1::{
    ExplainQuery, Pool, RouteExplanation, RoutingTable, SubscribeRequest, SubscribeResponse,
    SubscriberRole, TableDelta, subscribe_request,
};
use infermesh_runtime::backoff::Backoff;
use infermesh_runtime::control_plane::ControlPlaneClient;
use infermesh_runtime::discovery::{self, ApplyTable, DiscoveryConfig, Identity};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// What the fake saw from the subscriber, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Hello {
        version_held: u64,
        accepts_deltas: bool,
    },
    Ack(u64),
    Nack(u64, String),
    /// An explain answer: its id and what it said.
    Explained(u64, String),
}

/// Each connection gets the next script of tables, then the stream ends
/// once the subscriber answered all of them.
struct FakeControlPlane {
    scripts: Mutex<Vec<Vec<SubscribeResponse>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryService for FakeControlPlane {
    type SubscribeStream = Out;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = request.into_inner();
        let script = {
            let mut scripts = self.scripts.lock().unwrap();
            if scripts.is_empty() {
                Vec::new()
            } else {
                scripts.remove(0)
            }
        };
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut answers_due = script.len();
            let mut script = script.into_iter();
            while let Ok(Some(message)) = inbound.message().await {
                let event = match message.kind {
                    Some(subscribe_request::Kind::Hello(h)) => Seen::Hello {
                        version_held: h.version_held,
                        accepts_deltas: h.accepts_deltas,
                    },
                    Some(subscribe_request::Kind::Ack(a)) => Seen::Ack(a.version),
                    Some(subscribe_request::Kind::Nack(n)) => Seen::Nack(n.version, n.reason),
                    Some(subscribe_request::Kind::Explained(a)) => Seen::Explained(
                        a.id,
                        match a.explanation {
                            Some(e) => format!("{}@{}: {}", e.edge, e.table_version, e.chosen),
                            None => format!("error: {}", a.error),
                        },
                    ),
                    Some(
                        subscribe_request::Kind::Usage(_)
                        | subscribe_request::Kind::Demand(_)
                        | subscribe_request::Kind::Borrow(_),
                    )
                    | None => {
                        continue;
                    }
                };
                let is_answer = !matches!(event, Seen::Hello { .. });
                seen.lock().unwrap().push(event);
                if is_answer {
                    answers_due -= 1;
                    if answers_due == 0 {
                        // Break the stream: the client must reconnect.
                        return;
                    }
                }
                if let Some(response) = script.next() {
                    let _ = tx.send(Ok(response)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Accepts tables whose region is not "bad"; holds "region:pool,pool".
#[derive(Default)]
struct RegionTables(Arc<Mutex<Vec<String>>>);

impl ApplyTable for RegionTables {
    type Table = String;
    type Error = String;
    fn apply(&mut self, table: RoutingTable) -> Result<String, String> {
        if table.region == "bad" {
            return Err("region \"bad\" is refused".into());
        }
        let pools: Vec<_> = table.pools.iter().map(|p| p.name.as_str()).collect();
        let held = format!("{}:{}", table.region, pools.join(","));
        self.0.lock().unwrap().push(held.clone());
        Ok(held)
    }

    fn explain(&self, table: &String, query: &ExplainQuery) -> Result<RouteExplanation, String> {
        if query.model.is_empty() {
            return Err("model: required".into());
        }
        Ok(RouteExplanation {
            chosen: format!("{table}/{}", query.model),
            ..Default::default()
        })
    }
}

fn explain(id: u64, model: &str) -> SubscribeResponse {
    SubscribeResponse {
        explain: Some(ExplainQuery {
            id,
            model: model.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn table(version: u64, region: &str, pools: &[&str]) -> SubscribeResponse {
    SubscribeResponse {
        table: Some(RoutingTable {
            version,
            region: region.into(),
            pools: pools
                .iter()
                .map(|name| Pool {
                    name: name.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn delta(base_version: u64, version: u64, added: &str) -> SubscribeResponse {
    SubscribeResponse {
        delta: Some(TableDelta {
            base_version,
            version,
            pools: vec![Pool {
                name: added.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn tables_are_acked_refusals_nacked_and_the_held_version_survives_a_reconnect() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = FakeControlPlane {
        scripts: Mutex::new(vec![
            vec![table(1, "eu", &[]), table(2, "bad", &[])],
            // The change from 9 does not fit version 4: the stream breaks.
            vec![
                table(3, "eu-new", &["a"]),
                delta(3, 4, "b"),
                delta(9, 10, "x"),
            ],
            vec![
                table(5, "eu-new", &["a", "b", "c"]),
                explain(7, "llama"),
                explain(8, ""),
            ],
        ]),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServiceServer::new(fake))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );

    let config = DiscoveryConfig {
        control_planes: vec![address],
        client: ControlPlaneClient::plaintext(),
        identity: Identity {
            role: SubscriberRole::Edge,
            region: "eu".into(),
            node_id: "edge-0".into(),
        },
        connect_timeout: Duration::from_secs(2),
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        quota: None,
        usage_interval: Duration::from_millis(200),
        demand: None,
        loans: None,
    };
    let cancel = CancellationToken::new();
    let applier = RegionTables::default();
    let applied_tables = applier.0.clone();
    let (subscription, task) = discovery::subscribe(config, applier, cancel.clone());
    let mut tables = subscription.tables.clone();

    let applied = tokio::time::timeout(
        Duration::from_secs(10),
        tables.wait_for(|t| t.as_ref().is_some_and(|t| t.version == 5)),
    )
    .await
    .expect("version 5 applied in time")
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(applied.table, "eu-new:a,b,c");
    assert_eq!(
        *applied_tables.lock().unwrap(),
        ["eu:", "eu-new:a", "eu-new:a,b", "eu-new:a,b,c"],
        "the change to version 4 applied to version 3, the one from 9 never"
    );

    // The table is published before its ACK leaves; wait for the fake to
    // record it and the answers to the questions that follow it.
    let last = Seen::Explained(8, "error: model: required".into());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.lock().unwrap().contains(&last) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the answers after version 5 never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            hello(0),
            Seen::Ack(1),
            Seen::Nack(2, "region \"bad\" is refused".into()),
            hello(1),
            Seen::Ack(3),
            Seen::Ack(4),
            hello(4),
            Seen::Ack(5),
            Seen::Explained(7, "edge-0@5: eu-new:a,b,c/llama".into()),
            last,
        ],
        "the refused version 2 was never held"
    );
    cancel.cancel();
    task.await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
}

fn hello(version_held: u64) -> Seen {
    Seen::Hello {
        version_held,
        accepts_deltas: true,
    }
}
