//! Which credentials to use, decided as the Databricks SDKs decide it: a pure function of the
//! explicit settings, the environment and the parsed config file. No I/O, no clock.
//!
//! The rules (Go SDK `config/config.go`, `config/config_attributes.go`, `config/config_file.go`;
//! Python SDK `databricks/sdk/config.py`; `docs/AUTH.md` cites them line by line):
//!
//! 1. explicit settings first, then the environment, then the profile; a later source never
//!    overrides a value an earlier one set;
//! 2. the config file is skipped when no profile is named and a host or a credential is already
//!    set;
//! 3. the profile is `DATABRICKS_CONFIG_PROFILE`, else `[__settings__] default_profile`, else
//!    `DEFAULT` (a missing `DEFAULT` is no error; a missing named profile is);
//! 4. `DATABRICKS_AUTH_TYPE` (or `auth_type` in the profile) selects the method; without it,
//!    credentials of two methods are an error that names both.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// An auth method, by its SDK name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `pat`: a personal access token (rotated by this proxy, or followed in the file).
    Pat,
    /// `oauth-m2m`: a service principal's client credentials.
    OAuthM2m,
    /// `databricks-cli`: U2M tokens from `databricks auth token`.
    DatabricksCli,
    /// `env-oidc`: workload identity federation with a JWT from an environment variable.
    EnvOidc,
    /// `file-oidc`: workload identity federation with a JWT from a file.
    FileOidc,
}

impl Method {
    /// Every method this proxy supports.
    pub const ALL: [Self; 5] = [
        Self::Pat,
        Self::OAuthM2m,
        Self::DatabricksCli,
        Self::EnvOidc,
        Self::FileOidc,
    ];

    /// The name the SDKs and `DATABRICKS_AUTH_TYPE` use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pat => "pat",
            Self::OAuthM2m => "oauth-m2m",
            Self::DatabricksCli => "databricks-cli",
            Self::EnvOidc => "env-oidc",
            Self::FileOidc => "file-oidc",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A setting the SDKs know: its profile key, its environment variable, and the auth method
/// family it is a credential of (the SDKs' `auth` tag), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The key in a profile.
    pub key: &'static str,
    /// Other keys the SDKs accept for it in a profile.
    pub aliases: &'static [&'static str],
    /// The environment variable.
    pub env: &'static str,
    /// The credential family, as named in the "more than one method" error.
    pub auth: Option<&'static str>,
    /// Whether the value is a secret (never printed).
    pub secret: bool,
}

const fn attr(key: &'static str, env: &'static str, auth: Option<&'static str>) -> Attr {
    Attr {
        key,
        aliases: &[],
        env,
        auth,
        secret: false,
    }
}

/// `host`.
pub const HOST: Attr = attr("host", "DATABRICKS_HOST", None);
/// `profile` (never read from a profile).
pub const PROFILE: Attr = attr("profile", "DATABRICKS_CONFIG_PROFILE", None);
/// `token`.
pub const TOKEN: Attr = Attr {
    secret: true,
    ..attr("token", "DATABRICKS_TOKEN", Some("pat"))
};
/// `username`.
pub const USERNAME: Attr = attr("username", "DATABRICKS_USERNAME", Some("basic"));
/// `password`.
pub const PASSWORD: Attr = Attr {
    secret: true,
    ..attr("password", "DATABRICKS_PASSWORD", Some("basic"))
};
/// `client_id`.
pub const CLIENT_ID: Attr = attr("client_id", "DATABRICKS_CLIENT_ID", Some("oauth"));
/// `client_secret`.
pub const CLIENT_SECRET: Attr = Attr {
    secret: true,
    ..attr("client_secret", "DATABRICKS_CLIENT_SECRET", Some("oauth"))
};
/// `auth_type`.
pub const AUTH_TYPE: Attr = attr("auth_type", "DATABRICKS_AUTH_TYPE", None);
/// `databricks_cli_path`.
pub const CLI_PATH: Attr = attr("databricks_cli_path", "DATABRICKS_CLI_PATH", None);
/// `oidc_token_env`.
pub const OIDC_TOKEN_ENV: Attr = attr(
    "oidc_token_env",
    "DATABRICKS_OIDC_TOKEN_ENV",
    Some("env-oidc"),
);
/// `oidc_token_filepath` (Python's key; Go's is `databricks_id_token_filepath`).
pub const OIDC_TOKEN_FILEPATH: Attr = Attr {
    aliases: &["databricks_id_token_filepath"],
    ..attr(
        "oidc_token_filepath",
        "DATABRICKS_OIDC_TOKEN_FILEPATH",
        Some("file-oidc"),
    )
};

/// Every setting, in the order the SDKs list them.
pub const ATTRS: [Attr; 11] = [
    HOST,
    PROFILE,
    TOKEN,
    USERNAME,
    PASSWORD,
    CLIENT_ID,
    CLIENT_SECRET,
    AUTH_TYPE,
    CLI_PATH,
    OIDC_TOKEN_ENV,
    OIDC_TOKEN_FILEPATH,
];

/// The environment variable `env-oidc` reads when `DATABRICKS_OIDC_TOKEN_ENV` names none.
pub const DEFAULT_OIDC_TOKEN_ENV: &str = "DATABRICKS_OIDC_TOKEN";

/// The config file's reserved section for tool settings; never a profile.
pub const SETTINGS_SECTION: &str = "__settings__";

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A flag (or clap's reading of the variable).
    Explicit,
    /// The environment.
    Env,
    /// The profile of the config file, under this key.
    Profile(&'static str),
}

/// A config file, parsed: sections in order, each with its keys in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFileView {
    /// The file, for messages.
    pub path: PathBuf,
    /// `(section, [(key, value)])`.
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

impl ConfigFileView {
    fn section(&self, name: &str) -> Option<&[(String, String)]> {
        self.sections
            .iter()
            .find(|(section, _)| section.trim() == name)
            .map(|(_, keys)| keys.as_slice())
    }

    fn value<'a>(keys: &'a [(String, String)], key: &str) -> Option<&'a str> {
        keys.iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

/// What [`resolve`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Explicit settings by profile key (`host`, `auth_type`, ...).
    pub explicit: &'a BTreeMap<String, String>,
    /// The environment.
    pub env: &'a Environment,
    /// The config file, when it exists.
    pub file: Option<&'a ConfigFileView>,
}

/// Environment variables, by name. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Environment(pub BTreeMap<String, String>);

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Environment {
    /// The value of `name`, unless unset or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

/// The outcome: the method and every setting with where it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The chosen method.
    pub method: Method,
    /// The profile the file's values came from; `None` when the file was skipped, absent, or
    /// has no `DEFAULT` to fall back to.
    pub profile: Option<String>,
    values: BTreeMap<&'static str, (String, Origin)>,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: BTreeMap<_, _> = self
            .values
            .iter()
            .map(|(key, (value, origin))| {
                let secret = ATTRS.iter().any(|a| a.key == *key && a.secret);
                let shown = if secret { "****" } else { value.as_str() };
                (*key, (shown, origin))
            })
            .collect();
        f.debug_struct("Resolved")
            .field("method", &self.method)
            .field("profile", &self.profile)
            .field("values", &values)
            .finish()
    }
}

impl Resolved {
    /// The value of `attr`, if any source set it.
    pub fn get(&self, attr: Attr) -> Option<&str> {
        self.values.get(attr.key).map(|(v, _)| v.as_str())
    }

    /// Where the value of `attr` came from.
    pub fn origin(&self, attr: Attr) -> Option<&Origin> {
        self.values.get(attr.key).map(|(_, o)| o)
    }

    /// The variables, set before the file, that make the SDKs skip it when no profile is named:
    /// the host and any credential.
    pub fn set_before_file(&self) -> Vec<&'static str> {
        ATTRS
            .iter()
            .filter(|a| a.key == HOST.key || a.auth.is_some())
            .filter(|a| matches!(self.origin(**a), Some(Origin::Explicit | Origin::Env)))
            .map(|a| a.env)
            .collect()
    }
}

/// Why no method could be chosen. The message names the variable or the profile key, never a
/// value of a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PrecedenceError(pub String);

/// Apply the SDKs' rules to `inputs`.
pub fn resolve(inputs: Inputs<'_>) -> Result<Resolved, PrecedenceError> {
    let mut values: BTreeMap<&'static str, (String, Origin)> = BTreeMap::new();
    for attr in ATTRS {
        if let Some(v) = inputs
            .explicit
            .get(attr.key)
            .filter(|v| !v.trim().is_empty())
        {
            values.insert(attr.key, (v.trim().to_owned(), Origin::Explicit));
        } else if let Some(v) = inputs.env.get(attr.env) {
            values.insert(attr.key, (v.trim().to_owned(), Origin::Env));
        }
    }

    let named = values.get(PROFILE.key).map(|(v, _)| v.clone());
    let configured = values.contains_key(HOST.key)
        || ATTRS
            .iter()
            .any(|a| a.auth.is_some() && values.contains_key(a.key));
    let mut profile = None;
    if let Some(file) = inputs.file.filter(|_| named.is_some() || !configured) {
        let (name, fallback) = profile_name(named.as_deref(), file)?;
        match file.section(&name) {
            Some(keys) => {
                for attr in ATTRS.iter().filter(|a| a.key != PROFILE.key) {
                    if values.contains_key(attr.key) {
                        continue;
                    }
                    let found = std::iter::once(attr.key)
                        .chain(attr.aliases.iter().copied())
                        .find_map(|key| Some((key, ConfigFileView::value(keys, key)?)));
                    if let Some((key, v)) = found {
                        values.insert(attr.key, (v.to_owned(), Origin::Profile(key)));
                    }
                }
                profile = Some(name);
            }
            None if fallback => {}
            None => {
                let why = match named {
                    Some(_) => "DATABRICKS_CONFIG_PROFILE",
                    None => "[__settings__] default_profile",
                };
                return Err(PrecedenceError(format!(
                    "{} has no profile [{name}] (named by {why})",
                    file.path.display()
                )));
            }
        }
    }

    let resolved = |method| Resolved {
        method,
        profile: profile.clone(),
        values: values.clone(),
    };
    let name_of = |attr: Attr| name_of(attr, &values, profile.as_deref(), inputs.file);

    if let Some((auth_type, _)) = values.get(AUTH_TYPE.key) {
        let method = Method::from_name(auth_type).ok_or_else(|| {
            let supported: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
            PrecedenceError(format!(
                "{}: auth type `{auth_type}` is not supported by fresh-proxy (supported: {})",
                name_of(AUTH_TYPE),
                supported.join(", ")
            ))
        })?;
        return Ok(resolved(method));
    }

    let mut families: Vec<(&str, Vec<String>)> = Vec::new();
    for attr in ATTRS {
        let (Some(auth), true) = (attr.auth, values.contains_key(attr.key)) else {
            continue;
        };
        match families.iter_mut().find(|(family, _)| *family == auth) {
            Some((_, names)) => names.push(name_of(attr)),
            None => families.push((auth, vec![name_of(attr)])),
        }
    }
    if families.len() > 1 {
        families.sort_by_key(|(family, _)| *family);
        let names: Vec<_> = families.iter().map(|(f, _)| *f).collect();
        let sources: Vec<_> = families.iter().flat_map(|(_, n)| n.clone()).collect();
        return Err(PrecedenceError(format!(
            "more than one authorization method configured: {} (from {}); set DATABRICKS_AUTH_TYPE or `auth_type` in the profile to choose one",
            names.join(" and "),
            sources.join(", ")
        )));
    }

    // No auth type: the SDKs' default chain, in its order, for the methods this proxy has.
    let has = |attr: Attr| values.contains_key(attr.key);
    if has(TOKEN) {
        return Ok(resolved(Method::Pat));
    }
    if has(USERNAME) || has(PASSWORD) {
        return Err(PrecedenceError(format!(
            "{}: basic auth (username and password) is not supported by fresh-proxy",
            name_of(if has(USERNAME) { USERNAME } else { PASSWORD })
        )));
    }
    if has(CLIENT_ID) && has(CLIENT_SECRET) {
        return Ok(resolved(Method::OAuthM2m));
    }
    if has(OIDC_TOKEN_ENV) || inputs.env.get(DEFAULT_OIDC_TOKEN_ENV).is_some() {
        return Ok(resolved(Method::EnvOidc));
    }
    if has(OIDC_TOKEN_FILEPATH) {
        return Ok(resolved(Method::FileOidc));
    }
    if has(CLIENT_SECRET) {
        return Err(PrecedenceError(format!(
            "{}: not set, but {} is",
            CLIENT_ID.env,
            name_of(CLIENT_SECRET)
        )));
    }
    if has(CLIENT_ID) {
        return Err(PrecedenceError(format!(
            "{}: not set, but {} is",
            CLIENT_SECRET.env,
            name_of(CLIENT_ID)
        )));
    }
    // Nothing configured: a PAT is what the proxy has always looked for; its absence is
    // reported by the caller, which knows about tokens written by an earlier rotation.
    Ok(resolved(Method::Pat))
}

/// The profile to read: named, else `[__settings__] default_profile`, else `DEFAULT` (then
/// `true`: a fallback, whose absence is no error).
fn profile_name(
    named: Option<&str>,
    file: &ConfigFileView,
) -> Result<(String, bool), PrecedenceError> {
    let reserved = |via: &str| {
        PrecedenceError(format!(
            "{via}: {SETTINGS_SECTION} is a reserved section name and cannot be used as a profile"
        ))
    };
    if let Some(name) = named {
        if name == SETTINGS_SECTION {
            return Err(reserved(PROFILE.env));
        }
        return Ok((name.to_owned(), false));
    }
    let default = file
        .section(SETTINGS_SECTION)
        .and_then(|keys| ConfigFileView::value(keys, "default_profile"));
    match default {
        Some(SETTINGS_SECTION) => Err(reserved(&format!(
            "{} [{SETTINGS_SECTION}] default_profile",
            file.path.display()
        ))),
        Some(name) => Ok((name.to_owned(), false)),
        None => Ok(("DEFAULT".to_owned(), true)),
    }
}

/// How to name `attr` in a message: its variable, or its key in the profile of the file.
pub fn name_of(
    attr: Attr,
    values: &BTreeMap<&'static str, (String, Origin)>,
    profile: Option<&str>,
    file: Option<&ConfigFileView>,
) -> String {
    match values.get(attr.key).map(|(_, o)| o) {
        Some(Origin::Profile(key)) => format!(
            "`{key}` in profile [{}] of {}",
            profile.unwrap_or("DEFAULT"),
            file.map_or_else(
                || Path::new("the config file").display(),
                |f| f.path.display()
            )
        ),
        _ => attr.env.to_owned(),
    }
}

impl Resolved {
    /// How to name `attr` in a message (see [`name_of`]).
    pub fn name_of(&self, attr: Attr, file: Option<&ConfigFileView>) -> String {
        name_of(attr, &self.values, self.profile.as_deref(), file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        name: &'static str,
        explicit: &'static [(&'static str, &'static str)],
        env: &'static [(&'static str, &'static str)],
        file: Option<&'static str>,
        expect: Result<Expect, &'static [&'static str]>,
    }

    struct Expect {
        method: Method,
        profile: Option<&'static str>,
        values: &'static [(Attr, &'static str, Origin)],
    }

    /// The INI subset the SDK test fixtures use: `[section]` and `key = value` lines.
    fn parse(text: &str) -> ConfigFileView {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sections.push((name.to_owned(), Vec::new()));
            } else if let Some((k, v)) = line.split_once('=') {
                let section = sections.last_mut().expect("a section first");
                section.1.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        ConfigFileView {
            path: PathBuf::from("/home/me/.databrickscfg"),
            sections,
        }
    }

    const FILE: &str = "
        [DEFAULT]
        host = https://default.example.com
        token = dapi-default

        [m2m]
        host = https://m2m.example.com
        client_id = sp-1
        client_secret = dose-secret

        [both]
        host = https://both.example.com
        token = dapi-both
        client_id = sp-2

        [both-chosen]
        host = https://both.example.com
        token = dapi-both
        client_id = sp-2
        auth_type = oauth-m2m

        [u2m]
        host = https://u2m.example.com
        auth_type = databricks-cli

        [wif]
        host = https://wif.example.com
        client_id = sp-3
        databricks_id_token_filepath = /var/run/token
        auth_type = file-oidc

        [azure]
        host = https://adb-1.azuredatabricks.net
        auth_type = azure-cli

        [hostonly]
        host = https://hostonly.example.com
    ";

    const SETTINGS: &str = "
        [__settings__]
        default_profile = u2m

        [DEFAULT]
        host = https://default.example.com
        token = dapi-default

        [u2m]
        host = https://u2m.example.com
        auth_type = databricks-cli
    ";

    fn run(case: &Case) -> Result<Resolved, PrecedenceError> {
        let explicit = case
            .explicit
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let env = Environment(
            case.env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        let file = case.file.map(parse);
        resolve(Inputs {
            explicit: &explicit,
            env: &env,
            file: file.as_ref(),
        })
    }

    #[test]
    fn the_sdk_rules() {
        use Origin::{Env, Explicit, Profile};
        let cases = [
            Case {
                name: "profile DEFAULT by default",
                explicit: &[],
                env: &[],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: Some("DEFAULT"),
                    values: &[
                        (HOST, "https://default.example.com", Profile("host")),
                        (TOKEN, "dapi-default", Profile("token")),
                    ],
                }),
            },
            Case {
                name: "the environment alone skips the file",
                explicit: &[],
                env: &[
                    ("DATABRICKS_HOST", "https://env.example.com"),
                    ("DATABRICKS_TOKEN", "dapi-env"),
                ],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: None,
                    values: &[
                        (HOST, "https://env.example.com", Env),
                        (TOKEN, "dapi-env", Env),
                    ],
                }),
            },
            Case {
                name: "a host from the environment skips the file: its token is not taken",
                explicit: &[],
                env: &[("DATABRICKS_HOST", "https://env.example.com")],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: None,
                    values: &[(HOST, "https://env.example.com", Env)],
                }),
            },
            Case {
                name: "a token from the environment skips the file: its host is not taken",
                explicit: &[],
                env: &[("DATABRICKS_TOKEN", "dapi-env")],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: None,
                    values: &[(TOKEN, "dapi-env", Env)],
                }),
            },
            Case {
                name: "a named profile is read; the environment still wins",
                explicit: &[],
                env: &[
                    ("DATABRICKS_CONFIG_PROFILE", "DEFAULT"),
                    ("DATABRICKS_TOKEN", "dapi-env"),
                ],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: Some("DEFAULT"),
                    values: &[
                        (HOST, "https://default.example.com", Profile("host")),
                        (TOKEN, "dapi-env", Env),
                    ],
                }),
            },
            Case {
                name: "explicit beats the environment",
                explicit: &[("host", "https://flag.example.com")],
                env: &[
                    ("DATABRICKS_HOST", "https://env.example.com"),
                    ("DATABRICKS_TOKEN", "dapi-env"),
                ],
                file: None,
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: None,
                    values: &[(HOST, "https://flag.example.com", Explicit)],
                }),
            },
            Case {
                name: "oauth-m2m from a profile",
                explicit: &[("profile", "m2m")],
                env: &[],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::OAuthM2m,
                    profile: Some("m2m"),
                    values: &[(CLIENT_ID, "sp-1", Profile("client_id"))],
                }),
            },
            Case {
                name: "two methods without an auth type",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "both")],
                file: Some(FILE),
                expect: Err(&[
                    "more than one authorization method configured: oauth and pat",
                    "`token` in profile [both]",
                    "`client_id` in profile [both]",
                    "DATABRICKS_AUTH_TYPE",
                ]),
            },
            Case {
                name: "two methods across sources",
                explicit: &[],
                env: &[
                    ("DATABRICKS_HOST", "https://env.example.com"),
                    ("DATABRICKS_TOKEN", "dapi-env"),
                    ("DATABRICKS_CLIENT_ID", "sp-9"),
                    ("DATABRICKS_CLIENT_SECRET", "dose-9"),
                ],
                file: None,
                expect: Err(&["oauth and pat", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_ID"]),
            },
            Case {
                name: "the auth type settles two methods",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "both-chosen")],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::OAuthM2m,
                    profile: Some("both-chosen"),
                    values: &[(AUTH_TYPE, "oauth-m2m", Profile("auth_type"))],
                }),
            },
            Case {
                name: "the environment's auth type beats the profile's",
                explicit: &[],
                env: &[
                    ("DATABRICKS_CONFIG_PROFILE", "both-chosen"),
                    ("DATABRICKS_AUTH_TYPE", "pat"),
                ],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: Some("both-chosen"),
                    values: &[(AUTH_TYPE, "pat", Env)],
                }),
            },
            Case {
                name: "databricks-cli from the profile",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "u2m")],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::DatabricksCli,
                    profile: Some("u2m"),
                    values: &[(HOST, "https://u2m.example.com", Profile("host"))],
                }),
            },
            Case {
                name: "file-oidc with Go's key for the path",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "wif")],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::FileOidc,
                    profile: Some("wif"),
                    values: &[(
                        OIDC_TOKEN_FILEPATH,
                        "/var/run/token",
                        Profile("databricks_id_token_filepath"),
                    )],
                }),
            },
            Case {
                name: "file-oidc and a client id need the auth type",
                explicit: &[],
                env: &[
                    ("DATABRICKS_HOST", "https://h.example.com"),
                    ("DATABRICKS_CLIENT_ID", "sp-3"),
                    ("DATABRICKS_OIDC_TOKEN_FILEPATH", "/var/run/token"),
                ],
                file: None,
                expect: Err(&["file-oidc and oauth"]),
            },
            Case {
                name: "env-oidc from the default variable",
                explicit: &[],
                env: &[
                    ("DATABRICKS_HOST", "https://h.example.com"),
                    ("DATABRICKS_CLIENT_ID", "sp-3"),
                    ("DATABRICKS_OIDC_TOKEN", "eyJhbGciOi"),
                ],
                file: None,
                expect: Ok(Expect {
                    method: Method::EnvOidc,
                    profile: None,
                    values: &[(CLIENT_ID, "sp-3", Env)],
                }),
            },
            Case {
                name: "default_profile in __settings__",
                explicit: &[],
                env: &[],
                file: Some(SETTINGS),
                expect: Ok(Expect {
                    method: Method::DatabricksCli,
                    profile: Some("u2m"),
                    values: &[(HOST, "https://u2m.example.com", Profile("host"))],
                }),
            },
            Case {
                name: "a named profile beats default_profile",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "DEFAULT")],
                file: Some(SETTINGS),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: Some("DEFAULT"),
                    values: &[(HOST, "https://default.example.com", Profile("host"))],
                }),
            },
            Case {
                name: "a missing named profile",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "prod")],
                file: Some(FILE),
                expect: Err(&[
                    "/home/me/.databrickscfg has no profile [prod]",
                    "DATABRICKS_CONFIG_PROFILE",
                ]),
            },
            Case {
                name: "a missing default_profile",
                explicit: &[],
                env: &[],
                file: Some("[__settings__]\ndefault_profile = gone\n[DEFAULT]\nhost = h\n"),
                expect: Err(&["has no profile [gone]", "default_profile"]),
            },
            Case {
                name: "a missing DEFAULT is no error",
                explicit: &[],
                env: &[],
                file: Some("[other]\nhost = https://o\n"),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: None,
                    values: &[],
                }),
            },
            Case {
                name: "__settings__ is no profile",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "__settings__")],
                file: Some(SETTINGS),
                expect: Err(&["DATABRICKS_CONFIG_PROFILE", "reserved"]),
            },
            Case {
                name: "an unsupported auth type in the profile",
                explicit: &[],
                env: &[("DATABRICKS_CONFIG_PROFILE", "azure")],
                file: Some(FILE),
                expect: Err(&[
                    "`auth_type` in profile [azure]",
                    "`azure-cli` is not supported",
                    "databricks-cli",
                ]),
            },
            Case {
                name: "an unsupported auth type in the environment",
                explicit: &[],
                env: &[
                    ("DATABRICKS_AUTH_TYPE", "github-oidc"),
                    ("DATABRICKS_HOST", "https://h"),
                ],
                file: None,
                expect: Err(&["DATABRICKS_AUTH_TYPE: auth type `github-oidc` is not supported"]),
            },
            Case {
                name: "basic auth is refused by name",
                explicit: &[],
                env: &[
                    ("DATABRICKS_HOST", "https://h"),
                    ("DATABRICKS_USERNAME", "me"),
                    ("DATABRICKS_PASSWORD", "dose-pw"),
                ],
                file: None,
                expect: Err(&["DATABRICKS_USERNAME", "basic"]),
            },
            Case {
                name: "a client id without its secret",
                explicit: &[("client_id", "sp-1")],
                env: &[("DATABRICKS_HOST", "https://h")],
                file: None,
                expect: Err(&["DATABRICKS_CLIENT_SECRET: not set, but DATABRICKS_CLIENT_ID is"]),
            },
            Case {
                name: "a profile with only a host leaves the method to the caller",
                explicit: &[("profile", "hostonly")],
                env: &[],
                file: Some(FILE),
                expect: Ok(Expect {
                    method: Method::Pat,
                    profile: Some("hostonly"),
                    values: &[(HOST, "https://hostonly.example.com", Profile("host"))],
                }),
            },
        ];
        for case in &cases {
            match (run(case), &case.expect) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.method, want.method, "{}", case.name);
                    assert_eq!(got.profile.as_deref(), want.profile, "{}", case.name);
                    for (attr, value, origin) in want.values {
                        assert_eq!(got.get(*attr), Some(*value), "{}: {}", case.name, attr.key);
                        assert_eq!(
                            got.origin(*attr),
                            Some(origin),
                            "{}: {}",
                            case.name,
                            attr.key
                        );
                    }
                    if want.profile.is_none() {
                        assert!(
                            got.values.values().all(|(_, o)| !matches!(o, Profile(_))),
                            "{}: nothing from the file: {got:?}",
                            case.name
                        );
                    }
                }
                (Err(err), Err(needles)) => {
                    for needle in *needles {
                        assert!(
                            err.0.contains(needle),
                            "{}: {err} lacks {needle:?}",
                            case.name
                        );
                    }
                    for secret in ["dapi-", "dose-", "eyJ"] {
                        assert!(!err.0.contains(secret), "{}: leaked {err}", case.name);
                    }
                }
                (got, _) => panic!("{}: {got:?}", case.name),
            }
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let env = Environment(
            [
                ("DATABRICKS_HOST".to_owned(), "https://h".to_owned()),
                ("DATABRICKS_TOKEN".to_owned(), "dapi-hidden".to_owned()),
            ]
            .into(),
        );
        let resolved = resolve(Inputs {
            explicit: &BTreeMap::new(),
            env: &env,
            file: None,
        })
        .unwrap();
        let shown = format!("{resolved:?} {env:?}");
        assert!(!shown.contains("dapi-hidden"), "{shown}");
        assert!(shown.contains("https://h"), "{shown}");
    }
}
