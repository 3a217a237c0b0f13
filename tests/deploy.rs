//! The files in `deploy/`, checked for structure without a container engine or systemd: the
//! compose file (services, shared volume, loopback-only ports, health check), `.env.example`
//! (no secrets), the Dockerfile (built from the checked-in `Cargo.lock`, non-root, health check
//! on `/ready`), the systemd unit (hardening), and the fleet's compose file in `deploy/fleet/`
//! (three proxies coordinated through a three-member etcd).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use fresh_proxy::config::Cli;
use serde_norway::Value;

const PROXY_SERVICE: &str = "fresh-proxy";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The default of the setting read from `env`, as clap defines it.
fn clap_default(env: &str) -> String {
    let command = Cli::command();
    let arg = command
        .get_arguments()
        .find(|a| a.get_env().is_some_and(|e| e == env))
        .unwrap_or_else(|| panic!("{env} is a setting"));
    arg.get_default_values()[0].to_string_lossy().into_owned()
}

fn seconds(text: &str) -> u64 {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("a duration: {text}"));
    match &text[digits.len()..] {
        "" | "s" => number,
        "m" | "min" => number * 60,
        other => panic!("unexpected unit {other} in {text}"),
    }
}

/// Whether a value looks like a real credential rather than a placeholder.
fn looks_secret(value: &str) -> bool {
    let value = value.trim().trim_matches('"');
    value.starts_with("dapi")
        || value.starts_with("dose")
        || (value.len() >= 24 && value.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn is_secret_name(name: &str) -> bool {
    ["TOKEN", "SECRET", "PASSWORD"]
        .iter()
        .any(|word| name.to_ascii_uppercase().contains(word))
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml

struct Compose(Value);

impl Compose {
    fn load() -> Self {
        Self::load_from("deploy/docker-compose.yml")
    }

    fn load_from(relative: &str) -> Self {
        let text = read(relative);
        Self(
            serde_norway::from_str(&text)
                .unwrap_or_else(|e| panic!("{relative} is valid YAML: {e}")),
        )
    }

    fn service(&self, name: &str) -> &Value {
        let service = &self.0["services"][name];
        assert!(service.is_mapping(), "service {name} is defined");
        service
    }

    fn service_names(&self) -> Vec<String> {
        self.0["services"]
            .as_mapping()
            .expect("services")
            .keys()
            .map(|k| k.as_str().expect("service name").to_owned())
            .collect()
    }

    /// A service's environment, from either the mapping or the list form.
    fn environment(&self, name: &str) -> Vec<(String, String)> {
        match &self.service(name)["environment"] {
            Value::Mapping(map) => map
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => String::new(),
                        other => panic!("{name}: environment value {other:?}"),
                    };
                    (k.as_str().unwrap().to_owned(), value)
                })
                .collect(),
            Value::Sequence(list) => list
                .iter()
                .map(|item| {
                    let item = item.as_str().expect("KEY=VALUE");
                    let (k, v) = item.split_once('=').unwrap_or((item, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            Value::Null => Vec::new(),
            other => panic!("{name}: environment {other:?}"),
        }
    }

    fn env(&self, service: &str, key: &str) -> Option<String> {
        self.environment(service)
            .into_iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// `(source, target, read_only)` of each short-syntax volume of a service.
    fn mounts(&self, name: &str) -> Vec<(String, String, bool)> {
        self.service(name)["volumes"]
            .as_sequence()
            .map(|list| {
                list.iter()
                    .map(|m| {
                        let m = m.as_str().expect("short volume syntax");
                        let parts: Vec<&str> = m.split(':').collect();
                        assert!(parts.len() >= 2, "{name}: volume {m}");
                        let read_only = parts
                            .get(2)
                            .is_some_and(|o| o.split(',').any(|o| o == "ro"));
                        (parts[0].to_owned(), parts[1].to_owned(), read_only)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn compose_runs_the_proxy_and_an_agent_on_one_named_volume() {
    let compose = Compose::load();
    let names = compose.service_names();
    assert!(
        names.len() >= 2,
        "the proxy and an example agent: {names:?}"
    );
    let agents: Vec<&String> = names.iter().filter(|n| *n != PROXY_SERVICE).collect();

    let proxy = compose.service(PROXY_SERVICE);
    assert_eq!(
        proxy["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile"),
        "the proxy is built from deploy/Dockerfile"
    );
    assert_eq!(proxy["build"]["context"].as_str(), Some(".."));

    let config_file = compose
        .env(PROXY_SERVICE, "DATABRICKS_CONFIG_FILE")
        .expect("the proxy's DATABRICKS_CONFIG_FILE");
    let config_dir = Path::new(&config_file)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let named_volumes: BTreeSet<String> = compose.0["volumes"]
        .as_mapping()
        .expect("top-level named volumes")
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let (volume, _, read_only) = compose
        .mounts(PROXY_SERVICE)
        .into_iter()
        .find(|(_, target, _)| *target == config_dir)
        .unwrap_or_else(|| panic!("the proxy mounts a volume at {config_dir}"));
    assert!(
        named_volumes.contains(&volume),
        "{volume} is a named volume"
    );
    assert!(!read_only, "the rotator writes the config file");

    for agent in agents {
        let mounts = compose.mounts(agent);
        let (_, target, read_only) = mounts
            .iter()
            .find(|(source, _, _)| *source == volume)
            .unwrap_or_else(|| panic!("{agent} mounts the volume {volume}"));
        assert!(read_only, "{agent} mounts the config volume read-only");
        if let Some(file) = compose.env(agent, "DATABRICKS_CONFIG_FILE") {
            assert!(
                file.starts_with(&format!("{target}/")),
                "{agent}: {file} in {target}"
            );
        }
        let via_service_name = compose
            .environment(agent)
            .iter()
            .any(|(_, v)| v.starts_with(&format!("http://{PROXY_SERVICE}:")));
        assert!(
            via_service_name,
            "{agent} reaches the proxy as http://{PROXY_SERVICE}:PORT"
        );
        assert_eq!(
            compose.service(agent)["depends_on"][PROXY_SERVICE]["condition"].as_str(),
            Some("service_healthy"),
            "{agent} starts once the proxy is healthy"
        );
    }
}

/// No service uses the host network or publishes a port beyond the host's loopback interface.
fn assert_published_on_loopback_only(compose: &Compose) {
    for name in compose.service_names() {
        let service = compose.service(&name);
        assert!(
            service["network_mode"].as_str() != Some("host"),
            "{name} must not use the host network"
        );
        for mapping in service["ports"].as_sequence().into_iter().flatten() {
            match mapping {
                Value::String(short) => assert!(
                    short.starts_with("127.0.0.1:"),
                    "{name}: port {short} must be bound to 127.0.0.1"
                ),
                Value::Mapping(_) => assert_eq!(
                    mapping["host_ip"].as_str(),
                    Some("127.0.0.1"),
                    "{name}: port {mapping:?} must be bound to 127.0.0.1"
                ),
                other => panic!("{name}: port {other:?} must be bound to 127.0.0.1"),
            }
        }
    }
}

#[test]
fn compose_publishes_on_loopback_only_and_checks_readiness() {
    let compose = Compose::load();
    let port = compose
        .env(PROXY_SERVICE, "PROXY_PORT")
        .expect("PROXY_PORT");
    assert_eq!(
        compose.env(PROXY_SERVICE, "PROXY_HOST").as_deref(),
        Some("0.0.0.0"),
        "inside its container the proxy must listen beyond loopback to be reachable"
    );
    assert_published_on_loopback_only(&compose);
    let ports = compose.service(PROXY_SERVICE)["ports"]
        .as_sequence()
        .expect("the proxy is published on the host's loopback");
    assert!(
        ports
            .iter()
            .any(|p| p.as_str() == Some(&format!("127.0.0.1:{port}:{port}"))),
        "{ports:?}"
    );

    let test = &compose.service(PROXY_SERVICE)["healthcheck"]["test"];
    let command: Vec<&str> = match test {
        Value::Sequence(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(line) => line.split_whitespace().collect(),
        other => panic!("healthcheck test {other:?}"),
    };
    assert!(
        command
            .iter()
            .any(|a| a.contains(&format!("127.0.0.1:{port}/ready"))),
        "the health check asks /ready: {command:?}"
    );

    let grace = compose.service(PROXY_SERVICE)["stop_grace_period"]
        .as_str()
        .expect("stop_grace_period");
    assert!(
        seconds(grace) > clap_default("PROXY_SHUTDOWN_GRACE").parse().unwrap(),
        "stop_grace_period {grace} leaves in-flight requests their PROXY_SHUTDOWN_GRACE"
    );
}

#[test]
fn compose_and_env_example_hold_no_secret() {
    assert_holds_no_secret("deploy");
}

/// `dir`'s compose file takes every secret from the environment, and its `.env.example` holds
/// none but explains every variable the compose file takes; the filled-in `.env` is ignored.
fn assert_holds_no_secret(dir: &str) {
    let compose = Compose::load_from(&format!("{dir}/docker-compose.yml"));
    for name in compose.service_names() {
        for (key, value) in compose.environment(&name) {
            if is_secret_name(&key) {
                assert!(
                    value.is_empty() || value.starts_with("${"),
                    "{name}: {key} must come from the environment or .env"
                );
            }
            assert!(
                !looks_secret(&value),
                "{name}: {key} looks like a credential"
            );
        }
    }

    let example = read(&format!("{dir}/.env.example"));
    let mut keys = BTreeSet::new();
    for line in example.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("KEY=VALUE");
        keys.insert(key.to_owned());
        if is_secret_name(key) {
            assert!(value.trim().is_empty(), ".env.example: {key} must be empty");
        }
        assert!(
            !looks_secret(value),
            ".env.example: {key} looks like a credential"
        );
    }
    assert!(keys.contains("DATABRICKS_HOST") && keys.contains("DATABRICKS_TOKEN"));

    // Every variable the compose file takes from the environment is explained in the example.
    let text = read(&format!("{dir}/docker-compose.yml"));
    for (at, _) in text.match_indices("${") {
        // `$${...}` is a literal `${...}` for the container's shell, not a compose variable.
        if text[..at].ends_with('$') {
            continue;
        }
        let name: String = text[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(keys.contains(&name), "{dir}/.env.example lacks {name}");
    }
    // Without a slash, the pattern also covers `.env` in the directories below deploy/.
    let ignored = read("deploy/.gitignore");
    assert!(
        ignored.lines().any(|l| l.trim() == ".env"),
        "deploy/.gitignore keeps the filled-in .env of {dir} out of version control"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// Instructions as `(KEYWORD, arguments)`, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// The instructions of each stage, after its `FROM`; `ARG`s before the first `FROM` substituted.
fn stages() -> Vec<(String, Vec<(String, String)>)> {
    let mut args = Vec::new();
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (keyword, rest) in dockerfile() {
        match keyword.as_str() {
            "ARG" if stages.is_empty() => {
                if let Some((name, value)) = rest.split_once('=') {
                    args.push((name.to_owned(), value.to_owned()));
                }
            }
            "FROM" => {
                let mut image = rest.split_whitespace().next().unwrap().to_owned();
                for (name, value) in &args {
                    image = image.replace(&format!("${{{name}}}"), value);
                }
                stages.push((image, Vec::new()));
            }
            _ => {
                if let Some((_, instructions)) = stages.last_mut() {
                    instructions.push((keyword, rest));
                }
            }
        }
    }
    stages
}

#[test]
fn dockerfile_is_multi_stage_small_non_root_and_checks_readiness() {
    let stages = stages();
    assert!(stages.len() >= 2, "a build stage and a small final stage");
    let (image, last) = stages.last().unwrap();
    assert!(
        image.starts_with("gcr.io/distroless/cc")
            || (image.starts_with("debian:") && image.ends_with("-slim")),
        "final image {image}"
    );
    let find = |keyword: &str| {
        last.iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
            .collect::<Vec<_>>()
    };

    let user = find("USER")
        .last()
        .copied()
        .expect("USER in the final stage");
    let name = user.split(':').next().unwrap();
    assert!(
        name != "root" && name != "0",
        "runs as non-root, not {user}"
    );

    let healthcheck = find("HEALTHCHECK").join(" ");
    assert!(
        healthcheck.contains("/ready"),
        "HEALTHCHECK asks /ready: {healthcheck}"
    );
    let tool = ["curl", "wget"]
        .into_iter()
        .find(|tool| healthcheck.contains(tool))
        .expect("the health check uses curl or wget");
    let installs = find("RUN").join(" ");
    assert!(
        image.contains("distroless") || installs.contains(&format!(" {tool}")),
        "the final stage installs {tool}"
    );
    assert!(
        installs.contains("ca-certificates"),
        "TLS roots for the workspace"
    );

    let entrypoint = find("ENTRYPOINT").join(" ");
    assert!(entrypoint.contains("fresh-proxy"), "{entrypoint}");

    // The same uid reads the shared volume from the agent container.
    let uid = installs
        .split_whitespace()
        .skip_while(|w| *w != "--uid")
        .nth(1)
        .expect("useradd --uid N");
    let compose = Compose::load();
    for agent in compose
        .service_names()
        .iter()
        .filter(|n| *n != PROXY_SERVICE)
    {
        assert_eq!(
            compose.service(agent)["user"].as_str(),
            Some(format!("{uid}:{uid}").as_str()),
            "{agent} runs as the proxy's uid to read the 0600 config file"
        );
    }
}

/// The build stage's `COPY` instructions as (sources, destination).
fn build_copies() -> Vec<(Vec<String>, String)> {
    let stages = stages();
    let (_, build) = &stages[0];
    build
        .iter()
        .filter(|(k, rest)| k == "COPY" && !rest.starts_with("--"))
        .map(|(_, rest)| {
            let mut words: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            let destination = words.pop().expect("COPY destination");
            (words, destination)
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "target" {
                continue;
            }
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

fn cargo_metadata(manifest: &Path, extra: &[&str]) -> std::process::Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(extra)
        .arg("--manifest-path")
        .arg(manifest)
        .output()
        .expect("run cargo metadata")
}

/// `(package, target kind, target name)` of the workspace members, tests left out (they are
/// not part of the image's build context).
fn targets(manifest: &Path) -> BTreeSet<(String, String, String)> {
    let out = cargo_metadata(manifest, &["--no-deps"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut targets = BTreeSet::new();
    for package in metadata["packages"].as_array().unwrap() {
        for target in package["targets"].as_array().unwrap() {
            for kind in target["kind"].as_array().unwrap() {
                if kind != "test" {
                    targets.insert((
                        package["name"].as_str().unwrap().to_owned(),
                        kind.as_str().unwrap().to_owned(),
                        target["name"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    targets
}

#[test]
fn dockerfile_builds_from_the_checked_in_lock_file() {
    let instructions = dockerfile();
    let build = instructions
        .iter()
        .find(|(k, rest)| k == "RUN" && rest.contains("cargo build"))
        .map(|(_, rest)| rest.as_str())
        .expect("a RUN with cargo build");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "cargo build --release --locked: {build}"
    );
    // The builder's toolchain is the workspace's minimum supported Rust version, which clippy
    // holds the code to.
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version in [workspace.package]");
    let builder_rust = instructions
        .iter()
        .find_map(|(k, rest)| (k == "ARG").then(|| rest.strip_prefix("RUST_VERSION="))?)
        .expect("ARG RUST_VERSION=...");
    assert_eq!(builder_rust, msrv, "ARG RUST_VERSION of deploy/Dockerfile");
    assert!(stages()[0].0.starts_with(&format!("rust:{msrv}-")));

    let copies = build_copies();
    assert!(
        copies
            .iter()
            .any(|(sources, _)| sources.iter().any(|s| s == "Cargo.lock")),
        "the build stage copies Cargo.lock"
    );

    // The repository's cargo configuration (`.cargo/`) applies to the image's build as well.
    if root().join(".cargo").exists() {
        assert!(
            copies
                .iter()
                .any(|(sources, _)| sources.iter().any(|s| s.trim_end_matches('/') == ".cargo")),
            "the build stage copies .cargo/, as cargo in the repository reads it"
        );
    }

    // Every source must pass the build's ignore file, which lets through only what it names.
    let ignore = read("deploy/Dockerfile.dockerignore");
    let allowed: BTreeSet<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .collect();
    for source in copies.iter().flat_map(|(sources, _)| sources) {
        assert!(
            allowed.contains(source.as_str()),
            "Dockerfile.dockerignore lets {source} through"
        );
    }

    // The build context as the image sees it: the workspace must load from it, with the lock
    // file as it is, and with every target the repository has.
    let context = tempfile::tempdir().unwrap();
    for (sources, destination) in &copies {
        assert!(
            !destination.starts_with('/'),
            "relative to WORKDIR: {destination}"
        );
        let into_directory = destination.ends_with('/') || sources.len() > 1;
        let destination = context.path().join(destination);
        for source in sources {
            let from = root().join(source);
            assert!(from.exists(), "COPY source {source} exists");
            let to = if from.is_file() && into_directory {
                destination.join(from.file_name().unwrap())
            } else {
                destination.clone()
            };
            copy_tree(&from, &to);
        }
    }
    let manifest = context.path().join("Cargo.toml");
    let host = String::from_utf8(
        Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
            .arg("-vV")
            .output()
            .expect("rustc -vV")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
    .expect("host triple");
    let locked = cargo_metadata(&manifest, &["--locked", "--filter-platform", &host]);
    assert!(
        locked.status.success(),
        "the workspace does not resolve from the image's build context with --locked:\n{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    let in_image = targets(&manifest);
    let in_repository = targets(&root().join("Cargo.toml"));
    let missing: Vec<_> = in_repository.difference(&in_image).collect();
    assert!(
        missing.is_empty(),
        "the Dockerfile does not COPY the files of these targets (cargo build would fail): {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd unit

/// `(section, key, value)` of each setting of the unit.
fn unit() -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in read("deploy/fresh-proxy.service").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=Value");
        settings.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    settings
}

fn service_values(settings: &[(String, String, String)], key: &str) -> Vec<String> {
    settings
        .iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

#[test]
fn systemd_unit_is_hardened() {
    let settings = unit();
    let one = |key: &str| {
        service_values(&settings, key)
            .pop()
            .unwrap_or_else(|| panic!("[Service] {key}= is set"))
    };
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), value, "[Service] {key}");
    }
    let families = one("RestrictAddressFamilies");
    assert!(
        families.contains("AF_INET") && !families.contains("AF_PACKET"),
        "{families}"
    );
    assert!(!service_values(&settings, "SystemCallFilter").is_empty());

    let user = one("User");
    assert!(
        user != "root" && user != "0",
        "runs as non-root, not {user}"
    );

    let environment = service_values(&settings, "Environment").join(" ");
    let variable = |name: &str| {
        environment
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let config_file = variable("DATABRICKS_CONFIG_FILE").expect("DATABRICKS_CONFIG_FILE");
    let config_dir = Path::new(&config_file).parent().unwrap();
    let writable = service_values(&settings, "ReadWritePaths").join(" ");
    assert!(
        writable
            .split_whitespace()
            .any(|path| config_dir.starts_with(path.trim_start_matches('-'))),
        "ReadWritePaths lets the rotator write {}: {writable}",
        config_dir.display()
    );
    let host = variable("PROXY_HOST").unwrap_or_else(|| clap_default("PROXY_HOST"));
    let host: std::net::IpAddr = host.parse().unwrap();
    assert!(host.is_loopback(), "PROXY_HOST={host}");

    // Secrets come from the root-only environment file, never from the unit or the command line.
    assert!(!service_values(&settings, "EnvironmentFile").is_empty());
    let visible = format!("{environment} {}", one("ExecStart"));
    for secret in ["DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "dapi"] {
        assert!(!visible.contains(secret), "{secret} in the unit: {visible}");
    }

    assert!(
        one("RestartPreventExitStatus")
            .split_whitespace()
            .any(|s| s == "2"),
        "no restart loop on invalid configuration (exit status 2)"
    );
    let stop = seconds(&one("TimeoutStopSec"));
    let grace: u64 = clap_default("PROXY_SHUTDOWN_GRACE").parse().unwrap();
    assert!(
        stop > grace,
        "TimeoutStopSec {stop} s must exceed the {grace} s drain"
    );
}

#[test]
fn systemd_unit_verifies_where_systemd_analyze_is_available() {
    let dir = tempfile::tempdir().unwrap();
    let unit = read("deploy/fresh-proxy.service").replace(
        "ExecStart=/usr/local/bin/fresh-proxy",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_fresh-proxy")),
    );
    let path = dir.path().join("fresh-proxy.service");
    std::fs::write(&path, unit).unwrap();
    let output = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            eprintln!("systemd-analyze not available ({err}); skipped");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let about_the_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("fresh-proxy.service"))
        .collect();
    assert!(
        about_the_unit.is_empty(),
        "systemd-analyze verify:\n{}",
        about_the_unit.join("\n")
    );
    if !output.status.success() {
        eprintln!("systemd-analyze verify could not run here; skipped:\n{stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/fleet: three proxies, one rotator, a three-member etcd

const FLEET: &str = "deploy/fleet";

fn fleet() -> Compose {
    Compose::load_from(&format!("{FLEET}/docker-compose.yml"))
}

/// The proxies of a compose file: the services built from `deploy/Dockerfile`.
fn proxy_services(compose: &Compose) -> Vec<String> {
    compose
        .service_names()
        .into_iter()
        .filter(|name| {
            compose.service(name)["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile")
        })
        .collect()
}

/// The etcd members of a compose file: the services that run an etcd image.
fn etcd_services(compose: &Compose) -> Vec<String> {
    compose
        .service_names()
        .into_iter()
        .filter(|name| {
            compose.service(name)["image"]
                .as_str()
                .is_some_and(|image| image.contains("/etcd"))
        })
        .collect()
}

/// The `--flag=value` arguments of a service's command.
fn flags(compose: &Compose, service: &str) -> Vec<(String, String)> {
    compose.service(service)["command"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{service}: command is a list of --flag=value"))
        .iter()
        .map(|arg| {
            let arg = arg.as_str().expect("a string argument");
            let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
            (flag.to_owned(), value.to_owned())
        })
        .collect()
}

fn flag(compose: &Compose, service: &str, name: &str) -> String {
    flags(compose, service)
        .into_iter()
        .find_map(|(flag, value)| (flag == name).then_some(value))
        .unwrap_or_else(|| panic!("{service} sets {name}"))
}

/// The host port of the `127.0.0.1:HOST:CONTAINER` mapping of `container`.
fn loopback_host_port(compose: &Compose, service: &str, container: &str) -> String {
    compose.service(service)["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|short| {
            let rest = short.strip_prefix("127.0.0.1:")?;
            let (host, inside) = rest.split_once(':')?;
            (inside == container).then(|| host.to_owned())
        })
        .unwrap_or_else(|| panic!("{service} publishes {container} on 127.0.0.1"))
}

/// The default of a `${NAME:-default}` value.
fn default_of(value: &str, name: &str) -> String {
    value
        .strip_prefix(&format!("${{{name}:-"))
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{value} is ${{{name}:-default}}"))
        .to_owned()
}

fn env_example(dir: &str) -> Vec<(String, String)> {
    read(&format!("{dir}/.env.example"))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn fleet_runs_a_three_member_etcd_cluster_on_its_own_volumes() {
    let compose = fleet();
    let members = etcd_services(&compose);
    assert_eq!(members.len(), 3, "three etcd members: {members:?}");

    let peer = |member: &str| format!("http://{member}:2380");
    let expected_cluster: BTreeSet<String> = members
        .iter()
        .map(|member| format!("{member}={}", peer(member)))
        .collect();
    let mut data_volumes = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for member in &members {
        let image = default_of(
            compose.service(member)["image"].as_str().unwrap(),
            "ETCD_IMAGE",
        );
        let (repository, tag) = image.rsplit_once(':').expect("a tagged image");
        assert!(
            ["gcr.io/etcd-development/etcd", "quay.io/coreos/etcd"].contains(&repository),
            "{member}: the official etcd image, not {repository}"
        );
        assert!(tag.starts_with("v3.5."), "{member}: etcd 3.5, not {tag}");
        let example = env_example(FLEET);
        assert!(
            example.contains(&("ETCD_IMAGE".to_owned(), image.clone())),
            "{FLEET}/.env.example names the compose file's default image {image}"
        );

        assert_eq!(flag(&compose, member, "--name"), *member);
        assert_eq!(
            flag(&compose, member, "--initial-advertise-peer-urls"),
            peer(member)
        );
        assert_eq!(
            flag(&compose, member, "--advertise-client-urls"),
            format!("http://{member}:2379")
        );
        let cluster: BTreeSet<String> = flag(&compose, member, "--initial-cluster")
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(cluster, expected_cluster, "{member}: --initial-cluster");
        assert_eq!(flag(&compose, member, "--initial-cluster-state"), "new");
        tokens.insert(flag(&compose, member, "--initial-cluster-token"));

        let data_dir = flag(&compose, member, "--data-dir");
        let (volume, _, read_only) = compose
            .mounts(member)
            .into_iter()
            .find(|(_, target, _)| *target == data_dir)
            .unwrap_or_else(|| panic!("{member} keeps {data_dir} on a volume"));
        assert!(!read_only, "{member} writes its data");
        assert!(
            compose.0["volumes"][volume.as_str()].is_mapping(),
            "{member}: {volume} is a named volume"
        );
        assert!(
            data_volumes.insert(volume.clone()),
            "{member} shares its data volume {volume}"
        );

        // etcd holds the token: nothing outside the fleet's network reaches it.
        assert!(
            compose.service(member)["ports"].is_null(),
            "{member} must not publish etcd's ports"
        );
        assert!(
            compose.service(member)["healthcheck"]["test"].is_sequence(),
            "{member} has a health check the proxies wait for"
        );
    }
    assert_eq!(tokens.len(), 1, "one --initial-cluster-token: {tokens:?}");
}

#[test]
fn fleet_proxies_share_one_etcd_prefix_and_keep_their_own_config_files() {
    let compose = fleet();
    let proxies = proxy_services(&compose);
    assert_eq!(proxies.len(), 3, "three proxies: {proxies:?}");
    let members = etcd_services(&compose);
    let client_urls: BTreeSet<String> = members
        .iter()
        .map(|member| flag(&compose, member, "--advertise-client-urls"))
        .collect();

    let mut config_volumes = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    let shared = |key: &str| -> BTreeSet<Option<String>> {
        proxies.iter().map(|p| compose.env(p, key)).collect()
    };
    for key in [
        "DATABRICKS_HOST",
        "DATABRICKS_TOKEN",
        "DATABRICKS_CONFIG_PROFILE",
        "PAT_COORDINATION",
        "PAT_ETCD_ENDPOINTS",
        "PAT_ETCD_PREFIX",
        "PAT_ETCD_LEASE_TTL",
    ] {
        let values = shared(key);
        assert!(
            values.len() == 1 && !values.contains(&None),
            "every proxy sets the same {key}: {values:?}"
        );
    }
    for proxy in &proxies {
        let service = compose.service(proxy);
        // The build context is the repository root, as for deploy/docker-compose.yml.
        let context = service["build"]["context"].as_str().expect("build context");
        assert_eq!(
            root().join(FLEET).join(context).canonicalize().unwrap(),
            root().canonicalize().unwrap(),
            "{proxy}: build context {context}"
        );

        let env = |key: &str| {
            compose
                .env(proxy, key)
                .unwrap_or_else(|| panic!("{proxy} sets {key}"))
        };
        assert_eq!(env("PAT_COORDINATION"), "etcd");
        let endpoints: BTreeSet<String> = env("PAT_ETCD_ENDPOINTS")
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            endpoints, client_urls,
            "{proxy}: PAT_ETCD_ENDPOINTS names every member"
        );
        // The prefix names the team's identity: the person deploying must choose it.
        assert!(
            env("PAT_ETCD_PREFIX").starts_with("${PAT_ETCD_PREFIX:?"),
            "{proxy}: PAT_ETCD_PREFIX must be set in .env"
        );
        let ttl: u64 = env("PAT_ETCD_LEASE_TTL").parse().expect("seconds");
        assert!((1..=60).contains(&ttl), "{proxy}: lease TTL {ttl} s");
        assert_eq!(env("PROXY_HOST"), "0.0.0.0");
        assert_eq!(
            env("PROXY_ALLOWED_HOSTS"),
            *proxy,
            "{proxy} answers to its service name"
        );

        let config_dir = Path::new(&env("DATABRICKS_CONFIG_FILE"))
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let (volume, _, read_only) = compose
            .mounts(proxy)
            .into_iter()
            .find(|(_, target, _)| *target == config_dir)
            .unwrap_or_else(|| panic!("{proxy} mounts a volume at {config_dir}"));
        assert!(!read_only, "{proxy} writes its config file");
        assert!(
            config_volumes.insert(volume.clone()),
            "{proxy} shares the config volume {volume}: each host keeps its own file"
        );
        assert!(
            compose
                .service_names()
                .iter()
                .filter(|other| *other != proxy)
                .all(|other| compose.mounts(other).iter().all(|(s, _, _)| *s != volume)),
            "{volume} is {proxy}'s alone"
        );

        for member in &members {
            assert_eq!(
                service["depends_on"][member.as_str()]["condition"].as_str(),
                Some("service_healthy"),
                "{proxy} starts once {member} is healthy"
            );
        }

        let port = env("PROXY_PORT");
        assert!(
            host_ports.insert(loopback_host_port(&compose, proxy, &port)),
            "{proxy}: a host port of its own"
        );
        let test: Vec<&str> = service["healthcheck"]["test"]
            .as_sequence()
            .expect("healthcheck test")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            test.iter()
                .any(|a| a.contains(&format!("127.0.0.1:{port}/ready"))),
            "{proxy}: the health check asks /ready: {test:?}"
        );
        let grace = service["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period");
        assert!(
            seconds(grace) > clap_default("PROXY_SHUTDOWN_GRACE").parse().unwrap(),
            "{proxy}: stop_grace_period {grace} leaves in-flight requests their grace"
        );
    }
    assert_published_on_loopback_only(&compose);

    // The README's commands name this compose file and the ports it publishes.
    let readme = read(&format!("{FLEET}/README.md"));
    assert!(
        readme.contains(&format!(
            "docker compose -f {FLEET}/docker-compose.yml up --build -d"
        )),
        "{FLEET}/README.md says how to bring the fleet up"
    );
    for port in &host_ports {
        assert!(readme.contains(port.as_str()), "README names port {port}");
    }
}

#[test]
fn fleet_compose_and_env_example_hold_no_secret() {
    assert_holds_no_secret(FLEET);
}

/// Every `DATABRICKS_*`, `PROXY_*` and `PAT_*` name in `text`, comments included.
fn setting_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            ["DATABRICKS_", "PROXY_", "PAT_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
                && word
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn compose_files_name_only_settings_the_proxy_has() {
    let command = Cli::command();
    let settings: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    // Until the proxy has the fleet's settings, their names are not checked against it; once
    // it has `PAT_COORDINATION`, every one of them must exist.
    let fleet_pending = !settings.contains("PAT_COORDINATION");
    for file in [
        "deploy/docker-compose.yml",
        "deploy/fleet/docker-compose.yml",
    ] {
        let unknown: Vec<String> = setting_names(&read(file))
            .into_iter()
            // Secrets are read from the environment only, without a flag.
            .filter(|name| !settings.contains(name) && !is_secret_name(name))
            .filter(|name| {
                let fleet = name == "PAT_COORDINATION" || name.starts_with("PAT_ETCD_");
                if fleet && fleet_pending {
                    eprintln!("{file}: {name} is not a setting of this build yet");
                }
                !(fleet && fleet_pending)
            })
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} names variables the proxy does not read: {unknown:?}"
        );
    }
}
