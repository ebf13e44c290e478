//! The discovery client against an in-process fake control plane: tables
//! are applied and ACKed, a refused table is NACKed with its reason while
//! the old one stays, and after the stream breaks the client comes back
//! saying which version it holds.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infermesh_proto::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use infermesh_proto::v1::{
    RoutingTable, SubscribeRequest, SubscribeResponse, SubscriberRole, subscribe_request,
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
    Hello { version_held: u64 },
    Ack(u64),
    Nack(u64, String),
}

/// Each connection gets the next script of tables, then the stream ends
/// once the subscriber answered all of them.
struct FakeControlPlane {
    scripts: Mutex<Vec<Vec<RoutingTable>>>,
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
                    },
                    Some(subscribe_request::Kind::Ack(a)) => Seen::Ack(a.version),
                    Some(subscribe_request::Kind::Nack(n)) => Seen::Nack(n.version, n.reason),
                    Some(
                        subscribe_request::Kind::Usage(_) | subscribe_request::Kind::Demand(_),
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
                if let Some(table) = script.next() {
                    let _ = tx
                        .send(Ok(SubscribeResponse {
                            table: Some(table),
                            quotas: None,
                        }))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Accepts tables whose region is not "bad".
struct RegionTables;

impl ApplyTable for RegionTables {
    type Table = String;
    fn apply(&mut self, table: RoutingTable) -> Result<String, String> {
        if table.region == "bad" {
            return Err("region \"bad\" is refused".into());
        }
        Ok(table.region)
    }
}

fn table(version: u64, region: &str) -> RoutingTable {
    RoutingTable {
        version,
        region: region.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tables_are_acked_refusals_nacked_and_the_held_version_survives_a_reconnect() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = FakeControlPlane {
        scripts: Mutex::new(vec![
            vec![table(1, "eu"), table(2, "bad")],
            vec![table(3, "eu-new")],
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
    };
    let cancel = CancellationToken::new();
    let (subscription, task) = discovery::subscribe(config, RegionTables, cancel.clone());
    let mut tables = subscription.tables.clone();

    let applied = tokio::time::timeout(
        Duration::from_secs(10),
        tables.wait_for(|t| t.as_ref().is_some_and(|t| t.version == 3)),
    )
    .await
    .expect("version 3 applied in time")
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(applied.table, "eu-new");

    // The table is published before its ACK leaves; wait for the fake to record it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.lock().unwrap().contains(&Seen::Ack(3)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ACK of version 3 never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            Seen::Hello { version_held: 0 },
            Seen::Ack(1),
            Seen::Nack(2, "region \"bad\" is refused".into()),
            Seen::Hello { version_held: 1 },
            Seen::Ack(3),
        ],
        "the refused version 2 was never held"
    );
    cancel.cancel();
    task.await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
}
