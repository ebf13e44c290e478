//! Sidecar injection through the control plane's real webhook (HTTPS, an
//! AdmissionReview as the API server sends it for a vLLM pod): the patched
//! pod validates against the Kubernetes schema (kubernetes-validate) and
//! holds the sidecar exactly once; injecting again changes nothing; other
//! pods are left alone; a labelled pod without its annotations is refused.

use std::path::Path;

use base64::Engine as _;
use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::mesh::Mesh;
use serde_json::{Value, json};

/// POSTs `review` to the webhook with curl, trusting `ca`; returns its answer.
async fn review(url: &str, ca: &Path, review: &Value) -> Value {
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--max-time",
            "10",
            "-H",
            "content-type: application/json",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--data-binary")
        .arg(review.to_string())
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    assert!(
        output.status.success(),
        "webhook call failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the webhook answers JSON")
}

/// The pod after applying the answer's JSON patch (unchanged without one).
fn patched(pod: &Value, answer: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(encoded) = answer["response"]["patch"].as_str() {
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64 patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
        json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");
    }
    pod
}

/// Validates `pod` with kubernetes-validate against the Kubernetes schema.
async fn validate(dir: &Path, pod: &Value) {
    let validator =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/helm-venv/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} missing: scripts/check-helm.sh installs it (the test command runs it first)",
        validator.display()
    );
    // The API server names a generateName pod when it stores it, after admission.
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none() {
        let generated = format!(
            "{}x2x9k",
            pod["metadata"]["generateName"].as_str().unwrap_or("pod-")
        );
        pod["metadata"]["name"] = Value::String(generated);
    }
    let file = dir.join("patched-pod.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
    let output = tokio::process::Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.30"])
        .arg(&file)
        .output()
        .await
        .expect("kubernetes-validate runs");
    assert!(
        output.status.success(),
        "the patched pod does not validate:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn sidecars(pod: &Value) -> usize {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "infermesh-sidecar")
        .count()
}

#[tokio::test]
async fn the_webhook_injects_the_sidecar_once_into_labelled_pods_only() {
    let mut mesh = Mesh::start().await;
    let port = free_port();
    mesh.control_plane_extra = [
        "--webhook-listen",
        &format!("127.0.0.1:{port}"),
        "--webhook-tls-cert",
        &mesh.pki.server.cert.display().to_string(),
        "--webhook-tls-key",
        &mesh.pki.server.key.display().to_string(),
        "--sidecar-image",
        "ghcr.io/infermesh/infermesh:0.1.0",
        "--sidecar-control-plane",
        "infermesh-control-plane.infermesh.svc:7070",
        "--sidecar-tls-secret",
        "infermesh-sidecar-tls",
    ]
    .map(String::from)
    .to_vec();
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    let url = format!("https://127.0.0.1:{port}/mutate");
    let ca = mesh.pki.ca_cert.clone();

    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/admission-review-vllm-pod.json");
    let request: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let pod = request["request"]["object"].clone();

    let answer = review(&url, &ca, &request).await;
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    let injected = patched(&pod, &answer);
    assert_eq!(sidecars(&injected), 1);
    let sidecar = injected["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "infermesh-sidecar")
        .unwrap()
        .clone();
    let env = sidecar["env"].to_string();
    for expected in [
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama-8b-eu-west",
        "eu-west-1a",
        "0e9e39f249a16976918f6564b8830bc894c89659",
        "infermesh-control-plane.infermesh.svc:7070",
        "status.podIP",
    ] {
        assert!(env.contains(expected), "{expected} missing from {env}");
    }
    let volumes: Vec<&str> = injected["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        volumes.len(),
        3,
        "shm, the preStop hand-shake and the certificate: {volumes:?}"
    );
    assert!(volumes.contains(&"infermesh-run"), "{volumes:?}");
    for container in injected["spec"]["containers"].as_array().unwrap() {
        let hook = container["lifecycle"]["preStop"].to_string();
        assert!(hook.contains("exec") && !hook.contains("httpGet"), "{hook}");
    }
    validate(mesh.dir.path(), &injected).await;

    // Again on the injected pod (a reinvocation): nothing changes.
    let again = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-2", "object": injected}});
    let answer = review(&url, &ca, &again).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // A pod not labelled for injection is left alone.
    let mut plain = pod.clone();
    plain["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("infermesh.io/inject");
    let answer = review(
        &url,
        &ca,
        &json!({"request": {"uid": "u-3", "object": plain}}),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());

    // A labelled pod without the annotations the sidecar needs is refused, by name.
    let mut bare = pod.clone();
    bare["metadata"]["annotations"] = json!({});
    let answer = review(
        &url,
        &ca,
        &json!({"request": {"uid": "u-4", "object": bare}}),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("infermesh.io/model"), "{message}");
}
