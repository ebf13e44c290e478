//! A whole infermesh on loopback: etcd, a control plane, edges, and
//! replicas (a simulated engine with its sidecar), started and wired the
//! way an operator would, with the admin API driven through grpcurl.

use std::path::{Path, PathBuf};
use std::time::Duration;

use infermesh_runtime::tls::mesh::{MeshClientTls, expected_authority};
use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::binaries::{free_port, path};
use crate::client::Http;
use crate::etcd::Etcd;
use crate::grpcurl::{GrpcError, Grpcurl};
use crate::pki::TestPki;
use crate::process::Process;
use crate::wait;

/// Endpoint lease TTL used in tests: short, so dead replicas leave quickly.
pub const LEASE_TTL_SECONDS: u32 = 2;

/// An edge process.
pub struct Edge {
    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its Prometheus endpoint, `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    /// Its mesh listener (`host:port`), where peer edges spill over.
    pub mesh_address: String,
    /// The process.
    pub process: Process,
}

/// One replica: a simulated engine and the sidecar in front of it.
pub struct Replica {
    /// Endpoint id the sidecar registers.
    pub id: String,
    /// Engine base URL.
    pub engine_url: String,
    /// Sidecar base URL.
    pub sidecar_url: String,
    /// The sidecar's Prometheus endpoint.
    pub sidecar_metrics_url: String,
    /// The engine process.
    pub engine: Process,
    /// The sidecar process.
    pub sidecar: Process,
    /// The unix socket of its preStop hook.
    pub prestop_socket: PathBuf,
}

/// Model `llama` served in region `eu-west` by one replica behind one edge.
pub struct Served {
    /// The replica `llama-0` of pool `llama-eu`.
    pub replica: Replica,
    /// The edge.
    pub edge: Edge,
    /// The edge's chat-completions URL.
    pub url: String,
    /// A small chat request for `llama`.
    pub body: Value,
}

/// A sidecar process started on its own.
pub struct Sidecar {
    /// Base URL of its proxy: `https://` with the sidecar's identity in
    /// the user-info, for a client with an edge identity (`Mesh::http`).
    pub url: String,
    /// Its Prometheus endpoint.
    pub metrics_url: String,
    /// The unix socket of its preStop hook.
    pub prestop_socket: PathBuf,
    /// The process.
    pub process: Process,
}

/// The system under test.
pub struct Mesh {
    /// An edge identity (`edge/integration-tests`) for reaching sidecars
    /// directly, as `http` does.
    pub edge_tls: MeshClientTls,
    /// The etcd server.
    pub etcd: Etcd,
    /// The control plane, while it runs.
    pub control_plane: Option<Process>,
    /// Control-plane gRPC address (host:port).
    pub control_plane_address: String,
    /// The control plane's Prometheus endpoint.
    pub control_plane_metrics_url: String,
    /// grpcurl aimed at the control plane, presenting an admin certificate.
    pub admin: Grpcurl,
    /// The CA and certificates every process uses.
    pub pki: TestPki,
    /// An admin bearer token the control plane accepts (its hash is in the tokens file).
    pub admin_token: String,
    /// HTTP client, sending `api_key`.
    pub http: Http,
    /// The API key made at start (tenant "tests", no limits).
    pub api_key: String,
    /// Environment given to every process started from now on (e.g. OTEL_*).
    pub env: Vec<(String, String)>,
    /// Extra control-plane flags, used from its next (re)start.
    pub control_plane_extra: Vec<String>,
    /// Endpoint lease TTL of the control plane from its next (re)start.
    pub lease_ttl_seconds: u32,
    /// etcd endpoints the control plane uses from its next (re)start instead
    /// of `etcd` (comma-separated), e.g. a multi-member cluster.
    pub etcd_endpoints: Option<String>,
    /// Where logs and etcd data live; removed on drop, after the processes
    /// above (fields drop in order) have printed their logs.
    pub dir: TempDir,
}

impl Mesh {
    /// Starts etcd and a control plane and waits until the control plane reports SERVING.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// As `start`, with extra control-plane flags from the first start on.
    pub async fn start_with(control_plane_extra: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let etcd = Etcd::start(dir.path()).await;
        let address = format!("127.0.0.1:{}", free_port());
        let pki = TestPki::create(&dir.path().join("pki"));
        let admin_token = make_admin_token(&dir.path().join("pki/admin-tokens"));
        let admin = Grpcurl::tls(&address, &pki.ca_cert)
            .with_identity(pki.client(PeerRole::Admin, "integration-tests"));
        let harness_edge = pki.client(PeerRole::Edge, "integration-tests");
        let edge_tls = MeshClientTls::new(
            &pki.ca_cert,
            &harness_edge.cert,
            &harness_edge.key,
            Duration::from_secs(2),
            CancellationToken::new(),
        )
        .expect("the harness's edge identity");
        let mut mesh = Self {
            admin,
            pki,
            admin_token,
            control_plane_metrics_url: format!("http://127.0.0.1:{}/metrics", free_port()),
            control_plane_address: address,
            dir,
            etcd,
            control_plane: None,
            http: Http::new().with_identity(&edge_tls),
            edge_tls,
            api_key: String::new(),
            env: Vec::new(),
            control_plane_extra: control_plane_extra.to_vec(),
            lease_ttl_seconds: LEASE_TTL_SECONDS,
            etcd_endpoints: None,
        };
        mesh.start_control_plane().await;
        let secret = mesh.create_key("tests", json!({})).await;
        mesh.http = Http::with_key(&secret).with_identity(&mesh.edge_tls);
        mesh.api_key = secret;
        mesh
    }

    /// Creates an API key for `tenant` with the extra CreateApiKey fields in
    /// `fields` (limits, allowed_models…) through grpcurl; returns its secret.
    pub async fn create_key(&self, tenant: &str, fields: Value) -> String {
        let mut request = json!({"tenant": tenant, "name": "integration test"});
        if let (Some(request), Some(fields)) = (request.as_object_mut(), fields.as_object()) {
            request.extend(fields.clone());
        }
        let created = self
            .admin("CreateApiKey", request)
            .await
            .expect("CreateApiKey");
        created["secret"]
            .as_str()
            .expect("secret in CreateApiKey response")
            .to_string()
    }

    /// (Re)starts the control plane on its address and waits for SERVING.
    pub async fn start_control_plane(&mut self) {
        let metrics = self
            .control_plane_metrics_url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string();
        let process =
            self.spawn_control_plane("control-plane", &self.control_plane_address, &metrics);
        self.control_plane = Some(process);
        let admin = self.admin.clone();
        wait::until("control plane to serve", Duration::from_secs(20), || {
            let admin = admin.clone();
            async move {
                let out = admin
                    .raw(&[], &["grpc.health.v1.Health/Check"])
                    .await
                    .ok()?;
                out.contains("\"SERVING\"").then_some(())
            }
        })
        .await;
    }

    /// Another control-plane replica on the same etcd, serving gRPC at
    /// `address` and metrics at `metrics` (host:port); not waited for.
    pub fn spawn_control_plane(&self, name: &str, address: &str, metrics: &str) -> Process {
        let args = [
            "--listen",
            address,
            "--node-id",
            name,
            "--etcd-endpoints",
            self.etcd_endpoints.as_deref().unwrap_or(&self.etcd.url),
            "--etcd-prefix",
            "/infermesh-test/",
            "--endpoint-lease-ttl-seconds",
            &self.lease_ttl_seconds.to_string(),
            "--report-interval-ms",
            "200",
            "--metrics-listen",
            metrics,
            "--tls-cert",
            &path_str(&self.pki.server.cert),
            "--tls-key",
            &path_str(&self.pki.server.key),
            "--tls-client-ca",
            &path_str(&self.pki.ca_cert),
            "--admin-tokens-file",
            &path_str(&self.dir.path().join("pki/admin-tokens")),
        ]
        .map(String::from)
        .to_vec();
        let args = [args, self.control_plane_extra.clone()].concat();
        Process::spawn(
            name,
            &path("infermesh-control-plane"),
            &args,
            self.dir.path(),
            &self.env_pairs(),
        )
    }

    /// The leader gauge of the control plane whose metrics are at `url`, if it answers.
    pub async fn leading(&self, url: &str) -> Option<bool> {
        let text = self.http.get(url).await.ok()?.text();
        text.lines()
            .find(|l| l.starts_with("infermesh_control_plane_leader "))
            .map(|l| l.ends_with(" 1"))
    }

    /// Kills the control plane (SIGKILL).
    pub async fn kill_control_plane(&mut self) {
        if let Some(mut process) = self.control_plane.take() {
            process.kill().await;
        }
    }

    /// Starts an edge for `region` with `extra` flags and waits until it answers /livez.
    pub async fn start_edge(&self, region: &str, extra: &[&str]) -> Edge {
        self.start_edge_as(
            region,
            self.control_plane_tls(PeerRole::Edge, region),
            extra,
        )
        .await
    }

    /// As `start_edge`, with `identity` flags (e.g. `--identity-dir`)
    /// instead of a certificate from the test CA.
    pub async fn start_edge_as(&self, region: &str, identity: Vec<String>, extra: &[&str]) -> Edge {
        let port = free_port();
        let metrics_port = free_port();
        let mesh_address = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--mesh-listen",
            &mesh_address,
            "--region",
            region,
            "--node-id",
            &format!("edge-{region}-{port}"),
            "--control-plane",
            &self.control_plane_address,
        ]
        .map(String::from)
        .to_vec();
        args.extend(identity);
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::spawn(
            &format!("edge-{region}-{port}"),
            &path("infermesh-edge"),
            &args,
            self.dir.path(),
            &self.env_pairs(),
        );
        let https = extra.contains(&"--tls-cert");
        let url = format!(
            "{}://127.0.0.1:{port}",
            if https { "https" } else { "http" }
        );
        if https {
            wait::until(
                "edge to accept TLS connections",
                Duration::from_secs(20),
                || {
                    let address = format!("127.0.0.1:{port}");
                    async move {
                        tokio::net::TcpStream::connect(address)
                            .await
                            .ok()
                            .map(|_| ())
                    }
                },
            )
            .await;
        } else {
            self.wait_http_ok(&format!("{url}/livez"), "edge /livez")
                .await;
        }
        Edge {
            url,
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            mesh_address,
            process,
        }
    }

    /// Starts a simulated engine serving `model` with `flags`; waits for its /health.
    pub async fn start_engine(&self, id: &str, model: &str, flags: &[&str]) -> (String, Process) {
        let port = free_port();
        let mut args: Vec<String> = ["--listen", &format!("127.0.0.1:{port}"), "--model", model]
            .map(String::from)
            .to_vec();
        args.extend(flags.iter().map(|s| s.to_string()));
        let engine = Process::spawn(
            &format!("engine-{id}"),
            &path("infermesh-sim-engine"),
            &args,
            self.dir.path(),
            &self.env_pairs(),
        );
        let url = format!("http://127.0.0.1:{port}");
        self.wait_http_ok(&format!("{url}/health"), "engine /health")
            .await;
        (url, engine)
    }

    /// Starts a simulated engine serving `model` and a sidecar registering it
    /// as `id` in `pool`/`region`; waits until both answer.
    pub async fn start_replica(
        &self,
        id: &str,
        pool: &str,
        model: &str,
        region: &str,
        engine_flags: &[&str],
    ) -> Replica {
        let (engine_url, engine) = self.start_engine(id, model, engine_flags).await;
        let sidecar = self
            .start_sidecar(id, pool, model, region, &engine_url, None)
            .await;
        Replica {
            id: id.to_string(),
            engine_url,
            sidecar_metrics_url: sidecar.metrics_url,
            sidecar_url: sidecar.url,
            sidecar: sidecar.process,
            prestop_socket: sidecar.prestop_socket,
            engine,
        }
    }

    /// Starts a sidecar for the engine at `engine_url`; `advertise` overrides the address edges get.
    pub async fn start_sidecar(
        &self,
        id: &str,
        pool: &str,
        model: &str,
        region: &str,
        engine_url: &str,
        advertise: Option<&str>,
    ) -> Sidecar {
        let pair = self.pki.sidecar(region, pool, id);
        let identity = self.tls_flags(&pair);
        self.start_sidecar_as(id, pool, model, region, engine_url, advertise, identity)
            .await
    }

    /// As `start_sidecar`, with `identity` flags (e.g. `--identity-dir`)
    /// instead of a certificate from the test CA.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_sidecar_as(
        &self,
        id: &str,
        pool: &str,
        model: &str,
        region: &str,
        engine_url: &str,
        advertise: Option<&str>,
        identity: Vec<String>,
    ) -> Sidecar {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let metrics_listen = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics_listen,
            "--advertise-address",
            advertise.unwrap_or(&listen),
            "--engine-url",
            engine_url,
            "--endpoint-id",
            id,
            "--pool",
            pool,
            "--model",
            model,
            "--region",
            region,
            "--zone",
            &format!("{region}-a"),
            "--control-plane",
            &self.control_plane_address,
            "--scrape-interval-ms",
            "200",
            "--scrape-timeout-ms",
            "150",
            "--drain-wait-seconds",
            "5",
            "--shutdown-grace-seconds",
            "10",
        ]
        .map(String::from)
        .to_vec();
        let plaintext = identity
            .windows(2)
            .any(|pair| pair[0] == "--serve-tls" && pair[1] == "off");
        args.extend(identity);
        let run_dir = self.dir.path().join(format!("run-{id}"));
        std::fs::create_dir_all(&run_dir).expect("sidecar run directory");
        let prestop_socket = run_dir.join("prestop.sock");
        args.extend(["--prestop-socket".into(), path_str(&prestop_socket)]);
        let process = Process::spawn(
            &format!("sidecar-{id}"),
            &path("infermesh-sidecar"),
            &args,
            self.dir.path(),
            &self.env_pairs(),
        );
        let identity = PeerIdentity::sidecar(region, pool, id).expect("valid identity");
        let url = if plaintext {
            format!("http://{listen}")
        } else {
            format!("https://{}", expected_authority(&identity, &listen))
        };
        self.wait_http_ok(&format!("{url}/livez"), "sidecar /livez")
            .await;
        Sidecar {
            url,
            metrics_url: format!("http://{metrics_listen}/metrics"),
            process,
            prestop_socket,
        }
    }

    fn env_pairs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Flags that make an edge or sidecar reach the control plane over mTLS as `role`/`name`.
    pub fn control_plane_tls(&self, role: PeerRole, name: &str) -> Vec<String> {
        let pair = self.pki.client(role, name);
        self.tls_flags(&pair)
    }

    fn tls_flags(&self, pair: &crate::pki::CertPair) -> Vec<String> {
        vec![
            "--control-plane-ca".into(),
            path_str(&self.pki.ca_cert),
            "--control-plane-cert".into(),
            path_str(&pair.cert),
            "--control-plane-key".into(),
            path_str(&pair.key),
        ]
    }

    async fn wait_http_ok(&self, url: &str, what: &str) {
        // Tests may replace `http`; sidecars need the edge identity.
        let http = Http::new().with_identity(&self.edge_tls);
        wait::until(what, Duration::from_secs(20), || {
            let http = http.clone();
            let url = url.to_string();
            async move { (http.get(&url).await.ok()?.status == 200).then_some(()) }
        })
        .await;
    }

    /// Registers `llama` in `eu-west`, starts one replica and an edge, and
    /// waits until a chat request is served.
    pub async fn serve_one_replica(&self) -> Served {
        self.register("eu-west", "llama", "llama-eu").await;
        let replica = self
            .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
            .await;
        let edge = self.start_edge("eu-west", &[]).await;
        let url = format!("{}/v1/chat/completions", edge.url);
        let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        self.wait_until_served(&url, &body).await;
        Served {
            replica,
            edge,
            url,
            body,
        }
    }

    /// Waits until `body` POSTed to `url` gets a 200 (the edge holds a table routing it).
    pub async fn wait_until_served(&self, url: &str, body: &Value) {
        let http = self.http.clone();
        wait::until("the request to be served", Duration::from_secs(20), || {
            let (http, url, body) = (http.clone(), url.to_string(), body.clone());
            async move { (http.post_json(&url, &body).await.ok()?.status == 200).then_some(()) }
        })
        .await;
    }

    /// The last inference request `replica`'s engine received: the body as it
    /// arrived, and its traceparent in the `x-sim-traceparent` header.
    pub async fn last_engine_request(&self, replica: &Replica) -> crate::client::Reply {
        self.http
            .send(
                http::Method::GET,
                &format!("{}/sim/last-request", replica.engine_url),
                None,
                &[("x-no-auth", "1")],
            )
            .await
            .expect("the simulated engine answers")
    }

    /// Calls an admin method through grpcurl.
    pub async fn admin(&self, method: &str, request: Value) -> Result<Value, GrpcError> {
        self.admin.admin(method, request).await
    }

    /// Creates region, model and a vLLM pool of that model in the region.
    pub async fn register(&self, region: &str, model: &str, pool: &str) {
        let region_exists = self
            .admin("GetRegion", json!({"name": region}))
            .await
            .is_ok();
        if !region_exists {
            self.admin(
                "CreateRegion",
                json!({"region": {"name": region, "zones": [format!("{region}-a")]}}),
            )
            .await
            .expect("create region");
        }
        if self
            .admin("GetModel", json!({"name": model}))
            .await
            .is_err()
        {
            self.admin("CreateModel", json!({"model": {"name": model}}))
                .await
                .expect("create model");
        }
        self.admin(
            "CreatePool",
            json!({"pool": {"name": pool, "model": model, "region": region, "engine": "VLLM", "min_replicas": 1, "max_replicas": 4}}),
        )
        .await
        .expect("create pool");
    }

    /// A spend budget as fleet status shows it (`quota` e.g.
    /// `tenant/acme/spd`): (spent, remaining), in currency units.
    pub async fn budget(&self, quota: &str) -> Option<(f64, f64)> {
        let status = self.admin("GetFleetStatus", json!({})).await.ok()?;
        let budget = status["budgets"]
            .as_array()?
            .iter()
            .find(|b| b["quota"] == quota)?
            .clone();
        let amount = |field: &str| budget[field].as_str().and_then(|s| s.parse::<f64>().ok());
        Some((amount("spent")?, amount("remaining")?))
    }

    /// Ids of the registered endpoints (optionally of one pool), sorted.
    pub async fn endpoint_ids(&self, pool: &str) -> Vec<String> {
        let listed = self
            .admin("ListEndpoints", json!({"pool": pool}))
            .await
            .expect("list endpoints");
        let mut ids: Vec<String> = listed["endpoints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The model ids an edge lists on /v1/models (empty when it is not ready).
    pub async fn edge_models(&self, edge: &Edge) -> Vec<String> {
        match self.http.get(&format!("{}/v1/models", edge.url)).await {
            Ok(reply) if reply.status == 200 => reply.json()["data"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m["id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// Makes an admin token with the real `infermesh-certs admin-token`, which
/// appends its hash to `tokens_file`; returns the token.
fn make_admin_token(tokens_file: &Path) -> String {
    let output = std::process::Command::new(path("infermesh-certs"))
        .args([
            "admin-token",
            "--name",
            "integration-tests",
            "--tokens-file",
        ])
        .arg(tokens_file)
        .output()
        .expect("infermesh-certs runs");
    assert!(
        output.status.success(),
        "infermesh-certs admin-token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("token is text")
        .trim()
        .to_string()
}
