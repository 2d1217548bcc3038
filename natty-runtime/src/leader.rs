//! Leader election that is safe under pauses.
