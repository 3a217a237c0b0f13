//! `PAT_SINKS`: other files that must hold the current token after each rotation.
//!
//! Each sink changes one value in place and keeps the rest of the file byte for byte (other
//! keys, order, comments, formatting). The edit is checked by parsing the result: it must equal
//! the original document with only that value set. Should an in-place edit not be possible
//! (a YAML flow mapping, say), the document is written back whole from the parsed value,
//! which keeps the data but not the comments, and a warning says so.
//!
//! * [`spec`]: parsing `PAT_SINKS`;
//! * [`mod@write`]: reading and writing the files, and their permissions;
//! * [`dotenv`], [`json`], [`yaml`]: the in-place edit of each format, pure functions of the
//!   text.

pub mod dotenv;
pub mod json;
pub mod spec;
pub mod write;
pub mod yaml;

use std::fmt;
use std::path::PathBuf;

pub use dotenv::set_dotenv;
pub use json::set_json;
pub use spec::{SinkSpecError, parse_sinks};
pub use write::{SinkError, SinkOutcome, SinkPermissions};
pub use yaml::set_yaml;

/// The format of a sink file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// `KEY=value` lines (`export KEY=value` too).
    Dotenv,
    /// A JSON document; the key is a JSON pointer (`/env/ANTHROPIC_AUTH_TOKEN`).
    Json,
    /// A YAML document; the key is a dotted path of mapping keys (`model.api_key`).
    Yaml,
}

impl SinkKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Dotenv => "dotenv",
            Self::Json => "json",
            Self::Yaml => "yaml",
        }
    }
}

/// One `KIND:PATH:KEY` entry of `PAT_SINKS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sink {
    /// File format.
    pub kind: SinkKind,
    /// The file (a leading `~/` is expanded from `HOME`).
    pub path: PathBuf,
    /// Where in the file the token goes.
    pub key: String,
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.kind.name(),
            self.path.display(),
            self.key
        )
    }
}

/// The result of [`set_json`] and [`set_yaml`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkEdit {
    /// Changed in place: comments and layout kept.
    InPlace(String),
    /// Written back whole from the parsed document: comments lost.
    Rewritten(String),
}
