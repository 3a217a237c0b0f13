//! In-process PAT rotation.
