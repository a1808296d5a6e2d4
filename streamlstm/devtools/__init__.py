"""Development tools: embedded broker, demo, load generator, synthetic streams, doc
generation and benchmarks. Runtime code never imports this package."""
