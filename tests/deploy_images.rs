//! The container images (docker/Dockerfile, docker/Dockerfile.cuda) checked against the config,
//! each other and docker/README.md, and `.dockerignore` against the files the build reads.
//! Nothing builds an image here (CI has no Docker daemon): hadolint checks the syntax
//! (tools/deploy/lint-dockerfiles.sh), this the values. `each_check_can_fail` breaks each value
//! in memory and expects a complaint, so a check that cannot fail does not pass unnoticed.

use server::config::{Config, Overrides, DEFAULT_TOML};
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The texts under test; `each_check_can_fail` edits copies of them.
#[derive(Clone)]
struct Texts {
    cpu: String,
    cuda: String,
    /// docker/README.md between the images markers.
    readme: String,
    dockerignore: String,
}

fn load() -> Texts {
    let readme = read("docker/README.md");
    let (begin, end) = ("<!-- images: begin -->", "<!-- images: end -->");
    let start = readme.find(begin).expect("images begin marker") + begin.len();
    let stop = readme.find(end).expect("images end marker");
    Texts {
        cpu: read("docker/Dockerfile"),
        cuda: read("docker/Dockerfile.cuda"),
        readme: readme[start..stop].to_string(),
        dockerignore: read(".dockerignore"),
    }
}

/// Facts from outside the deployment files, which the mutations leave alone.
struct Facts {
    /// `[server] bind` of config/default.toml.
    default_bind: String,
    /// `[workspace.package] license` of the root Cargo.toml.
    license: String,
    /// "1.95" from the root README's "tested with 1.95".
    rust_tested: String,
    /// Files the build reads, relative to the root.
    needed: Vec<String>,
}

fn facts() -> Facts {
    let config = Config::load(&Overrides::default()).expect("default config");
    // The value must be the file's, not a CNS_SERVER__BIND from the test's environment.
    assert!(
        DEFAULT_TOML.contains(&format!("bind = \"{}\"", config.server.bind)),
        "[server] bind {} is not config/default.toml's (CNS_SERVER__BIND set?)",
        config.server.bind
    );
    let cargo = read("Cargo.toml");
    let license = cargo
        .lines()
        .find_map(|l| l.trim().strip_prefix("license = "))
        .expect("workspace license")
        .trim_matches('"')
        .to_string();
    let readme = read("README.md");
    let at = readme.find("tested with ").expect("README: tested with") + "tested with ".len();
    let rust_tested: String = readme[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Facts {
        default_bind: config.server.bind,
        license,
        rust_tested: rust_tested.trim_end_matches('.').to_string(),
        needed: needed_files(&cargo),
    }
}

// ---- Dockerfiles ----

/// One instruction: continuation lines joined, comments dropped.
#[derive(Debug)]
struct Instr {
    /// The stage it belongs to (its `AS` name); None before the first FROM.
    stage: Option<String>,
    keyword: String,
    args: String,
}

fn parse(text: &str) -> Vec<Instr> {
    let mut out = Vec::new();
    let mut stage = None;
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        if keyword == "FROM" {
            let words: Vec<&str> = args.split(' ').collect();
            stage = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
        }
        out.push(Instr {
            stage: stage.clone(),
            keyword,
            args,
        });
    }
    out
}

struct Dockerfile {
    name: &'static str,
    instrs: Vec<Instr>,
}

impl Dockerfile {
    fn new(name: &'static str, text: &str) -> Self {
        Self {
            name,
            instrs: parse(text),
        }
    }

    /// (image, stage name) of each FROM.
    fn stages(&self) -> Vec<(String, String)> {
        self.find(None, "FROM")
            .iter()
            .map(|a| {
                let w: Vec<&str> = a.split(' ').collect();
                (w[0].to_string(), w.get(2).unwrap_or(&"").to_string())
            })
            .collect()
    }

    /// Arguments of the `keyword` instructions of a stage (None: all of them).
    fn find(&self, stage: Option<&str>, keyword: &str) -> Vec<String> {
        self.instrs
            .iter()
            .filter(|i| i.keyword == keyword && (stage.is_none() || i.stage.as_deref() == stage))
            .map(|i| i.args.clone())
            .collect()
    }

    /// Position of the first instruction of `stage` whose text contains `needle`.
    fn position(&self, stage: &str, keyword: &str, needle: &str) -> Option<usize> {
        self.instrs.iter().position(|i| {
            i.stage.as_deref() == Some(stage) && i.keyword == keyword && i.args.contains(needle)
        })
    }

    /// The value of `ARG name=value` in a stage (or before the first FROM: stage None).
    fn arg_default(&self, stage: Option<&str>, name: &str) -> Option<String> {
        self.instrs
            .iter()
            .filter(|i| i.keyword == "ARG" && i.stage.as_deref() == stage)
            .find_map(|i| i.args.strip_prefix(&format!("{name}=")).map(str::to_string))
    }

    /// `ENV` values of a stage, `KEY=value` pairs (several per instruction allowed).
    fn env(&self, stage: &str, key: &str) -> Option<String> {
        self.find(Some(stage), "ENV").iter().find_map(|a| {
            a.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
        })
    }
}

/// "0.0.0.0:7860" → ("0.0.0.0", 7860).
fn split_bind(bind: &str) -> (String, u16) {
    let (host, port) = bind.rsplit_once(':').expect("host:port");
    (host.to_string(), port.parse().expect("port"))
}

fn check_dockerfile(d: &Dockerfile, cuda: bool, facts: &Facts, errs: &mut Vec<String>) {
    let mut msgs = Vec::new();
    dockerfile_msgs(d, cuda, facts, &mut msgs);
    if cuda {
        cuda_msgs(d, &mut msgs);
    }
    errs.extend(msgs.into_iter().map(|m| format!("{}: {m}", d.name)));
}

fn dockerfile_msgs(d: &Dockerfile, cuda: bool, facts: &Facts, msgs: &mut Vec<String>) {
    let mut fail = |msg: String| msgs.push(msg);
    let stages = d.stages();
    let names: Vec<&str> = stages.iter().map(|(_, n)| n.as_str()).collect();
    if names != ["chef", "planner", "builder", "runtime"] {
        fail(format!(
            "stages {names:?}, expected chef, planner, builder, runtime"
        ));
        return;
    }
    if stages[1].0 != "chef" || stages[2].0 != "chef" {
        fail("planner and builder must start FROM chef (one toolchain, shared layers)".into());
    }

    // cargo-chef: prepare in the planner; in the builder vendor/ before the cook (the recipe
    // lacks the [patch.crates-io] crate), the sources after it, the build last.
    if d.position("planner", "RUN", "cargo chef prepare").is_none() {
        fail("no `cargo chef prepare` in the planner".into());
    }
    let recipe = d.position("builder", "COPY", "--from=planner");
    let vendor = d.position("builder", "COPY", "vendor/ vendor/");
    let cook = d.position("builder", "RUN", "cargo chef cook");
    let sources = d.position("builder", "COPY", ". .");
    let build = d.position("builder", "RUN", "cargo build --release --locked -p server");
    match (recipe, vendor, cook, sources, build) {
        (Some(r), Some(v), Some(c), Some(s), Some(b)) if r < c && v < c && c < s && s < b => {}
        other => fail(format!(
            "builder order (recipe, vendor, cook, sources, build) = {other:?}; expected recipe \
             and vendor/ copied before `cargo chef cook`, then `COPY . .`, then `cargo build`"
        )),
    }
    let builds = d.find(Some("builder"), "RUN");
    let cook_args = builds.iter().find(|a| a.contains("cargo chef cook"));
    let build_args = builds.iter().find(|a| a.contains("cargo build"));
    for (what, args) in [("cook", cook_args), ("build", build_args)] {
        let Some(args) = args else { continue };
        if !args.contains("--release") || !args.contains("--locked") || !args.contains("-p server")
        {
            fail(format!(
                "{what} is not `--release --locked -p server`: {args}"
            ));
        }
        if args.contains("--features cuda") != cuda {
            fail(format!(
                "{what}: `--features cuda` must be in the CUDA image only: {args}"
            ));
        }
    }
    if !build_args.is_some_and(|a| a.contains("target/release/controlnet-serve")) {
        fail("the builder does not take target/release/controlnet-serve".into());
    }

    // The toolchain: the README's tested Rust.
    let tested = &facts.rust_tested;
    if cuda {
        let v = d
            .arg_default(Some("chef"), "RUST_VERSION")
            .unwrap_or_default();
        if !(v == *tested || v.starts_with(&format!("{tested}."))) {
            fail(format!(
                "RUST_VERSION {v:?}, README says tested with {tested}"
            ));
        }
    } else {
        if stages[0].0 != format!("rust:{tested}-slim-bookworm") {
            fail(format!(
                "chef FROM {}, expected rust:{tested}-slim-bookworm",
                stages[0].0
            ));
        }
        if stages[3].0 != "debian:bookworm-slim" {
            fail(format!(
                "runtime FROM {}, expected debian:bookworm-slim (the builder's release)",
                stages[3].0
            ));
        }
    }

    // The runtime: port, bind, entrypoint, health check, user, volume, labels.
    let rt = Some("runtime");
    let default_port = split_bind(&facts.default_bind).1;
    match d.env("runtime", "CNS_SERVER__BIND") {
        None => fail("no ENV CNS_SERVER__BIND in the runtime".into()),
        Some(bind) => {
            let (host, port) = split_bind(&bind);
            if host != "0.0.0.0" {
                fail(format!(
                    "CNS_SERVER__BIND {bind}: a container must listen on 0.0.0.0"
                ));
            }
            if port != default_port {
                fail(format!(
                    "CNS_SERVER__BIND port {port} != config/default.toml's {default_port}"
                ));
            }
        }
    }
    let expose = d.find(rt, "EXPOSE");
    if expose != [default_port.to_string()] {
        fail(format!("EXPOSE {expose:?}, expected [{default_port}]"));
    }
    let entry = d.find(rt, "ENTRYPOINT");
    if entry != [r#"["controlnet-serve", "serve"]"#] {
        fail(format!("ENTRYPOINT {entry:?}"));
    }
    if d.find(rt, "CMD").iter().any(|c| !c.is_empty()) {
        fail("a CMD would be appended to every `docker run image --flags`; use none".into());
    }
    if !d.find(rt, "COPY").iter().any(|a| {
        a.starts_with("--from=builder ") && a.ends_with(" /usr/local/bin/controlnet-serve")
    }) {
        fail("the binary is not copied to /usr/local/bin (on PATH for the ENTRYPOINT)".into());
    }
    let health = d.find(rt, "HEALTHCHECK");
    let url = format!("http://127.0.0.1:{default_port}/ready");
    if health.len() != 1 || !health[0].contains(&url) || !health[0].contains("curl -fsS") {
        fail(format!("HEALTHCHECK {health:?}, expected curl -fsS {url}"));
    }
    let runs = d.find(rt, "RUN").join("\n");
    if !(runs.contains("apt-get install -y --no-install-recommends curl")
        && runs.contains("rm -rf /var/lib/apt/lists/*"))
    {
        fail(
            "curl (the health check's) not installed with --no-install-recommends, the apt lists \
              removed"
                .into(),
        );
    }
    match d.find(rt, "USER").last() {
        None => fail("no USER: the runtime would run as root".into()),
        Some(user) => {
            let uid = user.split(':').next().unwrap_or("");
            if uid == "0" || uid == "root" || uid.parse::<u32>().is_err() {
                fail(format!("USER {user}: expected a numeric non-root UID"));
            } else if !runs.contains(&format!("--uid {uid} ")) {
                fail(format!("USER {user}: no useradd --uid {uid} creates it"));
            }
        }
    }
    if d.find(rt, "VOLUME") != ["/models"] {
        fail(format!(
            "VOLUME {:?}, expected [/models]",
            d.find(rt, "VOLUME")
        ));
    }
    let labels = d.find(rt, "LABEL").join(" ");
    if d.arg_default(rt, "GIT_REVISION").is_none()
        || !labels.contains(r#"org.opencontainers.image.revision="${GIT_REVISION}""#)
    {
        fail(
            "label org.opencontainers.image.revision not from the runtime's ARG GIT_REVISION"
                .into(),
        );
    }
    for label in ["title", "description", "source"] {
        if !labels.contains(&format!("org.opencontainers.image.{label}=")) {
            fail(format!("no label org.opencontainers.image.{label}"));
        }
    }
    let license = format!(r#"org.opencontainers.image.licenses="{}""#, facts.license);
    if !labels.contains(&license) {
        fail(format!("no label {license} (the workspace's license)"));
    }
}

/// One CUDA version for the devel (build) and runtime images, and the compute capability.
fn cuda_msgs(d: &Dockerfile, msgs: &mut Vec<String>) {
    let mut fail = |msg: String| msgs.push(msg);
    let stages = d.stages();
    if stages.len() != 4 {
        return; // said by dockerfile_msgs
    }
    if d.arg_default(None, "CUDA_VERSION").is_none() {
        fail("no global ARG CUDA_VERSION=… before the first FROM".into());
    }
    let devel = stages[0]
        .0
        .strip_prefix("nvidia/cuda:${CUDA_VERSION}-devel-");
    let runtime = stages[3]
        .0
        .strip_prefix("nvidia/cuda:${CUDA_VERSION}-runtime-");
    match (devel, runtime) {
        (Some(a), Some(b)) if a == b => {}
        _ => fail(format!(
            "chef FROM {} and runtime FROM {}: expected nvidia/cuda:${{CUDA_VERSION}}-devel-X \
             and -runtime-X of the same X",
            stages[0].0, stages[3].0
        )),
    }
    if d.arg_default(Some("builder"), "CUDA_COMPUTE_CAP")
        .as_deref()
        != Some("80")
    {
        fail("no ARG CUDA_COMPUTE_CAP=80 in the builder".into());
    }
    let exported = d.env("builder", "CUDA_COMPUTE_CAP").as_deref() == Some("${CUDA_COMPUTE_CAP}");
    let env_at = d.position("builder", "ENV", "CUDA_COMPUTE_CAP=");
    let cook_at = d.position("builder", "RUN", "cargo chef cook");
    match (exported, env_at, cook_at) {
        (true, Some(e), Some(c)) if e < c => {}
        _ => fail(
            "CUDA_COMPUTE_CAP not exported (ENV) before the cook, where candle-kernels builds"
                .into(),
        ),
    }
}

// ---- README ----

fn check_readme(t: &Texts, cuda: &Dockerfile, facts: &Facts, errs: &mut Vec<String>) {
    let mut fail = |msg: String| errs.push(format!("docker/README.md (images): {msg}"));
    let r = &t.readme;
    let port = split_bind(&facts.default_bind).1;
    let cuda_version = cuda.arg_default(None, "CUDA_VERSION").unwrap_or_default();
    let mut needles = vec![
        format!("0.0.0.0:{port}"),
        format!("EXPOSE {port}"),
        format!("-p {port}:{port}"),
        format!("http://127.0.0.1:{port}/ready"),
        "--gpus all".to_string(),
        "-v /srv/models:/models:ro".to_string(),
        r#"ENTRYPOINT ["controlnet-serve", "serve"]"#.to_string(),
        "VOLUME /models".to_string(),
        "CNS_<SECTION>__<KEY>".to_string(),
        "CNS_SERVER__BIND".to_string(),
        format!("rust:{}-slim-bookworm", facts.rust_tested),
        "debian:bookworm-slim".to_string(),
        format!("nvidia/cuda:{cuda_version}-devel-"),
        format!("nvidia/cuda:{cuda_version}-runtime-"),
        "docker build -f docker/Dockerfile ".to_string(),
        "docker build -f docker/Dockerfile.cuda ".to_string(),
        "docker build --build-arg CUDA_COMPUTE_CAP=90 -f docker/Dockerfile.cuda .".to_string(),
        "| 80 (default) |".to_string(),
        facts.license.clone(),
    ];
    // The compute-capability table: each row names its GPUs and its build command.
    for (cap, gpu) in [("86", "RTX 30xx"), ("89", "RTX 40xx"), ("90", "H100")] {
        needles.push(format!("| {cap} | {gpu}"));
        needles.push(format!(
            "`docker build --build-arg CUDA_COMPUTE_CAP={cap} -f docker/Dockerfile.cuda .`"
        ));
    }
    needles.push("A100".into());
    needles.push("H200".into());
    for n in needles {
        if !r.contains(&n) {
            fail(format!("does not say `{n}`"));
        }
    }
    // The UID the README promises is the images' USER.
    let uid = cuda
        .find(Some("runtime"), "USER")
        .last()
        .cloned()
        .unwrap_or_default();
    let uid = uid.split(':').next().unwrap_or("");
    if !r.contains(&format!("UID/GID {uid}")) {
        fail(format!("does not give the images' UID {uid}"));
    }
}

// ---- .dockerignore ----

/// The patterns, checked to use only what `excluded` implements: plain names, `*` and `?`
/// within one name, `**` as a whole name. No `!` exceptions, classes or escapes.
fn ignore_patterns(text: &str, errs: &mut Vec<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('!') || line.contains(['[', '\\']) {
            errs.push(format!(
                ".dockerignore: `{line}` uses syntax the test's matcher does not implement"
            ));
            continue;
        }
        let parts: Vec<String> = line
            .trim_matches('/')
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .map(str::to_string)
            .collect();
        if parts.iter().any(|p| p.contains("**") && p != "**") {
            errs.push(format!(
                ".dockerignore: `{line}`: `**` only as a whole path element"
            ));
            continue;
        }
        out.push(parts);
    }
    out
}

/// One path element against one pattern element (`*`: any run of characters, `?`: one).
fn glob(pattern: &[char], name: &[char]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some('*'), _) => {
            glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some('?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

fn matches(pattern: &[String], path: &[&str]) -> bool {
    match pattern.first() {
        None => path.is_empty(),
        Some(p) if p == "**" => (0..=path.len()).any(|k| matches(&pattern[1..], &path[k..])),
        Some(p) => {
            !path.is_empty()
                && glob(
                    &p.chars().collect::<Vec<_>>(),
                    &path[0].chars().collect::<Vec<_>>(),
                )
                && matches(&pattern[1..], &path[1..])
        }
    }
}

/// Docker leaves a path out when a pattern matches it or a folder above it.
fn excluded(patterns: &[Vec<String>], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    (1..=parts.len()).any(|k| patterns.iter().any(|p| matches(p, &parts[..k])))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn relative(path: &Path) -> String {
    // Lexical: `a/b/../c` → `a/c`, relative to the repository root.
    let mut parts: Vec<String> = Vec::new();
    for c in path
        .strip_prefix(root())
        .expect("inside the repository")
        .components()
    {
        match c {
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

/// String literals given to include_str!/include_bytes! in `source`.
fn include_targets(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for mac in ["include_str!(\"", "include_bytes!(\""] {
        let mut rest = source;
        while let Some(at) = rest.find(mac) {
            rest = &rest[at + mac.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
            }
        }
    }
    out
}

/// What `cargo build -p server` reads: the manifests and lock file, each member's sources,
/// build script and the files they include, config/ and vendor/ (the patched candle-core).
fn needed_files(cargo_toml: &str) -> Vec<String> {
    let members: Vec<String> = cargo_toml
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members")
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!members.is_empty(), "no workspace members parsed");
    let mut files = vec![
        root().join("Cargo.toml"),
        root().join("Cargo.lock"),
        root().join("config/default.toml"),
    ];
    let mut sources = Vec::new();
    walk(&root().join("vendor"), &mut sources);
    for m in &members {
        files.push(root().join(m).join("Cargo.toml"));
        let build = root().join(m).join("build.rs");
        if build.exists() {
            sources.push(build);
        }
        walk(&root().join(m).join("src"), &mut sources);
    }
    for f in &sources {
        if f.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(f).unwrap();
            for target in include_targets(&text) {
                let path = f.parent().unwrap().join(&target);
                assert!(
                    path.exists(),
                    "{} includes {target}, which does not exist",
                    f.display()
                );
                files.push(path);
            }
        }
    }
    files.extend(sources);
    let mut rel: Vec<String> = files.iter().map(|f| relative(f)).collect();
    rel.sort();
    rel.dedup();
    // The scan must find what is known to be embedded, or it scans nothing.
    for known in [
        "config/default.toml",
        "crates/diffusion/assets/clip/vocab.json.gz",
        "crates/server/build.rs",
        "vendor/candle-core/Cargo.toml",
    ] {
        assert!(
            rel.iter().any(|r| r == known),
            "{known} not among the build's files"
        );
    }
    rel
}

fn check_dockerignore(
    t: &Texts,
    dockerfiles: &[&Dockerfile],
    facts: &Facts,
    errs: &mut Vec<String>,
) {
    let patterns = ignore_patterns(&t.dockerignore, errs);
    for path in &facts.needed {
        if excluded(&patterns, path) {
            errs.push(format!(
                ".dockerignore leaves out {path}, which the build reads"
            ));
        }
    }
    // What the Dockerfiles COPY from the context must be in it.
    for d in dockerfiles {
        for copy in d.find(None, "COPY") {
            if copy.starts_with("--from=") {
                continue;
            }
            let words: Vec<&str> = copy.split(' ').collect();
            for src in &words[..words.len() - 1] {
                let src = src.trim_end_matches('/');
                if src != "." && (excluded(&patterns, src) || !root().join(src).exists()) {
                    errs.push(format!("{}: COPY {src}: not in the build context", d.name));
                }
            }
        }
    }
    for big in [
        "target",
        "target/release/controlnet-serve",
        ".git",
        "crates/server/target",
    ] {
        if !excluded(&patterns, big) {
            errs.push(format!(".dockerignore does not leave out {big}"));
        }
    }
}

// ---- the tests ----

fn check_all(t: &Texts, facts: &Facts) -> Vec<String> {
    let mut errs = Vec::new();
    let cpu = Dockerfile::new("docker/Dockerfile", &t.cpu);
    let cuda = Dockerfile::new("docker/Dockerfile.cuda", &t.cuda);
    check_dockerfile(&cpu, false, facts, &mut errs);
    check_dockerfile(&cuda, true, facts, &mut errs);
    check_readme(t, &cuda, facts, &mut errs);
    check_dockerignore(t, &[&cpu, &cuda], facts, &mut errs);
    errs
}

#[test]
fn images_match_config_readme_and_context() {
    let errs = check_all(&load(), &facts());
    assert!(errs.is_empty(), "\n{}", errs.join("\n"));
}

#[test]
fn matcher_follows_docker() {
    let mut errs = Vec::new();
    let p = ignore_patterns(
        "target/\n**/__pycache__\n.venv-*\ncrates/*/tests\n",
        &mut errs,
    );
    assert!(errs.is_empty());
    for yes in [
        "target",
        "target/x/y",
        "__pycache__/a.pyc",
        "tools/gpu/__pycache__/a.pyc",
        ".venv-deploy/bin/python",
        "crates/diffusion/tests/fixtures/a.npy",
    ] {
        assert!(excluded(&p, yes), "{yes}");
    }
    for no in [
        "crates/target.rs",
        "crates/x/target",
        ".venv",
        "crates/diffusion/src/tests.rs",
        "crates/a/b/tests",
    ] {
        assert!(!excluded(&p, no), "{no}");
    }
    ignore_patterns("!keep\n[ab]\n", &mut errs);
    assert_eq!(errs.len(), 2, "{errs:?}");
}

/// Each edit breaks one value; the checks must notice it, naming the file in the message.
#[test]
fn each_check_can_fail() {
    let facts = facts();
    let original = load();
    assert!(
        check_all(&original, &facts).is_empty(),
        "the files themselves fail"
    );
    type Edit = fn(&mut Texts) -> &mut String;
    let cases: &[(Edit, &str, &str)] = &[
        (|t| &mut t.cpu, "AS planner", "AS plan"),
        (|t| &mut t.cpu, "cargo chef prepare", "cargo chef prep"),
        (|t| &mut t.cuda, "COPY vendor/ vendor/\n", ""),
        (|t| &mut t.cuda, "--features cuda --recipe", "--recipe"),
        (
            |t| &mut t.cpu,
            "-p server \\",
            "-p server --features cuda \\",
        ),
        (|t| &mut t.cpu, "rust:1.95-slim", "rust:1.94-slim"),
        (
            |t| &mut t.cuda,
            "RUST_VERSION=1.95.0",
            "RUST_VERSION=1.94.0",
        ),
        (
            |t| &mut t.cuda,
            "-runtime-ubuntu22.04",
            "-runtime-ubuntu24.04",
        ),
        (|t| &mut t.cuda, "${CUDA_VERSION}-devel", "12.4.1-devel"),
        (
            |t| &mut t.cuda,
            "ARG CUDA_COMPUTE_CAP=80",
            "ARG CUDA_COMPUTE_CAP=90",
        ),
        (
            |t| &mut t.cuda,
            "ENV CUDA_COMPUTE_CAP",
            "ENV CUDA_COMPUTE_CAPS",
        ),
        (|t| &mut t.cpu, "EXPOSE 7860", "EXPOSE 8080"),
        (|t| &mut t.cuda, "BIND=0.0.0.0:7860", "BIND=0.0.0.0:7861"),
        (|t| &mut t.cpu, "BIND=0.0.0.0", "BIND=127.0.0.1"),
        (
            |t| &mut t.cpu,
            r#""controlnet-serve", "serve"]"#,
            r#""controlnet-serve"]"#,
        ),
        (|t| &mut t.cuda, "7860/ready", "7860/health"),
        (|t| &mut t.cpu, "USER 10001:10001", "USER root"),
        (|t| &mut t.cpu, "VOLUME /models", "VOLUME /data"),
        (
            |t| &mut t.cuda,
            "revision=\"${GIT_REVISION}\"",
            "revision=\"dev\"",
        ),
        (|t| &mut t.cuda, "Apache-2.0", "MIT"),
        (|t| &mut t.cpu, "--no-install-recommends curl", "curl"),
        (|t| &mut t.readme, "-p 7860:7860", "-p 7860:7861"),
        (|t| &mut t.readme, "| 89 | RTX 40xx", "| 89 | GPUs"),
        (
            |t| &mut t.readme,
            "CUDA_COMPUTE_CAP=90 -f",
            "CUDA_COMPUTE_CAP=9 -f",
        ),
        (|t| &mut t.readme, "UID/GID 10001", "UID/GID 1000"),
        (|t| &mut t.dockerignore, "\n**/target\n", "\n"),
        (|t| &mut t.dockerignore, "\ntests\n", "\ntests\nvendor\n"),
        (
            |t| &mut t.dockerignore,
            "\ntests\n",
            "\ntests\nconfig/*.toml\n",
        ),
        (|t| &mut t.dockerignore, "\ntests\n", "\ntests\n**/assets\n"),
        (
            |t| &mut t.dockerignore,
            "\ntests\n",
            "\ntests\n**/build.rs\n",
        ),
        (
            |t| &mut t.dockerignore,
            "\ntests\n",
            "\ntests\nCargo.lock\n",
        ),
        (
            |t| &mut t.dockerignore,
            "\ntests\n",
            "\ntests\n!tests/keep.rs\n",
        ),
    ];
    for (field, from, to) in cases {
        let mut t = original.clone();
        let text = field(&mut t);
        assert!(text.contains(from), "edit `{from}`: not in the file");
        *text = text.replace(from, to);
        let errs = check_all(&t, &facts);
        assert!(!errs.is_empty(), "`{from}` → `{to}` was not noticed");
    }
}
