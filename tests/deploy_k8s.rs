//! The Kubernetes manifests (docker/k8s), read as YAML and checked against each other, against
//! the server's own config loader and metrics, and against the gateway's nginx config. Nothing is
//! applied to a cluster; the schemas are checked by tools/deploy/validate-k8s.sh.
use serde::Deserialize;
use serde_json::Value;
use server::config::{Config, Overrides};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn k8s() -> PathBuf {
    root().join("docker/k8s")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a (multi-document) YAML file, empty ones left out.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn kustomization() -> Value {
    documents(&k8s().join("kustomization.yaml")).remove(0)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// Every resource of the default kustomization, from the files it lists.
fn resources() -> Vec<Value> {
    strings(&kustomization()["resources"])
        .iter()
        .flat_map(|f| documents(&k8s().join(f)))
        .collect()
}

fn find(kind: &str, name: &str) -> Value {
    let all = resources();
    let found: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == kind && r["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {kind} named {name} in the kustomization"
    );
    found[0].clone()
}

fn of_kind(kind: &str) -> Vec<Value> {
    resources()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

const DEPLOYMENT: &str = "controlnet-serve";
const GATEWAY: &str = "controlnet-serve-gateway";

fn deployment() -> Value {
    find("Deployment", DEPLOYMENT)
}

fn container(deployment: &Value) -> Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    containers[0].clone()
}

fn pod_labels(deployment: &Value) -> Value {
    deployment["spec"]["template"]["metadata"]["labels"].clone()
}

/// Whether every label of `selector` (a map) is on `labels` with the same value.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a label map");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The config file of the pods, loaded by the server's own loader: proves the binary accepts it.
fn config() -> Config {
    Config::load(&Overrides {
        config: Some(k8s().join("config.toml")),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("docker/k8s/config.toml is refused by the server: {e:#}"))
}

fn bind_port(config: &Config) -> u64 {
    config
        .server
        .bind
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in bind {}", config.server.bind))
}

/// A container port given by name or number, as its number.
fn port_number(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port name or number");
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn int(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"))
}

fn yaml_files(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(k8s())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            if rel != "alternatives" {
                yaml_files(&path, out);
            }
        } else if rel.ends_with(".yaml") && rel != "kustomization.yaml" {
            out.insert(rel);
        }
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_its_generated_files_exist() {
    let k = kustomization();
    let listed: Vec<String> = strings(&k["resources"]);
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), listed_set.len(), "a resource listed twice");
    let mut on_disk = BTreeSet::new();
    yaml_files(&k8s(), &mut on_disk);
    assert_eq!(
        listed_set, on_disk,
        "docker/k8s/kustomization.yaml `resources` must list exactly the .yaml files of the folder \
         (alternatives/ aside)"
    );
    let generators = k["configMapGenerator"]
        .as_array()
        .expect("configMapGenerator");
    assert!(!generators.is_empty());
    for g in generators {
        for f in strings(&g["files"]) {
            assert!(
                k8s().join(&f).is_file(),
                "configMapGenerator file {f} missing"
            );
        }
    }
    // The alternative's own kustomization lists files that exist, and no ScaledObject.
    let alt = k8s().join("alternatives/prometheus-adapter");
    let alt_k = documents(&alt.join("kustomization.yaml")).remove(0);
    for f in strings(&alt_k["resources"]) {
        for doc in documents(&alt.join(&f)) {
            assert_ne!(doc["kind"], "ScaledObject");
        }
    }
    // Every manifest is namespaced by the kustomization; the Namespace itself is one of them.
    let ns = k["namespace"].as_str().expect("namespace");
    assert_eq!(find("Namespace", ns)["metadata"]["name"], ns);
}

#[test]
fn the_config_file_is_accepted_by_the_server_and_points_into_the_volume() {
    let c = config();
    assert!(c.server.bind.starts_with("0.0.0.0:"), "{}", c.server.bind);
    assert_eq!(
        (c.engine.device.as_str(), c.engine.dtype.as_str()),
        ("cuda", "f16")
    );
    assert!(
        !c.models.is_empty(),
        "a real model: the embedded one makes noise"
    );
    for m in &c.models {
        assert!(m.path.starts_with("/models"), "{}", m.path.display());
    }
    assert!(!c.adapters.roots.is_empty());
    assert!(c.adapters.roots.iter().all(|r| r.starts_with("/models")));
    assert!(c.annotators.root.starts_with("/models"));
    // Tables merge with the defaults, so the default embedded:N preloads remain: the server skips
    // them because models are configured (lib.rs start_engine). Anything else would be loaded.
    for (name, path) in &c.adapters.preload {
        assert!(
            path.starts_with("embedded:"),
            "preload {name} = {path}: not in the default image's volume layout"
        );
    }

    // The pods read this file: the generated ConfigMap is mounted where `--config` points.
    let d = deployment();
    let ctr = container(&d);
    let args = strings(&ctr["args"]);
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let config_path = Path::new(&args[at + 1]);
    let generator = kustomization()["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| strings(&g["files"]).contains(&"config.toml".to_string()))
        .expect("a ConfigMap generated from config.toml")
        .clone();
    assert_eq!(config_path.file_name().unwrap(), "config.toml");
    let volume = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == generator["name"])
        .expect("a volume of the config ConfigMap")
        .clone();
    let mount = ctr["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the config volume mounted")
        .clone();
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()),
        config_path.parent().unwrap()
    );
    // The weights volume: read-only, a ReadOnlyMany claim, at /models.
    let models = ctr["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/models")
        .expect("/models mounted")
        .clone();
    assert_eq!(models["readOnly"], true);
    let claim = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == models["name"])
        .unwrap()["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("a PersistentVolumeClaim")
        .to_string();
    let pvc = find("PersistentVolumeClaim", &claim);
    assert_eq!(strings(&pvc["spec"]["accessModes"]), ["ReadOnlyMany"]);
}

#[test]
fn the_deployment_asks_for_a_gpu_and_probes_the_right_routes_on_the_bound_port() {
    let c = config();
    let d = deployment();
    let ctr = container(&d);
    let gpus = &ctr["resources"]["limits"]["nvidia.com/gpu"];
    assert!(
        *gpus == 1 || *gpus == "1",
        "limits nvidia.com/gpu must be 1, is {gpus}"
    );
    let http = ctr["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a container port named http")
        .clone();
    assert_eq!(
        int(&http["containerPort"], "containerPort"),
        bind_port(&c),
        "the container port must be the config's bind port"
    );
    for (probe, path) in [
        ("startupProbe", "/health"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ] {
        let get = &ctr[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            port_number(&ctr, &get["port"]),
            bind_port(&c),
            "{probe} port"
        );
    }
    // Loading the weights may take 10 minutes, during which nothing answers (timeouts count).
    let s = &ctr["startupProbe"];
    let allowed =
        int(&s["failureThreshold"], "failureThreshold") * int(&s["periodSeconds"], "periodSeconds");
    assert!(
        allowed >= 600,
        "the startup probe allows {allowed} s < 600 s"
    );
    // The image comes from the kustomization's `images:` and runs `serve --config ...`.
    let image = ctr["image"].as_str().unwrap();
    let images = kustomization()["images"].clone();
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == image),
        "kustomization images: must set {image}"
    );
    let sc = &d["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(int(&sc["runAsUser"], "runAsUser") > 0);
}

#[test]
fn termination_grace_covers_pre_stop_and_the_servers_drain() {
    let c = config();
    let d = deployment();
    let ctr = container(&d);
    let sleep = int(
        &ctr["lifecycle"]["preStop"]["sleep"]["seconds"],
        "preStop sleep",
    );
    assert!(sleep > 0);
    let grace = int(
        &d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let needed = sleep + c.server.shutdown_grace_secs + 5;
    assert!(
        grace >= needed,
        "terminationGracePeriodSeconds {grace} < preStop {sleep} + shutdown_grace_secs {} + 5",
        c.server.shutdown_grace_secs
    );
}

#[test]
fn rollouts_never_go_below_capacity_and_the_autoscaler_owns_replicas() {
    let d = deployment();
    let ru = &d["spec"]["strategy"]["rollingUpdate"];
    assert!(
        ru["maxUnavailable"] == 0 || ru["maxUnavailable"] == "0%",
        "maxUnavailable must be 0, is {}",
        ru["maxUnavailable"]
    );
    assert!(
        d["spec"].get("replicas").is_none(),
        "replicas set in the Deployment would reset the autoscaler's count on every apply"
    );
}

#[test]
fn selectors_match_the_pods_and_only_them() {
    let d = deployment();
    let pods = pod_labels(&d);
    let gateway_pods = pod_labels(&find("Deployment", GATEWAY));
    assert!(selects(&d["spec"]["selector"]["matchLabels"], &pods));
    assert!(!selects(
        &d["spec"]["selector"]["matchLabels"],
        &gateway_pods
    ));

    let pdb = find("PodDisruptionBudget", DEPLOYMENT);
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], &pods),
        "PDB"
    );
    assert!(
        !selects(&pdb["spec"]["selector"]["matchLabels"], &gateway_pods),
        "PDB"
    );

    let ctr = container(&d);
    let services = of_kind("Service");
    let server_services: Vec<&Value> = services
        .iter()
        .filter(|s| selects(&s["spec"]["selector"], &pods))
        .collect();
    assert_eq!(server_services.len(), 2, "a Service and a headless one");
    for s in &server_services {
        assert!(!selects(&s["spec"]["selector"], &gateway_pods));
        let port = &s["spec"]["ports"][0];
        assert_eq!(port["name"], "http");
        assert_eq!(
            port_number(&ctr, &port["targetPort"]),
            port_number(&ctr, &Value::from("http"))
        );
    }
    let headless = find("Service", "controlnet-serve-pods");
    assert_eq!(headless["spec"]["clusterIP"], "None", "headless");
    assert!(selects(&headless["spec"]["selector"], &pods));

    // The ServiceMonitor picks Services by their labels: exactly one (each pod scraped once),
    // which selects the pods, on its `http` port, path /metrics.
    let sm = find("ServiceMonitor", DEPLOYMENT);
    let picked: Vec<&Value> = services
        .iter()
        .filter(|s| {
            selects(
                &sm["spec"]["selector"]["matchLabels"],
                &s["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(
        picked.len(),
        1,
        "the ServiceMonitor must pick exactly one Service"
    );
    assert_eq!(picked[0]["metadata"]["name"], DEPLOYMENT);
    assert!(selects(&picked[0]["spec"]["selector"], &pods));
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["path"], "/metrics");

    let gw_service = find("Service", GATEWAY);
    assert!(selects(&gw_service["spec"]["selector"], &gateway_pods));
    assert!(!selects(&gw_service["spec"]["selector"], &pods));
    let gw_pdb = find("PodDisruptionBudget", GATEWAY);
    assert!(selects(
        &gw_pdb["spec"]["selector"]["matchLabels"],
        &gateway_pods
    ));
}

fn metrics_source() -> String {
    read(&root().join("crates/server/src/metrics.rs"))
}

#[test]
fn keda_scales_the_deployment_on_the_servers_queue_depth() {
    assert!(
        metrics_source().contains("\"engine_queue_depth\""),
        "crates/server/src/metrics.rs no longer exports engine_queue_depth"
    );
    let so = find("ScaledObject", DEPLOYMENT);
    let target = &so["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], DEPLOYMENT);
    let min = int(&so["spec"]["minReplicaCount"], "minReplicaCount");
    let max = int(&so["spec"]["maxReplicaCount"], "maxReplicaCount");
    assert!(1 <= min && min <= max, "replicas {min}..{max}");
    let triggers = so["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1);
    let t = &triggers[0];
    assert_eq!(t["type"], "prometheus");
    let query = t["metadata"]["query"].as_str().unwrap();
    assert!(query.contains("engine_queue_depth"), "{query}");
    assert!(
        query.starts_with("sum("),
        "summed over the replicas: {query}"
    );
    // The labels it selects on are those the ServiceMonitor's series carry.
    let ns = kustomization()["namespace"].as_str().unwrap().to_string();
    assert!(query.contains(&format!("namespace=\"{ns}\"")), "{query}");
    assert!(
        query.contains(&format!("service=\"{DEPLOYMENT}\"")),
        "{query}"
    );
    // Waiting jobs per replica: one full batch.
    let threshold: f64 = t["metadata"]["threshold"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(threshold, config().engine.max_batch as f64);
    assert!(
        of_kind("HorizontalPodAutoscaler").is_empty(),
        "KEDA makes the HPA"
    );
}

#[test]
fn the_prometheus_adapter_alternative_uses_a_metric_its_rules_serve() {
    let alt = k8s().join("alternatives/prometheus-adapter");
    let hpa = documents(&alt.join("hpa.yaml")).remove(0);
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], DEPLOYMENT);
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"], "Pods");
    let name = metric["pods"]["metric"]["name"].as_str().unwrap();
    assert!(
        metrics_source().contains(&format!("\"{name}\"")),
        "{name} not exported"
    );
    let so = find("ScaledObject", DEPLOYMENT);
    assert_eq!(
        metric["pods"]["target"]["averageValue"].as_str().unwrap(),
        so["spec"]["triggers"][0]["metadata"]["threshold"]
            .as_str()
            .unwrap(),
        "the same rule as the ScaledObject"
    );
    let rules_cm = documents(&alt.join("adapter-rules.yaml")).remove(0);
    assert_eq!(rules_cm["kind"], "ConfigMap");
    let rules_text = rules_cm["data"]["config.yaml"].as_str().unwrap();
    let rules: Value = serde_norway::from_str(rules_text).unwrap();
    let served: Vec<String> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"]["as"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        served.contains(&name.to_string()),
        "{name} not in {served:?}"
    );
    let rule = &rules["rules"][0];
    assert!(rule["seriesQuery"].as_str().unwrap().contains(name));
    assert_eq!(rule["resources"]["overrides"]["pod"]["resource"], "pod");
}

/// nginx config text without comments.
fn nginx_directives(text: &str) -> String {
    text.lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_gateway_uses_the_shared_nginx_conf_and_reaches_every_pod_by_dns() {
    let shared = root().join("docker/nginx/nginx.conf");
    assert!(
        shared.is_file(),
        "docker/nginx/nginx.conf does not exist (yet): docker/k8s/gateway/nginx.conf must be a \
         byte-identical copy of it"
    );
    let copy = k8s().join("gateway/nginx.conf");
    assert!(
        std::fs::read(&shared).unwrap() == std::fs::read(&copy).unwrap(),
        "docker/k8s/gateway/nginx.conf differs from docker/nginx/nginx.conf: copy it again \
         (kustomize reads nothing outside docker/k8s)"
    );
    let nginx = nginx_directives(&read(&copy));
    let upstream = nginx_directives(&read(&k8s().join("gateway/upstream.conf")));
    assert!(nginx.contains("proxy_pass http://controlnet_serve"));

    // upstream.conf: the upstream nginx.conf proxies to, over the headless Service's pods.
    let ns = kustomization()["namespace"].as_str().unwrap().to_string();
    let dns = format!("controlnet-serve-pods.{ns}.svc.cluster.local");
    assert!(
        upstream.contains("upstream controlnet_serve {"),
        "{upstream}"
    );
    let server_line = upstream
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("server "))
        .expect("a server line");
    let port = bind_port(&config());
    assert!(
        server_line.starts_with(&format!("server {dns}:{port} ")),
        "upstream.conf must name {dns}:{port}: {server_line}"
    );
    for word in ["resolve", "max_fails=1", "fail_timeout=5s"] {
        assert!(
            server_line
                .split_whitespace()
                .any(|w| w.trim_end_matches(';') == word),
            "{word}"
        );
    }
    for directive in [
        "zone controlnet_serve ",
        "resolver ",
        "least_conn;",
        "keepalive 32;",
    ] {
        assert!(
            upstream.contains(directive),
            "upstream.conf lacks {directive}"
        );
    }

    // The gateway mounts both files where nginx reads them.
    let gw = find("Deployment", GATEWAY);
    let ctr = container(&gw);
    let mounts = ctr["volumeMounts"].as_array().unwrap();
    let mounted = |sub: &str| -> String {
        mounts
            .iter()
            .find(|m| m["subPath"] == sub)
            .unwrap_or_else(|| panic!("{sub} not mounted"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let conf_path = mounted("nginx.conf");
    assert_eq!(conf_path, "/etc/nginx/nginx.conf");
    let include = nginx
        .split(|c| c == ';' || c == '{' || c == '}')
        .map(str::trim)
        .filter_map(|d| d.strip_prefix("include "))
        .map(str::trim)
        .find(|f| f.ends_with("upstream.conf"))
        .expect("nginx.conf includes an upstream file")
        .to_string();
    let expected = if include.starts_with('/') {
        include.clone()
    } else {
        format!("/etc/nginx/{include}")
    };
    assert_eq!(mounted("upstream.conf"), expected);
    // The generated ConfigMap holds both files.
    let gen = kustomization()["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == GATEWAY)
        .expect("the gateway ConfigMap generator")
        .clone();
    assert_eq!(
        strings(&gen["files"]),
        ["gateway/nginx.conf", "gateway/upstream.conf"]
    );
    // The container port is nginx's listen port, and the Service reaches it.
    let listen: u64 = nginx
        .split(|c| c == ';' || c == '{' || c == '}')
        .map(str::trim)
        .find_map(|d| d.strip_prefix("listen "))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.rsplit(':').next().unwrap().parse().ok())
        .expect("a listen port in nginx.conf");
    let svc = find("Service", GATEWAY);
    assert_eq!(
        port_number(&ctr, &svc["spec"]["ports"][0]["targetPort"]),
        listen
    );
    // `resolve` in an upstream needs open-source nginx 1.27.3 or newer.
    let image = ctr["image"].as_str().unwrap();
    let tag = image.rsplit(':').next().unwrap();
    let v: Vec<u64> = tag
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let (major, minor, patch) = (v[0], v[1], v.get(2).copied().unwrap_or(0));
    assert!(
        (major, minor, patch) >= (1, 27, 3),
        "{image}: `resolve` needs nginx 1.27.3+"
    );
}
