//! Benchmarks and measurement tools for understudy. The criterion benchmarks live in `benches/`.
