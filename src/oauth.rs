//! OAuth M2M (service principal) tokens.
