//! Settings for the proxy's clients: connection limits and deadlines, which `Host` names they
//! may use, the client key, the Unix socket.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::ConfigError;
use crate::proxy::guard::{ClientKey, ClientPolicy};
use crate::server::{ConnectionSettings, Deadlines};

/// The variable holding the client key; read from the environment only.
pub const CLIENT_KEY_VAR: &str = "PROXY_CLIENT_KEY";

/// The flags and variables of [`ClientSettings`].
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Seconds a client may take to send a request head, and to pause within a request body
    #[arg(
        long,
        env = "PROXY_HEADER_TIMEOUT",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub proxy_header_timeout: u64,
    /// Seconds a kept-alive client connection may wait for its next request
    #[arg(
        long,
        env = "PROXY_IDLE_TIMEOUT",
        default_value_t = 120,
        value_name = "SECONDS"
    )]
    pub proxy_idle_timeout: u64,
    /// Client connections held at once; past it, a small reserve answers health checks only
    #[arg(
        long,
        env = "PROXY_MAX_CONNECTIONS",
        default_value_t = 4096,
        value_name = "COUNT"
    )]
    pub proxy_max_connections: usize,
    /// Further `Host` names clients may use, comma-separated [default: loopback names]
    #[arg(long, env = "PROXY_ALLOWED_HOSTS", value_name = "NAMES")]
    pub proxy_allowed_hosts: Option<String>,
    /// Also listen on this Unix socket, mode 0600
    #[arg(long, env = "PROXY_UNIX_SOCKET", value_name = "PATH")]
    pub proxy_unix_socket: Option<PathBuf>,
}

/// Validated client settings.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Connection deadlines and the connection limit, before the file limit is applied.
    pub connections: ConnectionSettings,
    /// `PROXY_ALLOWED_HOSTS`, lower-case, without ports.
    pub allowed_hosts: Vec<String>,
    /// `PROXY_UNIX_SOCKET`.
    pub unix_socket: Option<PathBuf>,
}

impl ClientSettings {
    /// Validate the flags and variables.
    pub fn from_args(args: &ClientArgs) -> Result<Self, ConfigError> {
        let positive = |name: &str, value: u64| {
            if value == 0 {
                Err(ConfigError::var(name, "must be above 0"))
            } else {
                Ok(Duration::from_secs(value))
            }
        };
        let header = positive("PROXY_HEADER_TIMEOUT", args.proxy_header_timeout)?;
        let idle = positive("PROXY_IDLE_TIMEOUT", args.proxy_idle_timeout)?;
        if args.proxy_max_connections == 0 {
            return Err(ConfigError::var("PROXY_MAX_CONNECTIONS", "must be above 0"));
        }
        let allowed_hosts = match &args.proxy_allowed_hosts {
            Some(names) => parse_host_names(names)?,
            None => Vec::new(),
        };
        let unix_socket = args
            .proxy_unix_socket
            .clone()
            .filter(|path| !path.as_os_str().is_empty());
        Ok(Self {
            connections: ConnectionSettings {
                deadlines: Deadlines {
                    header,
                    idle,
                    // A client that reads nothing of its answer for as long as an idle
                    // connection may wait is gone.
                    write_stall: idle,
                },
                max_connections: args.proxy_max_connections,
            },
            allowed_hosts,
            unix_socket,
        })
    }

    /// The client policy: loopback names, the `listen` address unless it is a wildcard
    /// (`0.0.0.0`, `::`), `allowed_hosts`, and `client_key` if set.
    pub fn policy(&self, listen: IpAddr, client_key: Option<ClientKey>) -> ClientPolicy {
        let own_address = match listen {
            _ if listen.is_unspecified() => None,
            IpAddr::V4(ip) => Some(ip.to_string()),
            IpAddr::V6(ip) => Some(format!("[{ip}]")),
        };
        let policy = ClientPolicy::loopback()
            .allow_hosts(own_address)
            .allow_hosts(self.allowed_hosts.iter().cloned());
        match client_key {
            Some(key) => policy.require_key(key),
            None => policy,
        }
    }
}

/// `PROXY_CLIENT_KEY` from the environment: unset or empty is none.
pub fn client_key_from_env() -> Result<Option<ClientKey>, ConfigError> {
    match std::env::var(CLIENT_KEY_VAR) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => ClientKey::new(&value)
            .map(Some)
            .map_err(|err| ConfigError::var(CLIENT_KEY_VAR, err)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(ConfigError::var(CLIENT_KEY_VAR, "not valid UTF-8"))
        }
    }
}

/// `a, B.example:8080` to `["a", "b.example"]`: a port is dropped (any port is accepted), and
/// anything that is not a host name or address is refused.
fn parse_host_names(text: &str) -> Result<Vec<String>, ConfigError> {
    let mut names = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = crate::proxy::guard::host_name(item).ok_or_else(|| {
            ConfigError::var(
                "PROXY_ALLOWED_HOSTS",
                format!("{item:?} is not a host name (give names such as proxy or proxy.internal, comma-separated)"),
            )
        })?;
        names.push(name.into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_are_names_without_ports() {
        let ok = [
            ("fresh-proxy", vec!["fresh-proxy"]),
            (
                " Proxy.Internal:4000 , 10.0.0.5 ",
                vec!["proxy.internal", "10.0.0.5"],
            ),
            ("[fd00::1]:4000", vec!["[fd00::1]"]),
            ("", vec![]),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_host_names(text).unwrap(), expected, "{text:?}");
        }
        for bad in ["http://proxy", "proxy/path", "a b", "user@proxy"] {
            let err = parse_host_names(bad).expect_err(bad).to_string();
            assert!(err.starts_with("PROXY_ALLOWED_HOSTS: "), "{err}");
        }
    }

    #[test]
    fn the_policy_allows_the_listen_address_unless_it_is_a_wildcard() {
        use axum::http::{HeaderMap, HeaderValue, Method};

        let args = ClientArgs {
            proxy_header_timeout: 30,
            proxy_idle_timeout: 120,
            proxy_max_connections: 4096,
            proxy_allowed_hosts: Some("fresh-proxy".to_owned()),
            proxy_unix_socket: None,
        };
        let settings = ClientSettings::from_args(&args).unwrap();
        let allows = |listen: &str, host: &str| {
            let policy = settings.policy(listen.parse().unwrap(), None);
            let mut headers = HeaderMap::new();
            headers.insert("host", HeaderValue::from_str(host).unwrap());
            policy.check(&Method::POST, "/chat", None, &headers).is_ok()
        };
        assert!(allows("10.0.0.5", "10.0.0.5:4000"));
        assert!(allows("fd00::5", "[fd00::5]:4000"));
        assert!(!allows("0.0.0.0", "0.0.0.0:4000"));
        assert!(!allows("127.0.0.1", "10.0.0.5:4000"));
        assert!(allows("0.0.0.0", "fresh-proxy:4000"));
        assert!(allows("0.0.0.0", "localhost:4000"));
    }
}
