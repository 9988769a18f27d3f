//! Supervisor integration (STUB: being written).
