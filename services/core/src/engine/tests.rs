//! Unit tests of the engine's edge cases (properties are in tests/engine_props.rs).
