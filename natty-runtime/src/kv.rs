//! Typed KV buckets: declarations that natty provisions, and typed access over serde values.
