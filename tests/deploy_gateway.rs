//! The gateway (docker/nginx/) and Compose (docker/compose.yaml) files, read and checked against
//! the service's config and each other: what docker/README.md promises of them must hold in the
//! files themselves. tools/deploy/gateway_test.py runs the same nginx files for real (CI).
use serde_norway::Value;
use server::config::{Config, Overrides};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn defaults() -> Config {
    Config::load(&Overrides::default()).expect("the default config")
}

/// One nginx directive: its name, arguments and, for a block, the directives inside.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Vec<Directive>,
}

/// Parses nginx's configuration syntax: words and quoted strings, `;` ends a directive, `{ }`
/// a block, `#` a comment.
fn parse_nginx(text: &str) -> Vec<Directive> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '#' => while chars.next().is_some_and(|c| c != '\n') {},
            c if c.is_whitespace() => {
                chars.next();
            }
            '{' | '}' | ';' => {
                tokens.push(c.to_string());
                chars.next();
            }
            '\'' | '"' => {
                chars.next();
                let mut word = String::from("\u{0}"); // marks a quoted word ("" stays visible)
                for c in chars.by_ref() {
                    if c == '\'' || c == '"' {
                        break;
                    }
                    word.push(c);
                }
                tokens.push(word);
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || matches!(c, '{' | '}' | ';') {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(word);
            }
        }
    }
    let mut pos = 0;
    let parsed = parse_block(&tokens, &mut pos);
    assert_eq!(pos, tokens.len(), "unbalanced braces");
    parsed
}

fn parse_block(tokens: &[String], pos: &mut usize) -> Vec<Directive> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    while *pos < tokens.len() {
        let t = &tokens[*pos];
        *pos += 1;
        match t.as_str() {
            ";" => {
                let name = words.remove(0);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words)
                        .into_iter()
                        .map(unquote)
                        .collect(),
                    block: vec![],
                });
            }
            "{" => {
                let name = words.remove(0);
                let block = parse_block(tokens, pos);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words)
                        .into_iter()
                        .map(unquote)
                        .collect(),
                    block,
                });
            }
            "}" => return out,
            _ => words.push(t.clone()),
        }
    }
    out
}

fn unquote(w: String) -> String {
    w.trim_start_matches('\u{0}').to_string()
}

fn find<'a>(block: &'a [Directive], name: &str) -> Vec<&'a Directive> {
    block.iter().filter(|d| d.name == name).collect()
}

fn one<'a>(block: &'a [Directive], name: &str) -> &'a Directive {
    let found = find(block, name);
    assert_eq!(
        found.len(),
        1,
        "expected one `{name}`, found {}",
        found.len()
    );
    found[0]
}

/// nginx sizes: bytes, or with a k/m/g suffix.
fn size_bytes(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().unwrap().to_ascii_lowercase() {
        'k' => (&s[..s.len() - 1], 1 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size") * mult
}

/// nginx times: seconds, or with an s/m/h suffix.
fn time_secs(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().unwrap() {
        's' => (&s[..s.len() - 1], 1),
        'm' => (&s[..s.len() - 1], 60),
        'h' => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a time") * mult
}

fn bind_port(bind: &str) -> u16 {
    bind.rsplit(':').next().unwrap().parse().expect("a port")
}

fn http_block() -> Vec<Directive> {
    let conf = parse_nginx(&read("docker/nginx/nginx.conf"));
    one(&conf, "http").block.clone()
}

fn server_block() -> Vec<Directive> {
    one(&http_block(), "server").block.clone()
}

fn location<'a>(server: &'a [Directive], args: &[&str]) -> &'a Directive {
    server
        .iter()
        .find(|d| d.name == "location" && d.args == args)
        .unwrap_or_else(|| panic!("no `location {}`", args.join(" ")))
}

fn upstream() -> Directive {
    let conf = parse_nginx(&read("docker/nginx/upstream.conf"));
    let up = one(&conf, "upstream").clone();
    assert_eq!(up.args, ["controlnet_serve"]);
    up
}

/// compose.yaml, with its `<<: *replica` merge keys applied as Compose applies them.
fn compose() -> Value {
    let mut v: Value =
        serde_norway::from_str(&read("docker/compose.yaml")).expect("compose.yaml is YAML");
    v.apply_merge().expect("merge keys");
    v
}

/// The compose services running our image (the replicas), by name.
fn replicas(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"].as_mapping().expect("services");
    services
        .iter()
        .filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("controlnet-serve"))
        })
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

#[test]
fn nginx_lets_photos_through_and_waits_for_the_image() {
    let http = http_block();
    let config = defaults();
    let body = size_bytes(&one(&http, "client_max_body_size").args[0]);
    assert!(
        body >= config.server.max_body_bytes as u64,
        "client_max_body_size {body} is below [server] max_body_bytes {}",
        config.server.max_body_bytes
    );
    let read_timeout = time_secs(&one(&http, "proxy_read_timeout").args[0]);
    assert!(
        read_timeout > config.server.request_timeout_secs,
        "proxy_read_timeout {read_timeout} s must exceed request_timeout_secs {} (the \
         non-streamed routes send nothing until the image is done)",
        config.server.request_timeout_secs
    );
    // Request buffering must stay on: a retry resends the whole body.
    let all = format!("{:?}", parse_nginx(&read("docker/nginx/nginx.conf")));
    assert!(
        !all.contains("proxy_request_buffering"),
        "request buffering must stay on"
    );
}

#[test]
fn nginx_retries_posts_on_another_replica() {
    let http = http_block();
    let next = &one(&http, "proxy_next_upstream").args;
    for needed in ["error", "timeout", "http_503", "non_idempotent"] {
        assert!(
            next.iter().any(|a| a == needed),
            "proxy_next_upstream lacks {needed}"
        );
    }
    let tries: u32 = one(&http, "proxy_next_upstream_tries").args[0]
        .parse()
        .unwrap();
    assert!(tries >= 2, "a retry needs at least 2 tries");
    assert_eq!(one(&http, "proxy_http_version").args, ["1.1"]);
    assert!(
        find(&http, "proxy_set_header")
            .iter()
            .any(|d| d.args == ["Connection", ""]),
        "keep-alive upstreams need `proxy_set_header Connection \"\"`"
    );
    assert!(
        find(&http, "include")
            .iter()
            .any(|d| d.args == ["upstream.conf"]),
        "nginx.conf includes upstream.conf"
    );
    // Every proxied location goes to the upstream the included file defines.
    for loc in find(&server_block(), "location") {
        for pass in find(&loc.block, "proxy_pass") {
            assert_eq!(pass.args, ["http://controlnet_serve"], "{loc:?}");
        }
    }
}

#[test]
fn the_stream_route_is_neither_buffered_nor_compressed() {
    let server = server_block();
    let stream = location(&server, &["=", "/v1/generate/stream"]);
    assert_eq!(one(&stream.block, "proxy_buffering").args, ["off"]);
    assert_eq!(one(&stream.block, "gzip").args, ["off"]);
    // The route is ours: the OpenAPI document has it.
    assert!(read("openapi.yaml").contains("/v1/generate/stream:"));
    // gzip is on elsewhere, so `gzip off` above is what keeps events flowing.
    assert_eq!(one(&http_block(), "gzip").args, ["on"]);
}

#[test]
fn the_upstream_balances_by_load_and_notices_dead_replicas() {
    let up = upstream();
    one(&up.block, "zone");
    one(&up.block, "least_conn");
    one(&up.block, "keepalive");
    let compose = compose();
    let mut names: Vec<String> = replicas(&compose).into_iter().map(|(n, _)| n).collect();
    names.sort();
    let port = bind_port(&defaults().server.bind);
    let mut servers = Vec::new();
    for s in find(&up.block, "server") {
        let addr = &s.args[0];
        let (host, p) = addr.rsplit_once(':').expect("host:port");
        assert_eq!(
            p.parse::<u16>().unwrap(),
            port,
            "{addr}: the replicas listen on {port}"
        );
        assert!(s.args.iter().any(|a| a.starts_with("max_fails=")), "{addr}");
        assert!(
            s.args.iter().any(|a| a.starts_with("fail_timeout=")),
            "{addr}"
        );
        servers.push(host.to_string());
    }
    servers.sort();
    assert_eq!(servers, names, "upstream servers = the compose replicas");
}

#[test]
fn compose_runs_three_replicas_on_three_gpus_behind_the_gateway() {
    let compose = compose();
    let replicas = replicas(&compose);
    assert_eq!(replicas.len(), 3);
    let mut gpus = Vec::new();
    let config = defaults();
    let port = bind_port(&config.server.bind);
    for (name, r) in &replicas {
        let devices = &r["deploy"]["resources"]["reservations"]["devices"];
        let devices = devices
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: no devices"));
        assert_eq!(devices.len(), 1, "{name}");
        assert_eq!(devices[0]["driver"].as_str(), Some("nvidia"), "{name}");
        let ids = devices[0]["device_ids"].as_sequence().expect("device_ids");
        assert_eq!(ids.len(), 1, "{name}: one GPU each");
        gpus.push(ids[0].as_str().unwrap().to_string());
        let health = format!("{:?}", r["healthcheck"]["test"]);
        assert!(
            health.contains(&format!("127.0.0.1:{port}/ready")),
            "{name}: healthcheck on /ready: {health}"
        );
        // docker stop's SIGKILL must come after the service's own drain.
        let grace = r["environment"]["CNS_SERVER__SHUTDOWN_GRACE_SECS"]
            .as_str()
            .map(|s| s.parse::<u64>().unwrap())
            .unwrap_or(config.server.shutdown_grace_secs);
        let stop = time_secs(r["stop_grace_period"].as_str().expect("stop_grace_period"));
        assert!(
            stop > grace,
            "{name}: stop_grace_period {stop} s <= grace {grace} s"
        );
    }
    gpus.sort();
    gpus.dedup();
    assert_eq!(gpus.len(), 3, "each replica its own GPU");

    let gateway = &compose["services"]["gateway"];
    for (name, _) in &replicas {
        assert_eq!(
            gateway["depends_on"][name.as_str()]["condition"].as_str(),
            Some("service_healthy"),
            "the gateway waits for {name}'s /ready"
        );
    }
    // The gateway mounts the two nginx files where nginx.conf's relative include finds them.
    let volumes: Vec<&str> = gateway["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (file, target) in [
        ("nginx/nginx.conf", "/etc/nginx/nginx.conf"),
        ("nginx/upstream.conf", "/etc/nginx/upstream.conf"),
    ] {
        assert!(
            volumes
                .iter()
                .any(|v| v.starts_with(&format!("./{file}:{target}"))),
            "gateway mounts {file} at {target}: {volumes:?}"
        );
        assert!(root().join("docker").join(file).is_file());
    }
    // The published port reaches nginx's listen port.
    let server = server_block();
    let listen = &one(&server, "listen").args[0];
    let ports = format!("{:?}", gateway["ports"]);
    assert!(
        ports.contains(&format!(":{listen}\"")),
        "gateway ports {ports} publish nginx's {listen}"
    );
}

#[test]
fn compose_settings_are_ones_the_service_knows() {
    let compose = compose();
    let config = serde_json::to_value(defaults()).unwrap();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_controlnet-serve"))
        .args(["serve", "--help"])
        .output()
        .expect("running controlnet-serve serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for (name, r) in replicas(&compose) {
        for (key, _) in r["environment"].as_mapping().expect("environment") {
            let key = key.as_str().unwrap();
            let path = key
                .strip_prefix("CNS_")
                .unwrap_or_else(|| panic!("{name}: {key} is not a CNS_ setting"))
                .to_lowercase();
            let (section, field) = path.split_once("__").expect("CNS_SECTION__KEY");
            assert!(
                config[section].get(field).is_some(),
                "{name}: {key} names no setting of config/default.toml"
            );
        }
        for arg in r["command"].as_sequence().expect("command") {
            let arg = arg.as_str().unwrap();
            if arg.starts_with("--") {
                assert!(help.contains(arg), "{name}: `serve` has no flag {arg}");
            }
        }
    }
}

#[test]
fn the_parser_reads_what_nginx_reads() {
    // A guard for the checks above: quoted empty strings, comments and nesting.
    let d = parse_nginx("a 1; # c { ;\nb { c \"\" 'x y'; d { e; } }");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].args, ["1"]);
    assert_eq!(d[1].block[0].args, ["", "x y"]);
    assert_eq!(d[1].block[1].block[0].name, "e");
    assert_eq!(size_bytes("64m"), 64 << 20);
    assert_eq!(time_secs("5m"), 300);
}
