//! Secret stores used to resolve `secretKeyRef` in component metadata.

pub mod local_env;
pub mod local_file;
