//! Instance lock (STUB: being written).
